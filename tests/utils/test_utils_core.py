"""Shared helpers: targets, modes, module lookup, execution order, batches, probes, inference mode."""

import pytest
import torch
from torch import nn

from lightning_lens.utils import (
    BatchAccessor,
    ProbeSet,
    grad_ready,
    gradients_enabled,
    modules_in_execution_order,
    preserve_modes,
    resolve_module,
    resolve_target,
)


def test_resolve_target_forms_and_errors():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]])
    assert resolve_target(None, logits).tolist() == [1, 0]
    assert resolve_target(2, logits).tolist() == [2, 2]
    assert resolve_target([0, 2], logits).tolist() == [0, 2]
    assert resolve_target(torch.tensor(1), logits).tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        resolve_target(torch.tensor([0, 1, 2]), logits)
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        resolve_target(3, logits)
    with pytest.raises(TypeError, match="integer class indices"):
        resolve_target(torch.tensor([0.0, 1.0]), logits)
    with pytest.raises(ValueError, match="logits of shape"):
        resolve_target(None, torch.zeros(2, 3, 4))


def test_preserve_modes_restores_mixed_modes_after_exception():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    net[1].eval()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError), preserve_modes(net, mode=False):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


def test_resolve_module_by_name_and_object():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 3)))
    assert resolve_module(net, "1.1") is net[1][1]
    assert resolve_module(net, net[0]) is net[0]
    with pytest.raises(ValueError, match=r"layer='features.7' is not a module of the model; available names: '0'"):
        resolve_module(net, "features.7")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_module(net, nn.ReLU())


def test_execution_order_differs_from_registration_order():
    class OutOfOrder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    net = OutOfOrder().train()
    order = modules_in_execution_order(net, torch.zeros(1, 3))
    assert [n for n, _ in order] == ["body", "head"]
    assert net.training and not net.body._forward_pre_hooks


def test_gradients_inside_inference_mode():
    w = torch.tensor([2.0, -1.0])
    with torch.inference_mode():
        x = torch.ones(2)
        with gradients_enabled():
            xg = grad_ready(x)
            (g,) = torch.autograd.grad((xg * w).sum(), xg)
    assert g.tolist() == [2.0, -1.0]
    with pytest.raises(TypeError, match="floating-point"):
        grad_ready(torch.ones(2, dtype=torch.long))


def test_batch_accessor_tuple_dict_and_callables():
    acc = BatchAccessor()
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    assert acc.inputs((x, y)) is x and acc.targets([x, y]) is y and acc.indices((x, y)) is None
    batch = {"image": x, "label": y, "index": torch.tensor([7, 8, 9]), "digit": y.clone(), "name": ["a", "b", "c"],
             "square_mask": torch.ones(3, 1, 2, 2), "other": torch.zeros(2)}
    assert acc.indices(batch).tolist() == [7, 8, 9]
    assert set(acc.metadata(batch)) == {"digit", "name"} and set(acc.masks(batch)) == {"square"}
    custom = BatchAccessor(input_key=lambda b: b["pix"], target_key="cls")
    assert custom.inputs({"pix": x, "cls": y}) is x
    with pytest.raises(KeyError, match="target_key='nope' does not select anything"):
        BatchAccessor(target_key="nope").targets({"pix": x})
    with pytest.raises(KeyError, match="pass input_key"):
        acc.inputs({"pix": x})
    with pytest.raises(TypeError, match="input_key must be"):
        BatchAccessor(input_key=1.5)


