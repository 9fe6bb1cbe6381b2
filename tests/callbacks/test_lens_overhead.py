"""What the callbacks' mandatory work costs: the dry run is counted in the budget, one batch serves every dry run."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens._pl import LightningModule, Trainer
from lightning_lens.callbacks import _base
from lightning_lens.callbacks._base import LensCallback


class Counting(Dataset):
    """A dataset that counts the items read from it."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer_for(callbacks, epochs: int = 1) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   callbacks=callbacks)


class SlowCheck(LensCallback):
    """A dry run that takes 50 ms; records what the budget had counted when training started."""

    def __init__(self, val: Counting | None = None, key: str = "") -> None:
        super().__init__(max_overhead=0.05)
        self.val = val
        self.key = key
        self.batch = None
        self.reads_seen = None
        self.spent_at_train_start = None

    def _state_key_fields(self):
        return {"key": self.key}

    def check_setup(self, trainer, pl_module, batch):
        self.batch = batch
        self.reads_seen = None if self.val is None else self.val.reads
        time.sleep(0.05)

    def on_train_start(self, trainer, pl_module):
        self.spent_at_train_start = self.budget.spent


def test_the_dry_run_counts_against_the_overhead_budget():
    cb = SlowCheck()
    data = Counting()
    trainer_for([cb]).fit(Tiny(), DataLoader(data, batch_size=8), DataLoader(Counting(), batch_size=8))
    assert cb.spent_at_train_start is not None and cb.spent_at_train_start >= 0.05


def test_the_callbacks_of_a_trainer_share_one_dry_run_batch_and_release_it():
    val = Counting()
    callbacks = [SlowCheck(val, key=k) for k in "abc"]
    trainer = trainer_for(callbacks)
    trainer.fit(Tiny(), DataLoader(Counting(), batch_size=8), DataLoader(val, batch_size=8))
    # one batch of 8 items was read for the three dry runs (24 reads before the batch was shared)
    assert [cb.reads_seen for cb in callbacks] == [8, 8, 8]
    assert callbacks[1].batch is callbacks[0].batch and callbacks[2].batch is callbacks[0].batch
    assert trainer not in _base._FIRST_BATCHES  # not held once the last dry run is done


def test_validate_reads_its_own_batch_after_fit():
    val = Counting()
    cb = SlowCheck(val)
    trainer = trainer_for([cb])
    model = Tiny()
    trainer.fit(model, DataLoader(Counting(), batch_size=8), DataLoader(val, batch_size=8))
    late = SlowCheck(val, key="late")  # a callback added for validate does its dry run then, on a batch read for validate
    trainer.callbacks.append(late)
    reads = val.reads
    trainer.validate(model, DataLoader(val, batch_size=8), verbose=False)
    assert late.reads_seen == reads + 8
    x, y = late.batch
    assert torch.equal(x, val.x[:8]) and torch.equal(y, val.y[:8])


# ------------------------------------------------------------------------------------- the group budget of a trainer
def test_members_of_a_group_share_twice_the_largest_budget_and_leave_room_for_reserves():
    group = _base.OverheadBudget(None)
    group.start(now=0.0)
    a, b, c = (_base.OverheadBudget(0.05) for _ in range(3))
    for member in (a, b, c):
        member.join(group, now=0.0)
    assert group.max_overhead == 0.10  # min(0.15, 2 x 0.05)
    # 10 epochs; after epoch 0 at t = 10.3 s: 0.3 s of the callbacks' time -> 10 s of training, 100 s projected
    a.spend(0.1), b.spend(0.1), c.spend(0.1)
    assert a.training_seconds(now=10.3) == 10.0 and group.training_seconds(now=10.3) == 10.0
    # a's own budget: 5 s; the group's: 10 s - 0.3 s spent
    assert a.left(0, 10, now=10.3) == 4.9
    b.reserve(3.0)
    c.reserve(3.0)
    assert a.left(0, 10, now=10.3) == 10.0 - 0.3 - 6.0  # the others' reserves come off the group's room
    assert a.allows(0, 10, cost=3.6, now=10.3) and not a.allows(0, 10, cost=3.8, now=10.3)
    c.reserve(0.0)  # c's last run is done
    assert a.left(0, 10, now=10.3) == 4.9  # its own budget binds again


def test_an_unlimited_member_is_not_charged_to_the_group_but_is_not_training_time():
    group = _base.OverheadBudget(None)
    group.start(now=0.0)
    limited, free = _base.OverheadBudget(0.05), _base.OverheadBudget(None)
    limited.join(group, now=0.0)
    free.join(group, now=0.0)
    assert group.max_overhead == 0.05
    free.spend(5.0)
    assert free.left(0, 1) is None and free.allows(0, 1, cost=1e9)
    assert group.spent == 0.0 and limited.training_seconds(now=25.0) == 20.0
    assert limited.left(0, 1, now=25.0) == 1.0


def test_a_trainers_lens_callbacks_join_one_group_per_fit():
    callbacks = [SlowCheck(key=k) for k in "ab"]
    trainer = trainer_for(callbacks)
    model = Tiny()
    trainer.fit(model, DataLoader(Counting(), batch_size=8), DataLoader(Counting(), batch_size=8))
    group = callbacks[0].budget.group
    assert group is callbacks[1].budget.group and group.members == [cb.budget for cb in callbacks]
    assert group.max_overhead == 0.10
    assert group.spent >= 0.1  # both dry runs (50 ms each) were charged to the group
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, DataLoader(Counting(), batch_size=8), DataLoader(Counting(), batch_size=8))
    second = callbacks[0].budget.group
    assert second is not group and second is callbacks[1].budget.group and len(second.members) == 2


def test_the_sanity_check_reserves_its_end_of_fit_run_in_the_group():
    from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback
    from lightning_lens.testing import LitClassifier, SmallCNN

    class Images(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(i)), i % 10

    reserved = {}

    class Watch(SaliencyMapCallback):
        def on_train_start(self, trainer, pl_module):
            reserved.update(self.budget.group.reserved)

    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, controls=False)
    watch = Watch(methods=["gradient"], num_probes=2)
    trainer_for([check, watch]).fit(LitClassifier(model=SmallCNN(width=2)), DataLoader(Images(), batch_size=8),
                                     DataLoader(Images(), batch_size=8))
    # before training: the check's end-of-fit run is reserved (at least the figures' share); after it ran, released
    assert reserved.get(id(check.budget), 0.0) >= 0.05
    assert check.budget.group.reserved[id(check.budget)] == 0.0
