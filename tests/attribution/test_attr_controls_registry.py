"""The controls (edge detector, random maps) and the method registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _attribution_methods import NOT_ON_A_CNN
from lightning_lens.attribution import (
    EdgeDetector,
    Gradient,
    IntegratedGradients,
    RandomMap,
    SmoothGrad,
    available_methods,
    get_method,
    register_method,
)
from lightning_lens.attribution import registry


def test_edge_detector_on_a_step_image():
    x = torch.zeros(1, 2, 5, 6)
    x[:, 0, :, 3:] = 1.0  # vertical step in channel 0
    x[:, 1, 2:, :] = 2.0  # horizontal step of height 2 in channel 1
    out = EdgeDetector().attribute(x)
    expected0 = torch.zeros(5, 6)
    expected0[:, 2:4] = 4.0  # Sobel response next to the step, replicated borders give no edge
    expected1 = torch.zeros(5, 6)
    expected1[1:3, :] = 8.0
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[0, 1], expected1)
    assert out.shape == x.shape


def test_edge_detector_ignores_the_model_and_target():
    x = torch.rand(2, 3, 6, 6)
    a = EdgeDetector(nn.Linear(2, 2)).attribute(x, target=1)
    assert torch.equal(a, EdgeDetector().attribute(x))
    # diagonal gradient: magnitude of (gx, gy) = sqrt(2) * 8 * slope for a plane x + y
    ramp = (torch.arange(6.0).view(1, 6) + torch.arange(6.0).view(6, 1)).view(1, 1, 6, 6)
    torch.testing.assert_close(EdgeDetector().attribute(ramp)[0, 0, 1:-1, 1:-1], torch.full((4, 4), 8 * 2**0.5))
    with pytest.raises(ValueError, match="height, width"):
        EdgeDetector().attribute(torch.rand(2, 5))


def test_random_map_is_reproducible_and_leaves_the_global_rng_alone():
    x = torch.zeros(3, 1, 4, 4)
    state = torch.get_rng_state()
    a, b = RandomMap(seed=5).attribute(x), RandomMap(seed=5).attribute(x)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, RandomMap(seed=6).attribute(x))
    assert not torch.equal(a[0], a[1])  # examples differ within a batch
    fresh = RandomMap(seed=None)
    assert not torch.equal(fresh.attribute(x), fresh.attribute(x))
    assert torch.equal(torch.get_rng_state(), state)
    assert 0.5 < a.std() < 1.5 and (RandomMap(seed=5).attribute(x, abs=True) == a.abs()).all()


def test_registry_builds_every_method_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    x = torch.rand(2, 1, 4, 4)
    names = available_methods()
    assert names[:3] == ["gradient", "gradient_x_input", "smoothgrad"]
    for name in names:
        method = get_method(name, model)
        assert method.name == name
        if name not in NOT_ON_A_CNN:  # the attention methods need a model with attention
            assert method.attribute(x).shape[0] == 2
    assert isinstance(get_method("saliency", model), Gradient)
    assert isinstance(get_method("IG", model), IntegratedGradients)
    assert get_method("smoothgrad_squared", model).variant == "squared"
    assert get_method("Integrated-Gradients", model, n_steps=7).n_steps == 7


def test_registry_errors_and_registration(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"unknown attribution method 'xrai'; available: \['gradient'"):
        get_method("xrai", model)
    with pytest.raises(TypeError, match="get_method\\('smoothgrad'"):
        get_method("smoothgrad", model, n_steps=5)
    register_method("noisy_gradient", lambda m, **kw: SmoothGrad(m, n_samples=3, **kw))
    assert "noisy_gradient" in available_methods()
    assert get_method("noisy_gradient", model).n_samples == 3
    with pytest.raises(ValueError, match="already registered"):
        register_method("gradient", Gradient)
    register_method("gradient", Gradient, overwrite=True)
    with pytest.raises(TypeError, match="callable"):
        register_method("x", 3)