def test_probe_set_is_stable_balanced_and_leaves_global_rng():
    gen = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(8, 1, 4, 4, generator=gen), "label": torch.arange(8) % 4,
                "index": torch.arange(8) + 8 * i} for i in range(4)]
    rng = torch.get_rng_state()
    a = ProbeSet.from_batches(batches, num=8, seed=3)
    b = ProbeSet.from_batches(batches, num=8, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.inputs, b.inputs) and a.indices.tolist() == b.indices.tolist()
    assert sorted(a.targets.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    flat = torch.cat([bt["image"] for bt in batches])
    assert torch.equal(a.inputs, flat[a.indices])
    c = ProbeSet.from_state_dict(a.state_dict())
    assert torch.equal(c.inputs, a.inputs) and torch.equal(c.targets, a.targets)
    with pytest.raises(ValueError, match="empty"):
        ProbeSet.from_batches([], num=2)


def test_resolve_target_under_inference_mode_is_a_normal_tensor():
    with torch.inference_mode():
        out = resolve_target(torch.tensor([1, 0]), torch.zeros(2, 3))
    assert not out.is_inference()


def test_execution_order_leaves_caller_input_alone():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            x.mul_(0)
            return self.lin(x)

    x = torch.ones(1, 2)
    modules_in_execution_order(Inplace(), x)
    assert torch.equal(x, torch.ones(1, 2))


# ------------------------------------------------------------------------------------- probes by dataset position
def test_spread_over_classes_round_robin_and_prefix_stable():
    from lightning_lens.utils.probes import spread_over_classes

    candidates = torch.tensor([9, 4, 7, 1, 3, 0, 8])
    labels = torch.tensor([2, 0, 2, 1, 0, 0, 1])
    # depth 0: first of class 0 (4), class 1 (1), class 2 (9); depth 1: 3, 8, 7; depth 2: 0
    assert spread_over_classes(candidates, labels, 7).tolist() == [4, 1, 9, 3, 8, 7, 0]
    for k in range(1, 7):
        assert spread_over_classes(candidates, labels, k).tolist() == [4, 1, 9, 3, 8, 7, 0][:k]
    assert spread_over_classes(candidates, None, 3).tolist() == [9, 4, 7]
    assert spread_over_classes(candidates, labels.float(), 2).tolist() == [9, 4]  # not class indices: in order
    assert spread_over_classes(candidates, labels, 50).tolist() == [4, 1, 9, 3, 8, 7, 0]


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 4, 4, generator=gen)
        self.y = torch.arange(n) % 5
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        torch.rand(1)  # a random transform: uses the global RNG
        return {"image": self.x[i], "label": self.y[i]}


def test_probe_set_from_dataset_reads_few_items_and_keeps_only_the_chosen():
    data = CountingDataset(1000)
    rng = torch.get_rng_state()
    probes = ProbeSet.from_dataset(data, num=6, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the items' random transform did not move the global RNG
    assert data.reads == 128 + 6  # the candidates' labels, then the chosen items; never the whole dataset
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(2))[:128]
    # one per class in class order, the first candidate of each; then the second-round pick of class 0
    by_class = {c: [int(i) for i in order if int(i) % 5 == c] for c in range(5)}
    assert probes.indices.tolist() == [by_class[c][0] for c in range(5)] + [by_class[0][1]]
    assert torch.equal(probes.inputs, data.x[probes.indices]) and torch.equal(probes.targets, data.y[probes.indices])
    assert probes.indices.tolist() == ProbeSet.from_dataset(data, num=6, seed=2).indices.tolist()
    # an index key wins over the position; a transfer function sees each batch before it is read
    seen = []
    keyed = [{"image": data.x[i], "label": data.y[i], "index": 1000 + i} for i in range(20)]
    out = ProbeSet.from_dataset(keyed, num=3, seed=0, transfer=lambda b: seen.append(len(b["label"])) or b)
    assert all(i >= 1000 for i in out.indices.tolist()) and seen == [20, 3]
    with pytest.raises(ValueError, match="empty"):
        ProbeSet.from_dataset([], num=2)


def test_probe_pool_keeps_what_the_full_draw_needs():
    from lightning_lens.utils.probes import ProbePool

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 2, 2, generator=gen), torch.randint(0, 6, (16,), generator=gen)) for _ in range(12)]
    small, everything = ProbePool(num=5, seed=3), ProbePool(num=10_000, seed=3)
    for batch in batches:
        small.add(batch)
        everything.add(batch)
    assert len(everything) == 192 and len(small) <= 5 + 6
    # the same keys: the bounded pool draws exactly what a draw over the whole stream draws
    assert torch.equal(small.draw().inputs, everything.draw(5).inputs)
    unlabeled = ProbePool(num=3, seed=0)
    for x, _ in batches:
        unlabeled.add((x,))
    assert len(unlabeled) == 3 and unlabeled.draw().targets is None


def test_batch_accessor_takes_one_string_as_one_metadata_key():
    batch = {"image": torch.zeros(2, 1, 2, 2), "group": ["a", "b"], "site": torch.tensor([1, 2])}
    assert list(BatchAccessor(metadata_keys="group").metadata(batch)) == ["group"]
    with pytest.raises(TypeError, match="metadata_keys must be a list of strings"):
        BatchAccessor(metadata_keys=[1, 2])
