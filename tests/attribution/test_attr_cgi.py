"""Competitive Gradient x Input: hand-computed values on a 3-class linear model, and the rule on a ReLU net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import CompetitiveGradientXInput, GradientXInput, get_method


def linear3() -> nn.Module:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [2.0, 1.0, -1.0], [-1.0, 3.0, 0.5]]))
        model.bias.copy_(torch.tensor([5.0, -5.0, 0.0]))  # biases do not enter Gradient x Input
    return model


def test_hand_computed_values_on_a_linear_model():
    x = torch.tensor([[1.0, 1.0, 2.0], [-1.0, 2.0, 1.0]])
    # Gradient x Input S_k(i) = w_ki x_i.
    # example 0: class 0 [1, -2, 1], class 1 [2, 1, -2], class 2 [-1, 3, 1]
    #   max per feature [2, 3, 1] (feature 2: tie of classes 0 and 2), min per feature [-1, -2, -2]
    # example 1: class 0 [-1, -4, 0.5], class 1 [-2, 2, -1], class 2 [1, 6, 0.5]
    #   max [1, 6, 0.5] (tie 0 / 2 at feature 2), min [-2, -4, -1]
    expected = {
        0: torch.tensor([[0.0, -2.0, 1.0], [0.0, -4.0, 0.5]]),
        1: torch.tensor([[2.0, 0.0, -2.0], [-2.0, 0.0, -1.0]]),
        2: torch.tensor([[-1.0, 3.0, 1.0], [1.0, 6.0, 0.5]]),
    }
    method = CompetitiveGradientXInput(linear3())
    for label, values in expected.items():
        torch.testing.assert_close(method.attribute(x, target=label), values)
    torch.testing.assert_close(method.attribute(x, target=torch.tensor([1, 2])),
                               torch.stack([expected[1][0], expected[2][1]]))


def test_the_rule_on_a_relu_net_and_chunking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).eval()
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 1])
    per_class = torch.stack([GradientXInput(model).attribute(x, target=c) for c in range(4)])  # (C, B, ...)
    own = per_class[target, torch.arange(3)]
    keep = ((own > 0) & (own >= per_class.max(0).values)) | ((own < 0) & (own <= per_class.min(0).values))
    expected = torch.where(keep, own, torch.zeros_like(own))
    for batch_size in (None, 1, 2, 5, 1000):  # blocks of one class for part of the batch up to everything at once
        out = CompetitiveGradientXInput(model, batch_size=batch_size).attribute(x, target=target)
        torch.testing.assert_close(out, expected)
    assert (expected != 0).any() and (expected == 0).any()


def test_registry_and_errors():
    method = get_method("competitive_gradient_x_input", linear3(), batch_size=4)
    assert method.name == "cgi" and method.batch_size == 4
    with pytest.raises(ValueError, match="batch_size"):
        CompetitiveGradientXInput(linear3(), batch_size=0)
    with pytest.raises(TypeError, match="n_samples"):
        method.attribute(torch.rand(1, 3), target=0, n_samples=3)
