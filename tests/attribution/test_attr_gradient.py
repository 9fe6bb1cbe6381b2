"""Gradient and Gradient x Input: hand-computed values on toy models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import Gradient, GradientXInput, input_gradients
from lightning_lens.testing.models import OneMinusReLUModel


@pytest.fixture
def linear() -> nn.Linear:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0], [-3.0, 1.0, 1.0, 1.0]]))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return model


def test_gradient_of_a_linear_model_is_the_weight_row(linear):
    x = torch.randn(3, 4)
    targets = torch.tensor([0, 2, 1])
    torch.testing.assert_close(Gradient(linear).attribute(x, target=targets), linear.weight.detach()[targets])
    torch.testing.assert_close(Gradient(linear).attribute(x, target=1), linear.weight.detach()[1].expand(3, 4))
    torch.testing.assert_close(Gradient(linear).attribute(x, target=0, abs=True), linear.weight.detach()[0].abs().expand(3, 4))


def test_gradient_x_input_of_a_linear_model_is_the_contribution(linear):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
    expected = torch.tensor([[1.0, -4.0, 9.0, 2.0], [0.0, 2.0, 0.0, 4.0]])
    torch.testing.assert_close(GradientXInput(linear).attribute(x, target=torch.tensor([0, 1])), expected)


class OneMinusReluOneMinus(nn.Module):
    """Captum's BasicModel, f(x) = 1 - relu(1 - x), summed per example into one logit."""

    def __init__(self) -> None:
        super().__init__()
        self.basic = OneMinusReLUModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic(x).sum(dim=1, keepdim=True)


def test_gradient_on_captums_basic_model():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0, -1.0, 7.0]])
    # relu'(0) = 0, so x = 1 gets gradient 0 (Captum's expected [0, 0, 0, 1, 1, 0])
    torch.testing.assert_close(Gradient(OneMinusReluOneMinus()).attribute(x, target=0),
                               torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]))


def test_gradient_of_a_quadratic_model():
    class Quadratic(nn.Module):
        def forward(self, x):
            return torch.stack([(x**2).sum(1), (x**3).sum(1)], dim=1)

    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    torch.testing.assert_close(Gradient(Quadratic()).attribute(x, target=0), 2 * x)
    torch.testing.assert_close(Gradient(Quadratic()).attribute(x, target=1), 3 * x**2)
    # GxI of a homogeneous function of degree k is k * f per feature sum (Euler): sum = 3 * sum(x^3)
    torch.testing.assert_close(GradientXInput(Quadratic()).attribute(x, target=1).sum(1), 3 * (x**3).sum(1))


def test_gradients_match_a_manual_backward_per_example():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(6, 5)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    out = Gradient(model).attribute(x, target=targets)
    for i in range(6):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, targets[i]], xi)
        torch.testing.assert_close(out[i : i + 1], g)


def test_a_model_that_modifies_its_input_in_place_is_supported():
    class InPlaceNormalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            x.sub_(0.5).mul_(2.0)
            return self.linear(x)

    model = InPlaceNormalize()
    x = torch.rand(2, 3)
    before = x.clone()
    torch.testing.assert_close(Gradient(model).attribute(x, target=1), 2.0 * model.linear.weight.detach()[1].expand(2, 3))
    assert torch.equal(x, before)


def test_input_gradients_core_returns_grads_target_and_logits(linear):
    x = torch.randn(2, 4)
    grads, target, logits = input_gradients(linear, x, None)
    torch.testing.assert_close(logits, linear(x).detach())
    assert torch.equal(target, logits.argmax(1))
    torch.testing.assert_close(grads, linear.weight.detach()[target])


def test_a_model_without_autograd_path_to_its_output_gets_a_clear_error():
    class Detached(nn.Module):
        def forward(self, x):
            return x.detach()[:, :2] * 1.0

    class DetachedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x.detach())

    for model in (Detached(), DetachedLinear()):
        with pytest.raises(RuntimeError, match="does not depend on its input"):
            Gradient(model).attribute(torch.rand(2, 3))


def test_a_target_score_independent_of_the_input_has_zero_gradient():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([x.sum(1), torch.zeros(x.shape[0])], dim=1)

    assert torch.equal(Gradient(Constant()).attribute(torch.rand(2, 3), target=1), torch.zeros(2, 3))


def test_constructor_checks_its_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Gradient(lambda x: x)
    with pytest.raises(TypeError, match="eval_mode"):
        Gradient(nn.Linear(2, 2), eval_mode="yes")
