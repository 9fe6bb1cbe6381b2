"""Integrated Gradients: exact values on linear and polynomial models, completeness, integration rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_lens.attribution import IntegratedGradients
from lightning_lens.attribution.integrated_gradients import RULES, integration_points
from lightning_lens.testing.models import DifferenceReLUModel

from _attribution_helpers import conv_model_5x5, rows_of_every_forward


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def test_ig_of_a_linear_model_is_input_minus_baseline_times_weight(linear):
    x = torch.randn(4, 5)
    w = linear.weight.detach()
    targets = torch.tensor([0, 2, 1, 0])
    ig = IntegratedGradients(linear, n_steps=7)
    torch.testing.assert_close(ig.attribute(x, target=targets), x * w[targets])
    for baseline in (0.5, torch.randn(5), torch.randn(4, 5)):
        attr, delta = ig.attribute(x, target=targets, baseline=baseline, return_convergence_delta=True)
        torch.testing.assert_close(attr, (x - baseline) * w[targets])
        b = torch.as_tensor(baseline).expand_as(x)
        expected_sum = linear(x).detach().gather(1, targets[:, None])[:, 0] - linear(b).detach().gather(
            1, targets[:, None])[:, 0]
        torch.testing.assert_close(attr.sum(1), expected_sum)
        assert delta.abs().max() < 1e-5


@pytest.mark.parametrize("method", RULES)
def test_every_rule_is_exact_for_a_linear_model(linear, method):
    x = torch.randn(3, 5)
    torch.testing.assert_close(IntegratedGradients(linear, n_steps=4, method=method).attribute(x, target=1),
                               x * linear.weight.detach()[1])


class Cubic(nn.Module):
    """f(x) = sum(x^3): IG from 0 is x^3 per feature exactly (the integrand 3 a^2 x^3 is quadratic in a)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.pow(3).sum(1)
        return torch.stack([s, -s], dim=1)


def test_gauss_legendre_is_exact_for_polynomials():
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.5, -1.0]], dtype=torch.float64)
    attr = IntegratedGradients(Cubic(), n_steps=2, method="gausslegendre").attribute(x, target=0)
    torch.testing.assert_close(attr, x**3)
    # a left Riemann sum with 2 steps underestimates: alphas (0, 1/2) weights 1/2 -> 3/8 of x^3 ... hand value:
    left = IntegratedGradients(Cubic(), n_steps=2, method="riemann_left").attribute(x, target=0)
    torch.testing.assert_close(left, x * 0.5 * (0 + 3 * 0.25 * x**2))


@pytest.mark.parametrize("method", RULES)
def test_captum_oracle_basic_model2(method):
    # Captum's BasicModel2, relu(relu(x1) - 1 - relu(x2)), with its two inputs as two features.
    # Captum: x = (3, 1), zero baseline -> attributions (1.5, -0.5) within 0.05 at 500 steps
    x = torch.tensor([[3.0, 1.0]])
    attr, delta = IntegratedGradients(DifferenceReLUModel(), n_steps=500, method=method).attribute(
        x, target=0, return_convergence_delta=True)
    torch.testing.assert_close(attr, torch.tensor([[1.5, -0.5]]), atol=0.05, rtol=0)
    assert delta.abs().max() < 0.07


def test_completeness_on_a_nonlinear_model_with_gauss_legendre():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 4))
    x = torch.randn(5, 6)
    baseline = torch.randn(6)
    ig = IntegratedGradients(model, n_steps=50, baseline=baseline)
    attr, delta = ig.attribute(x, return_convergence_delta=True)
    scores = model(x).detach()
    target = scores.argmax(1)
    expected = scores.gather(1, target[:, None])[:, 0] - model(baseline.expand(5, 6)).detach().gather(
        1, target[:, None])[:, 0]
    torch.testing.assert_close(attr.sum(1), expected, atol=1e-4, rtol=1e-4)
    assert delta.abs().max() < 1e-4
    torch.testing.assert_close(ig.convergence_delta(attr, x), delta)
    # a wrong attribution has a large delta
    assert (ig.convergence_delta(attr * 2, x) - delta).abs().max() > 1e-2


def test_integration_points_and_weights():
    for method in RULES:
        alphas, weights = integration_points(8, method)
        assert len(alphas) == len(weights) == 8
        assert abs(sum(weights) - 1) < 1e-12 and all(0 <= a <= 1 for a in alphas)
    assert integration_points(4, "riemann_left")[0] == [0.0, 0.25, 0.5, 0.75]
    assert integration_points(4, "riemann_right")[0] == [0.25, 0.5, 0.75, 1.0]
    assert integration_points(2, "riemann_middle")[0] == [0.25, 0.75]
    assert integration_points(3, "riemann_trapezoid") == ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    for n in (1, 2, 5, 64):
        nodes, weights = np.polynomial.legendre.leggauss(n)
        alphas, ws = integration_points(n, "gausslegendre")
        np.testing.assert_allclose(alphas, (nodes + 1) / 2, atol=1e-14)
        np.testing.assert_allclose(ws, weights / 2, atol=1e-14)
    with pytest.raises(ValueError, match="method"):
        integration_points(4, "simpson")
    with pytest.raises(ValueError, match="n_steps"):
        integration_points(0, "gausslegendre")
    with pytest.raises(ValueError, match="riemann_trapezoid"):
        integration_points(1, "riemann_trapezoid")


def test_argument_errors(linear):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="does not broadcast"):
        IntegratedGradients(linear).attribute(x, baseline=torch.zeros(3))
    with pytest.raises(TypeError, match="baseline"):
        IntegratedGradients(linear, baseline="zeros")
    with pytest.raises(ValueError, match="drop abs=True"):
        IntegratedGradients(linear).attribute(x, abs=True, return_convergence_delta=True)
    with pytest.raises(ValueError, match="method"):
        IntegratedGradients(linear, method="trapezoid")
    with pytest.raises(ValueError, match="attributions must be a tensor"):
        IntegratedGradients(linear).convergence_delta(torch.zeros(3), x)


def test_defaults():
    ig = IntegratedGradients(nn.Linear(2, 2))
    assert (ig.n_steps, ig.method, ig.baseline, ig.name) == (50, "gausslegendre", None, "integrated_gradients")


def test_batch_splits_equal_the_unchunked_result():
    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = IntegratedGradients(model, n_steps=7, batch_size=10_000).attribute(x, target=target)
    for rows in (1, 4, 5, 6, 7, 13):
        out = IntegratedGradients(model, n_steps=7, batch_size=rows).attribute(x, target=target)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget_rows", [1, 2, 4, 9])
def test_default_blocks_stay_within_the_element_budget_for_any_batch(budget_rows, monkeypatch):
    """Issue 19: the default splits the batch too (it used to hold at least one path point of the whole batch), with
    the same result; the clean forward that resolves ``target=None`` is split as well."""
    from lightning_lens.attribution import _batching

    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    reference = IntegratedGradients(model, n_steps=7, batch_size=10_000).attribute(x)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", budget_rows * x[0].numel())
    out, rows = rows_of_every_forward(model, lambda: IntegratedGradients(model, n_steps=7).attribute(x))
    assert max(rows) <= budget_rows and sum(rows) == 6 * 7 + 6
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
