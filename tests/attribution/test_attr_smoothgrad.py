"""SmoothGrad, SmoothGrad-Squared and VarGrad: exact values on linear models, noise statistics, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import Gradient, SmoothGrad, VarGrad

from _attribution_helpers import conv_model_5x5, rows_of_every_forward


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def test_smoothgrad_of_a_linear_model_is_the_weight(linear):
    x = torch.randn(4, 6)
    out = SmoothGrad(linear, n_samples=13, noise_level=0.3).attribute(x, target=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(out, linear.weight.detach()[[0, 1, 2, 0]], rtol=1e-6, atol=1e-7)


def test_smoothgrad_squared_of_a_linear_model_is_the_squared_weight(linear):
    x = torch.randn(4, 6)
    out = SmoothGrad(linear, n_samples=13, variant="squared").attribute(x, target=2)
    torch.testing.assert_close(out, linear.weight.detach()[2].square().expand(4, 6), rtol=1e-6, atol=1e-7)


def test_vargrad_of_a_linear_model_is_zero(linear):
    out = VarGrad(linear, n_samples=13, batch_size=5).attribute(torch.randn(4, 6), target=1)
    assert out.abs().max() < 1e-12


class HalfSquaredNorm(nn.Module):
    """f(x) = |x|^2 / 2 (and its negative as a second class): the gradient is x itself, so noise shows through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 0.5 * x.flatten(1).square().sum(1)
        return torch.stack([s, -s], dim=1)


def test_noise_sd_is_noise_level_times_each_examples_range():
    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 10.0  # ranges 1 and 10
    level = 0.2
    var = VarGrad(HalfSquaredNorm(), n_samples=200, noise_level=level).attribute(x, target=0)
    mean = SmoothGrad(HalfSquaredNorm(), n_samples=200, noise_level=level).attribute(x, target=0)
    for i, value_range in enumerate((1.0, 10.0)):
        sd = var[i].mean().sqrt().item()
        assert 0.95 * level * value_range < sd < 1.05 * level * value_range
        # the mean gradient converges to x (here ~0 noise mean), within a few standard errors
        assert (mean[i] - x[i]).abs().max() < 5 * level * value_range / 200**0.5
    squared = SmoothGrad(HalfSquaredNorm(), n_samples=200, noise_level=level, variant="squared").attribute(x, target=0)
    torch.testing.assert_close(squared, var + mean.square(), rtol=1e-4, atol=1e-6)


def test_one_noise_free_sample_is_the_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(3, 5)
    torch.testing.assert_close(SmoothGrad(model, n_samples=1, noise_level=0.0).attribute(x, target=1),
                               Gradient(model).attribute(x, target=1))


def test_target_none_is_resolved_once_on_the_clean_input():
    class SignOfSum(nn.Module):
        def forward(self, x):
            s = x.sum(1)
            return torch.stack([s, -s], dim=1)

    x = torch.tensor([[0.01, -0.005, 0.0, 0.001]])  # clean prediction: class 0; noise flips it half the time
    out = SmoothGrad(SignOfSum(), n_samples=40, noise_level=1.0).attribute(x)
    # resolved per noisy sample, the +1/-1 gradients would average to about 0
    torch.testing.assert_close(out, torch.ones(1, 4))


def test_seeded_noise_is_reproducible_and_seed_none_is_fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(3, 5)
    a = SmoothGrad(model, n_samples=4, seed=3).attribute(x, target=0)
    b = SmoothGrad(model, n_samples=4, seed=3).attribute(x, target=0)
    c = SmoothGrad(model, n_samples=4, seed=4).attribute(x, target=0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a, SmoothGrad(model, n_samples=4, seed=4).attribute(x, target=0, seed=3))
    fresh = SmoothGrad(model, n_samples=4, seed=None)
    state = torch.get_rng_state()
    assert not torch.allclose(fresh.attribute(x, target=0), fresh.attribute(x, target=0))
    assert torch.equal(torch.get_rng_state(), state)


def test_names_and_options():
    model = nn.Linear(3, 2)
    assert SmoothGrad(model).name == "smoothgrad"
    assert SmoothGrad(model, variant="squared").name == "smoothgrad_squared"
    assert VarGrad(model).name == "vargrad" and VarGrad(model).variant == "var"
    sg = SmoothGrad(model)
    assert (sg.n_samples, sg.noise_level, sg.seed) == (50, 0.15, 0)
    with pytest.raises(ValueError, match="variant"):
        SmoothGrad(model, variant="median")
    with pytest.raises(ValueError, match="n_samples"):
        SmoothGrad(model, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGrad(model, noise_level=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        SmoothGrad(model, batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        SmoothGrad(model, seed=1.5)


def test_per_call_options_override_the_constructor():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    torch.testing.assert_close(SmoothGrad(model).attribute(x, target=0, n_samples=5, noise_level=0.3),
                               SmoothGrad(model, n_samples=5, noise_level=0.3).attribute(x, target=0))


@pytest.mark.parametrize("variant", ["mean", "squared", "var"])
def test_batch_splits_equal_the_unchunked_result(variant):
    """Blocks holding one sample of a slice of the examples (batch_size < batch, not a divisor of it) see the same
    noise as whole-batch blocks: each sample's noise is drawn for the whole batch and sliced."""
    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = SmoothGrad(model, n_samples=5, variant=variant, batch_size=10_000).attribute(x, target=target)
    for rows in (1, 4, 5, 6, 7, 13):
        out = SmoothGrad(model, n_samples=5, variant=variant, batch_size=rows).attribute(x, target=target)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget_rows", [1, 2, 4, 9])
def test_default_blocks_stay_within_the_element_budget_for_any_batch(budget_rows, monkeypatch):
    """Issue 19: the default split the batch too (it used to hold at least one sample of the whole batch), with the
    same result; the clean forward that resolves ``target=None`` is split as well."""
    from lightning_lens.attribution import _batching

    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    reference = SmoothGrad(model, n_samples=5, batch_size=10_000).attribute(x)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", budget_rows * x[0].numel())
    out, rows = rows_of_every_forward(model, lambda: SmoothGrad(model, n_samples=5).attribute(x))
    assert max(rows) <= budget_rows and sum(rows) == 6 * 5 + 6
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
