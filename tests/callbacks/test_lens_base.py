"""The callback base: failure isolation, the due-epoch rule, the overhead budget, the dry run, state keys."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens._pl import LightningModule, Trainer
from lightning_lens.callbacks._base import LensCallback, OverheadBudget


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.trained_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders(n: int = 32):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)


def fit(callbacks, epochs: int = 3, **kwargs):
    model = Tiny()
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, **kwargs)
    trainer.fit(model, *loaders())
    return trainer, model


class Recorder(LensCallback):
    def __init__(self, fail_at=(), part_fails=False, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = set(fail_at)
        self.part_fails = part_fails
        self.ran: list[int] = []
        self.part_calls = 0

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.is_due(trainer):
            return
        self.ran.append(trainer.current_epoch)
        self.run_part(trainer, "part", self._part)
        if trainer.current_epoch in self.fail_at:
            raise RuntimeError("boom in the callback")

    def _part(self):
        self.part_calls += 1
        if self.part_fails:
            raise ValueError("part broke")


def test_failure_in_a_hook_is_reported_once_and_training_continues():
    cb = Recorder(fail_at={0, 1, 2}, max_overhead=None)
    with pytest.warns(RuntimeWarning, match=r"Recorder: 'on_validation_epoch_end' failed at epoch 0 with RuntimeError"):
        trainer, model = fit([cb])
    assert model.trained_steps == 12  # all 3 epochs trained
    assert cb.ran == [0, 1, 2]  # a failing hook is reported, not switched off
    assert trainer.current_epoch == 3
    assert cb.disabled == set()


def test_strict_reraises():
    cb = Recorder(fail_at={0}, strict=True, max_overhead=None)
    with pytest.raises(RuntimeError, match="boom in the callback"):
        fit([cb])


def test_a_failing_part_is_switched_off_after_max_failures():
    cb = Recorder(part_fails=True, max_failures=2, max_overhead=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([cb], epochs=4)
    assert cb.part_calls == 2  # epochs 0 and 1, then off
    assert cb.disabled == {"part"}
    messages = [str(w.message) for w in caught if "part broke" in str(w.message)]
    assert len(messages) == 2  # once when it first failed, once when it was switched off
    assert "switched off after 2 failures" in messages[-1]


def test_due_rule_every_n_counts_from_one_and_keeps_first_and_last_epoch():
    cb = Recorder(every_n_epochs=3, max_overhead=None)
    fit([cb], epochs=8)
    assert cb.ran == [0, 2, 5, 7]  # first, (e+1) % 3 == 0, last


def test_due_rule_never_during_sanity_check_and_always_under_validate():
    cb = Recorder(every_n_epochs=100, max_overhead=None)
    trainer, model = fit([cb], epochs=1, num_sanity_val_steps=2)
    assert cb.ran == [0]
    trainer.validate(model, loaders()[1], verbose=False)
    assert cb.ran == [0, trainer.current_epoch]


class Slow(Recorder):
    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.is_due(trainer):
            return
        start = time.perf_counter()
        self.ran.append(trainer.current_epoch)
        time.sleep(0.05)
        self.record_run_cost(time.perf_counter() - start)


def test_budget_skips_middle_epochs_but_keeps_first_and_last():
    cb = Slow(max_overhead=0.01)
    fit([cb], epochs=6)
    assert cb.ran[0] == 0 and cb.ran[-1] == 5
    assert len(cb.ran) < 6
    assert cb.skipped_for_budget and all(0 < e < 5 for e in cb.skipped_for_budget)


def test_overhead_budget_arithmetic():
    budget = OverheadBudget(0.1)
    budget.start(now=0.0)
    # 10 s of training in 1 of 10 epochs: 100 s projected, 10 s allowed
    assert budget.allows(epoch=0, max_epochs=10, cost=9.0, reserve=1.0, now=10.0)
    assert not budget.allows(epoch=0, max_epochs=10, cost=9.0, reserve=1.5, now=10.0)
    budget.spend(5.0)
    assert budget.training_seconds(now=15.0) == pytest.approx(10.0)
    assert OverheadBudget(None).allows(epoch=0, max_epochs=1, cost=1e9, now=1.0)
    with pytest.raises(ValueError, match="max_overhead"):
        OverheadBudget(0.0)
    with pytest.raises(TypeError, match="max_overhead"):
        OverheadBudget("5%")


class ChecksBatch(LensCallback):
    def __init__(self, key):
        super().__init__(max_overhead=None)
        self.key = key
        self.seen_batch = None

    def check_setup(self, trainer, pl_module, batch):
        self.seen_batch = batch
        if self.key != "x":
            raise ValueError(f"input_key={self.key!r} is not in the batch; use input_key='x'")


def test_dry_run_raises_configuration_errors_before_the_first_training_step():
    cb = ChecksBatch("image")
    model = Tiny()
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[cb])
    with pytest.raises(ValueError, match="input_key='image'"):
        trainer.fit(model, *loaders())
    assert model.trained_steps == 0


def test_dry_run_sees_one_validation_batch():
    cb = ChecksBatch("x")
    fit([cb], epochs=1)
    x, y = cb.seen_batch
    assert x.shape == (8, 4) and y.shape == (8,)


def test_state_key_tells_instances_apart():
    class Keyed(LensCallback):
        def __init__(self, prefix):
            super().__init__()
            self.prefix = prefix

        def _state_key_fields(self):
            return {"prefix": self.prefix}

    assert Keyed("a").state_key != Keyed("b").state_key
    assert Keyed("a").state_key == Keyed("a").state_key


def test_the_dry_run_does_not_move_the_global_rng():
    # iterating a DataLoader draws its seed from the global generator: the dry run must not shift training's shuffle
    def weights(callbacks):
        torch.manual_seed(0)
        model = Tiny()
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, callbacks=callbacks)
        trainer.fit(model, DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=8))
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    (plain, rng_plain), (with_cb, rng_cb) = weights([]), weights([ChecksBatch("x")])
    assert all(torch.equal(a, b) for a, b in zip(plain, with_cb))
    assert torch.equal(rng_plain, rng_cb)
