"""Grad-CAM and Guided Grad-CAM: Captum's oracles, a hand-computed multi-channel case, layer selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution import GradCAM, GuidedBackprop, GuidedGradCAM, HiResCAM
from lightning_lens.attribution.gradcam import last_spatial_layer

X = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
CONV1_ORACLE = torch.tensor([[[[11.25, 13.5], [20.25, 22.5]]]])
RELU1_ORACLE = torch.tensor([[[[0.0, 4.0], [28.0, 32.5]]]])


@pytest.mark.parametrize("inplace", [False, True])
def test_captum_oracles_at_layer_resolution(one_conv, inplace):
    model = one_conv(inplace=inplace)
    torch.testing.assert_close(GradCAM(model, "conv1", upsample=False).attribute(X, target=0), CONV1_ORACLE)
    torch.testing.assert_close(GradCAM(model, model.conv1, upsample=False).attribute(X, target=0), CONV1_ORACLE)
    torch.testing.assert_close(GradCAM(model, "relu1", upsample=False).attribute(X, target=0), RELU1_ORACLE)


def test_upsampling_is_bilinear_to_the_input_size(one_conv):
    model = one_conv()
    expected = F.interpolate(CONV1_ORACLE, size=(4, 4), mode="bilinear", align_corners=False)
    out = GradCAM(model, "conv1").attribute(X, target=0)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(GradCAM(model, "conv1").attribute(X, target=0, upsample=False), CONV1_ORACLE)


class GapHead(nn.Module):
    """Activations A = x (through an identity layer), logits = v @ mean_spatial(A): alpha_k = v_ck / (H W)."""

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.v = v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer(x)
        return a.mean(dim=(2, 3)) @ self.v.T


def test_hand_computed_multichannel_cam():
    v = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])  # 2 classes, 3 channels
    x = torch.randn(2, 3, 3, 5, generator=torch.Generator().manual_seed(0))
    for c in (0, 1):
        expected = (v[c].view(1, 3, 1, 1) / 15 * x).sum(1, keepdim=True)
        out = GradCAM(GapHead(v), "layer", upsample=False, relu=False).attribute(x, target=c)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(GradCAM(GapHead(v), "layer", upsample=False).attribute(x, target=c),
                                   expected.clamp(min=0))
        # at the input resolution already: upsampling is the identity
        torch.testing.assert_close(GradCAM(GapHead(v), "layer").attribute(x, target=c), expected.clamp(min=0))


def test_default_layer_is_the_last_module_with_a_4d_output(tiny_cnn, images):
    cam = GradCAM(tiny_cnn)
    out = cam.attribute(images, target=0)
    assert cam.layer_name == "features" and cam.layer is tiny_cnn.features
    torch.testing.assert_close(out, GradCAM(tiny_cnn, "features").attribute(images, target=0))
    assert last_spatial_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
                              torch.rand(1, 1, 4, 4))[0] == "1"


def test_dotted_layer_names_and_clear_errors(tiny_cnn, images):
    assert GradCAM(tiny_cnn, "features.4").attribute(images, target=0, upsample=False).shape == (5, 1, 4, 4)
    with pytest.raises(ValueError, match="features.9.*available names: 'features'"):
        GradCAM(tiny_cnn, "features.9")
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(tiny_cnn, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"layer=None .* no such submodule \(models such as an MLP .*pass layer="):
        GradCAM(nn.Sequential(nn.Linear(3, 2))).attribute(torch.rand(2, 3))
    with pytest.raises(ValueError, match="Grad-CAM needs a"):
        GradCAM(tiny_cnn, "classifier").attribute(images)


def test_a_layer_that_runs_twice_is_rejected():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).flatten(1))

    with pytest.raises(ValueError, match="ran 2 times"):
        GradCAM(Twice(), "conv").attribute(torch.rand(2, 1, 4, 4))


def test_a_layer_off_the_path_to_the_logits_is_rejected():
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.side = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(32, 2)

        def forward(self, x):
            self.side(x)  # computed but unused, e.g. an auxiliary head
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(ValueError, match="does not depend on the output of layer 'side'"):
        GradCAM(SideBranch(), "side").attribute(torch.rand(2, 1, 4, 4))


def test_frozen_layers_before_the_target_layer_still_work(one_conv):
    model = one_conv()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(GradCAM(model, "conv1", upsample=False).attribute(X, target=0), CONV1_ORACLE)


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_gradcam_is_guided_backprop_times_the_upsampled_cam(one_conv, inplace):
    model = one_conv(inplace=inplace)
    gbp = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 2.0], [1.0, 3.0, 3.0, 2.0], [1.0, 2.0, 2.0, 1.0]])
    cam = F.interpolate(CONV1_ORACLE, size=(4, 4), mode="bilinear", align_corners=False)
    out = GuidedGradCAM(model, "conv1").attribute(X, target=0)
    torch.testing.assert_close(out, gbp.view(1, 1, 4, 4) * cam)


def test_guided_gradcam_broadcasts_over_channels(tiny_cnn):
    x = torch.rand(3, 1, 8, 8).repeat(1, 1, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = GuidedGradCAM(model, "1").attribute(x, target=1)
    expected = GuidedBackprop(model).attribute(x, target=1) * GradCAM(model, "1").attribute(x, target=1)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)


class FlatHead(nn.Module):
    """A = x through an identity layer, logits = W flatten(A) + b: HiResCAM = sum_k W_c,k * A_k exactly."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).flatten(1))


