"""Max-sensitivity with known answers: constant gradients, identity explanations, bounded noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_lens.attribution import Gradient, GradientXInput
from lightning_lens.evaluation import max_sensitivity


def _linear() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 16, generator=g))
        model[1].bias.copy_(torch.randn(3, generator=g))
    return model


def test_gradient_of_a_linear_model_has_zero_sensitivity():
    model = _linear()
    x = torch.rand(5, 1, 4, 4)
    result = max_sensitivity(Gradient(model), x, n_samples=8, radius=0.5)
    assert result.scores.tolist() == [0.0] * 5
    assert result.value == 0.0 and result.n_zero_maps == 0 and len(result) == 5


def test_gradient_x_input_sensitivity_is_bounded_by_the_radius():
    model = _linear()
    x = torch.rand(4, 1, 4, 4) + 0.5
    w = model[1].weight
    target = torch.tensor([0, 1, 2, 0])
    r = 0.1
    result = max_sensitivity(GradientXInput(model), x, target, radius=r, n_samples=20)
    # e(x + d) - e(x) = w_c * d, so ||.||_F <= r ||w_c|| and the relative change <= r ||w_c|| / ||w_c * x||
    base = w[target].view(4, 1, 4, 4) * x
    bound = r * w[target].norm(dim=1) / base.flatten(1).norm(dim=1)
    assert (result.scores > 0).all()
    assert (result.scores <= bound + 1e-6).all()
    assert (result.scores >= 0.3 * bound).all()  # 20 uniform draws get a good part of the way to the worst case


def test_identity_explanation_with_inf_norm_approaches_the_radius():
    x = torch.rand(3, 50)
    result = max_sensitivity(lambda model, inputs, target: inputs, x, radius=0.2, n_samples=30, norm="inf",
                             normalize=False)
    assert (result.scores <= 0.2 + 1e-6).all() and (result.scores > 0.19).all()  # max |d| over 1500 draws
    assert result.normalized is False and result.norm == "inf"


def test_chunked_equals_unchunked_and_seeded():
    model = _linear()
    x = torch.rand(3, 1, 4, 4) + 0.5
    state = torch.get_rng_state()
    full = max_sensitivity(GradientXInput(model), x, 0, n_samples=7, batch_size=1000, seed=2)
    for batch_size in (1, 4, 5):
        chunked = max_sensitivity(GradientXInput(model), x, 0, n_samples=7, batch_size=batch_size, seed=2)
        torch.testing.assert_close(chunked.scores, full.scores)
    other = max_sensitivity(GradientXInput(model), x, 0, n_samples=7, seed=3)
    assert not torch.equal(other.scores, full.scores)
    assert torch.equal(torch.get_rng_state(), state)


def test_target_is_fixed_to_the_clean_prediction():
    seen = []

    class Recorder:
        model = _linear()

        def attribute(self, inputs, target=None):
            seen.append(target.clone())
            return inputs * 1.0

    x = torch.rand(2, 1, 4, 4)
    max_sensitivity(Recorder(), x, n_samples=3)
    with torch.no_grad():
        predicted = Recorder.model(x).argmax(1)
    assert torch.equal(seen[0], predicted)
    assert torch.equal(seen[1], predicted.repeat_interleave(3))


def test_all_zero_explanations_are_excluded_and_counted():
    x = torch.rand(2, 4)
    result = max_sensitivity(lambda model, inputs, target: inputs * (inputs[:, :1] > 10), x, n_samples=2)
    assert result.n_zero_maps == 2 and math.isnan(result.value)


def test_modes_restored_and_inference_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    x = torch.rand(2, 1, 4, 4)
    expected = max_sensitivity(Gradient(model), x, 1, n_samples=4)
    assert all(m.training for m in model.modules())
    with torch.inference_mode():
        got = max_sensitivity(Gradient(model), x.clone(), 1, n_samples=4)
    torch.testing.assert_close(got.scores, expected.scores)
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    x = torch.rand(2, 4)
    with pytest.raises(TypeError, match="explainer: a method must be"):
        max_sensitivity(3, x)
    with pytest.raises(TypeError, match=r"explain functions take \(model, inputs, target\)"):
        max_sensitivity(lambda inputs, target: inputs, x)  # the old two-argument form
    with pytest.raises(ValueError, match="radius"):
        max_sensitivity(lambda m, i, t: i, x, radius=0)
    with pytest.raises(ValueError, match="n_samples"):
        max_sensitivity(lambda m, i, t: i, x, n_samples=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        max_sensitivity(lambda m, i, t: i, x, norm="l1")
    with pytest.raises(ValueError, match="explainer returned"):
        max_sensitivity(lambda m, i, t: i[:, :2], x, attributions=x)
