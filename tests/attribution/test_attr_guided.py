"""Guided Backprop and Deconvnet: Captum's oracles and every way a model can call a ReLU."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution import Deconvnet, Gradient, GuidedBackprop, ReLURule
from lightning_lens.testing.models import MixedReLUModel

GBP_ORACLE = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 2.0, 2.0, 1.0]])
DECONV_ORACLE = torch.tensor([[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]])


@pytest.mark.parametrize("inplace", [False, True])
def test_captum_oracles_on_the_one_conv_model(one_conv, inplace):
    model = one_conv(inplace=inplace)
    x = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    torch.testing.assert_close(GuidedBackprop(model).attribute(x, target=0), GBP_ORACLE.view(1, 1, 4, 4))
    torch.testing.assert_close(Deconvnet(model).attribute(x, target=0), DECONV_ORACLE.view(1, 1, 4, 4))


RELU_FLAVOURS = {
    "module": lambda h: nn.ReLU()(h),
    "module_inplace": lambda h: nn.ReLU(inplace=True)(h),
    "F.relu": lambda h: F.relu(h),
    "F.relu_inplace": lambda h: F.relu(h, inplace=True),
    "F.relu_": lambda h: F.relu_(h),
    "torch.relu": lambda h: torch.relu(h),
    "torch.relu_": lambda h: torch.relu_(h),
    "Tensor.relu": lambda h: h.relu(),
    "Tensor.relu_": lambda h: h.relu_(),
}


class MixedReLUs(nn.Module):
    """A chain of linear layers whose ReLUs come in every flavour; ``relu_`` results are used through the old name."""

    def __init__(self, flavours: list[str], width: int = 6, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flavours = flavours
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in flavours)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for flavour, layer in zip(self.flavours, self.layers):
            h = layer(x)
            out = RELU_FLAVOURS[flavour](h)
            x = h if flavour.endswith("_") or "inplace" in flavour else out  # in-place results read via `h`
        return self.head(x)


def hand_computed(model: MixedReLUs, x: torch.Tensor, target: int, rule: str) -> torch.Tensor:
    """The backward pass written out by hand (no autograd): W^T through linears, the rule at each ReLU."""
    pre, a = [], x
    for layer in model.layers:
        h = a @ layer.weight.detach().T + layer.bias.detach()
        pre.append(h)
        a = h.clamp(min=0)
    g = model.head.weight.detach()[target].expand_as(a)
    for layer, h in zip(reversed(model.layers), reversed(pre)):
        if rule == "gradient":
            g = g * (h > 0)
        elif rule == "guided":
            g = g.clamp(min=0) * (h > 0)
        else:
            g = g.clamp(min=0)
        g = g @ layer.weight.detach()
    return g


@pytest.mark.parametrize("rule,method", [("guided", GuidedBackprop), ("deconv", Deconvnet), ("gradient", Gradient)])
def test_a_model_mixing_every_relu_flavour_matches_the_hand_computed_result(rule, method):
    model = MixedReLUs(list(RELU_FLAVOURS))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    out = method(model).attribute(x, target=2)
    torch.testing.assert_close(out, hand_computed(model, x, 2, rule), rtol=1e-5, atol=1e-6)
    if rule != "gradient":  # the rule changes the answer, so the test can fail when a ReLU is missed
        assert not torch.allclose(out, hand_computed(model, x, 2, "gradient"), atol=1e-4)


@pytest.mark.parametrize("flavour", list(RELU_FLAVOURS))
def test_each_relu_flavour_alone_is_caught(flavour):
    model = MixedReLUs([flavour, flavour])
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    for rule, method in (("guided", GuidedBackprop), ("deconv", Deconvnet)):
        mode = ReLURule(rule)
        with mode:
            model(x)
        assert mode.count == 2
        torch.testing.assert_close(method(model).attribute(x, target=0), hand_computed(model, x, 0, rule),
                                   rtol=1e-5, atol=1e-6)


def test_relu_rule_backward_rules_on_a_vector():
    x = torch.tensor([-1.0, 2.0, 3.0, -4.0], requires_grad=True)
    upstream = torch.tensor([1.0, -1.0, 2.0, -2.0])
    for rule, expected in (("guided", [0.0, 0.0, 2.0, 0.0]), ("deconv", [1.0, 0.0, 2.0, 0.0])):
        with ReLURule(rule):
            y = torch.relu(x)
        (g,) = torch.autograd.grad(y, x, upstream)
        assert g.tolist() == expected
    assert torch.overrides._get_current_function_mode_stack() == []


def test_inplace_relu_keeps_in_place_semantics():
    h = torch.tensor([-1.0, 2.0], requires_grad=True) * 1.0
    with ReLURule("guided"):
        out = h.relu_()
    assert out is h and h.tolist() == [0.0, 2.0]


def test_other_ops_pass_through_unchanged():
    x = torch.randn(3, 4)
    with ReLURule("guided"):
        y = torch.tanh(x) + x.sigmoid() * 2
    torch.testing.assert_close(y, torch.tanh(x) + x.sigmoid() * 2)
    with pytest.raises(ValueError, match="rule"):
        ReLURule("lrp")


def test_a_model_without_relu_warns_and_equals_the_gradient():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="executed no ReLU"):
        out = GuidedBackprop(model).attribute(x, target=1)
    torch.testing.assert_close(out, Gradient(model).attribute(x, target=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuidedBackprop(MixedReLUs(["module"])).attribute(torch.randn(2, 6), target=0)


def test_a_relu_module_reused_twice_gets_the_rule_both_times():
    class Reused(MixedReLUs):
        def __init__(self):
            super().__init__(["module", "module"])
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            for layer in self.layers:
                x = self.act(layer(x))
            return self.head(x)

    model = Reused()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    for rule, method in (("guided", GuidedBackprop), ("deconv", Deconvnet)):
        torch.testing.assert_close(method(model).attribute(x, target=1), hand_computed(model, x, 1, rule),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [GuidedBackprop, Deconvnet, Gradient])
def test_shipped_mixed_relu_model_equals_its_all_modules_twin(method):
    x = torch.linspace(-1, 1, 24).view(6, 4)
    mixed, modules = MixedReLUModel("mixed"), MixedReLUModel("modules")
    torch.testing.assert_close(method(mixed).attribute(x, target=2), method(modules).attribute(x, target=2))