def test_hirescam_is_gradient_times_activation_and_sums_to_the_score():
    from lightning_lens.attribution import HiResCAM, get_method

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, 3, generator=gen)
    w, b = torch.randn(4, 18, generator=gen), torch.randn(4, generator=gen)
    model = FlatHead(w, b)
    target = torch.tensor([0, 3, 1])
    cam = HiResCAM(model, "layer", upsample=False, relu=False).attribute(x, target=target)
    expected = (w[target].view(3, 2, 3, 3) * x).sum(1, keepdim=True)
    torch.testing.assert_close(cam, expected)
    torch.testing.assert_close(cam.sum((1, 2, 3)), model(x).gather(1, target[:, None]).squeeze(1) - b[target])
    relu_cam = get_method("hirescam", model, layer="layer", upsample=False).attribute(x, target=target)
    torch.testing.assert_close(relu_cam, expected.clamp(min=0))


def _gap_cnn() -> nn.Sequential:
    """A CNN whose last 4-D output is a global average pool (1 x 1), as ResNets end."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("cls", [GradCAM, HiResCAM, GuidedGradCAM])
def test_default_layer_skips_a_global_average_pool(cls):
    # regression: layer=None picked the pool (1 x 1 output) and returned a constant map without a word
    model = _gap_cnn()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2])
    torch.testing.assert_close(cls(model).attribute(x, target=target), cls(model, "2").attribute(x, target=target))
    signed = cls(model, relu=False).attribute(x, target=target)  # without the ReLU, which may zero a whole map
    torch.testing.assert_close(signed, cls(model, "2", relu=False).attribute(x, target=target))
    assert bool((signed.flatten(1).std(dim=1) > 1e-3 * signed.abs().amax()).all())  # not one constant per image
    chosen = cls(model)
    chosen.attribute(x, target=0)
    assert (chosen.gradcam if cls is GuidedGradCAM else chosen).layer_name == "2"


def test_no_spatial_layer_is_a_value_error_naming_layer():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer=None .*MLP or a transformer.*pass layer=<module or dotted name>"):
        GradCAM(mlp).attribute(torch.rand(2, 3, 2, 2))
    only_pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"only modules with a 1 x 1 spatial output, e.g. '0'.*pass layer="):
        HiResCAM(only_pooled).attribute(torch.rand(2, 3, 4, 4))
