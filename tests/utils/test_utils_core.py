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
