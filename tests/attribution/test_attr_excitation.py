"""Excitation Backprop (MWP) and its contrastive variant (c-MWP): hand-computed probabilities on a toy net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import ExcitationBackprop, get_method

X = torch.tensor([[1.0, 2.0]])


def toy_net() -> nn.Module:
    """x = (1, 2) -> Linear(2, 2) -> ReLU -> Linear(2, 2).

    layer 1: w = [[1, -0.5], [2, 1]], b = [0.5, -1] -> a = relu([0.5, 3]) = [0.5, 3]
    layer 2: class 0 w = [1, 2]; class 1 w = [1, -2]
    """
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -0.5], [2.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0], [1.0, -2.0]]))
    return net


def test_mwp_by_hand():
    # class 0: P(a_j) = a_j w_j+ / sum = [0.5, 6] / 6.5
    top = torch.tensor([0.5, 6.0]) / 6.5
    # unit 0: a_i w_i+ = [1 * 1, 2 * 0] -> [1, 0]; unit 1: [2, 2] / 4 (the bias is ignored)
    expected = torch.tensor([1.0, 0.0]) * top[0] + torch.tensor([0.5, 0.5]) * top[1]
    out = ExcitationBackprop(toy_net()).attribute(X, target=0)[0]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))  # a probability distribution


def test_contrastive_mwp_by_hand():
    # class 1, w = [1, -2]: the target's MWP passes only through unit 0 (w+ = [1, 0]): P = [1, 0] at the hidden layer,
    # then [1, 0] at the input. The dual unit has w = [-1, 2]: P = [0, 1] hidden, then unit 1's [0.5, 0.5].
    out = ExcitationBackprop(toy_net(), contrastive=True).attribute(X, target=1)[0]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]) - torch.tensor([0.5, 0.5]))
    # class 0, w = [1, 2]: the dual [-1, -2] has no excitatory weight, so c-MWP equals MWP
    torch.testing.assert_close(ExcitationBackprop(toy_net(), contrastive=True).attribute(X, target=0),
                               ExcitationBackprop(toy_net()).attribute(X, target=0))


def test_maps_are_non_negative_even_for_signed_inputs(tiny_cnn, images):
    signed = images - 0.5
    for x in (images, signed):
        maps = ExcitationBackprop(tiny_cnn).attribute(x, target=torch.tensor([0, 1, 2, 0, 1]))
        assert (maps >= 0).all() and maps.flatten(1).sum(1).max() <= 1.0 + 1e-5


def test_contrastive_differs_and_is_class_specific(tiny_cnn, images):
    plain = ExcitationBackprop(tiny_cnn)
    contrastive = ExcitationBackprop(tiny_cnn, contrastive=True)
    assert contrastive.name == "contrastive_excitation_backprop" and plain.name == "excitation_backprop"
    c0, c1 = contrastive.attribute(images, target=0), contrastive.attribute(images, target=1)
    assert not torch.allclose(c0, plain.attribute(images, target=0), atol=1e-4)
    assert (c0 < 0).any() and (c0 > 0).any()  # evidence for and against
    # the two classes' contrastive maps are far apart (relative difference), more than the plain maps are
    rel = lambda a, b: float((a - b).norm() / (a.norm() + b.norm()))  # noqa: E731
    assert rel(c0, c1) > rel(plain.attribute(images, target=0), plain.attribute(images, target=1))


def test_contrastive_needs_logits_from_the_last_layer():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = toy_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.net(x)

    with pytest.raises(ValueError, match="contrastive=True needs a model whose logits are the output"):
        ExcitationBackprop(Scaled(), contrastive=True).attribute(X, target=0)
    assert ExcitationBackprop(Scaled()).attribute(X, target=0).shape == (1, 2)
    # an output_fn that picks the last layer's output keeps the dual unit; one computing new scores names the fix
    net = toy_net()
    picked = ExcitationBackprop(dict_model(net), contrastive=True, output_fn=lambda out: out["logits"])
    torch.testing.assert_close(picked.attribute(X, target=0), ExcitationBackprop(net, contrastive=True).attribute(
        X, target=0))
    computed = ExcitationBackprop(dict_model(net), contrastive=True, output_fn=lambda out: 2.0 * out["logits"])
    with pytest.raises(ValueError, match=r"or an output_fn that returns that layer's output itself"):
        computed.attribute(X, target=0)


def dict_model(net: nn.Module) -> nn.Module:
    """``net`` returning ``{"logits": net(x)}``."""

    class AsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.net(x)}

    return AsDict()


def test_registry_names():
    assert get_method("c_mwp", toy_net()).contrastive
    assert not get_method("excitation_backprop", toy_net()).contrastive
    with pytest.raises(TypeError, match="contrastive must be a bool"):
        ExcitationBackprop(toy_net(), contrastive="yes")
