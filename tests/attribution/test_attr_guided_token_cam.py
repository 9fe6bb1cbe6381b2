"""Guided Grad-CAM on patch tokens (token_grid / prefix_tokens): hand values on a one-dimensional token model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import GradCAM, GuidedBackprop, GuidedGradCAM


class PatchTokens(nn.Module):
    """2x2 patches of a 4x4 image -> one feature each (0.5 x the patch sum), a [CLS] token of 0 in front; the score is
    2 x the sum of ReLU(patch tokens), its negative the other logit."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.embed.weight.fill_(0.5)
        self.tokens = nn.Identity()  # (B, 1 + 4, 1): the layer the CAM reads
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(b, 4, 4)  # row-major patches
        tokens = self.tokens(torch.cat([torch.zeros(b, 1, 1), self.embed(patches)], dim=1))
        score = 2.0 * self.relu(tokens[:, 1:, 0]).sum(1)
        return torch.stack([score, -score], dim=1)


def _image() -> torch.Tensor:
    # patch sums 4, -2, 2, 6: tokens 2, -1, 1, 3 (the second patch is cut by the ReLU)
    x = torch.empty(1, 1, 4, 4)
    x[..., :2, :2], x[..., :2, 2:], x[..., 2:, :2], x[..., 2:, 2:] = 1.0, -0.5, 0.5, 1.5
    return x


def test_guided_gradcam_on_a_token_grid_hand_values():
    model, x = PatchTokens(), _image()
    # CAM: gradients at the tokens 2, 0, 2, 2 -> alpha 1.5; ReLU(1.5 x tokens) on the 2x2 grid = [[3, 0], [1.5, 4.5]],
    # upsampled bilinearly (align_corners=False: weights 1, .75/.25, .25/.75, 1). Guided backprop at the pixels:
    # 2 x 0.5 = 1 where the patch's token is positive, 0 in the second patch.
    expected = torch.tensor([[3.0, 2.25, 0.0, 0.0],
                             [2.625, 2.25, 0.0, 0.0],
                             [1.875, 2.25, 3.0, 3.375],
                             [1.5, 2.25, 3.75, 4.5]])
    maps = GuidedGradCAM(model, layer="tokens", token_grid=(2, 2), prefix_tokens=1).attribute(x, target=0)
    torch.testing.assert_close(maps[0, 0], expected)
    # another grid for the same tokens: a 1x4 row, stretched over the height, proves the arguments reach the CAM
    row = GuidedGradCAM(model, layer="tokens", token_grid=(1, 4), prefix_tokens=1).attribute(x, target=0)
    torch.testing.assert_close(row[0, 0], torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 2 + [[3.0, 0.0, 1.5, 4.5]] * 2))


def test_guided_gradcam_on_tokens_is_guided_backprop_times_the_token_gradcam():
    model = PatchTokens()
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    guided = GuidedGradCAM(model, layer="tokens", token_grid=(2, 2), prefix_tokens=1).attribute(x, target=0)
    cam = GradCAM(model, layer="tokens", token_grid=(2, 2), prefix_tokens=1).attribute(x, target=0)
    torch.testing.assert_close(guided, GuidedBackprop(model).attribute(x, target=0) * cam)


def test_guided_gradcam_token_grid_errors_name_the_arguments():
    with pytest.raises((TypeError, ValueError), match="token_grid"):
        GuidedGradCAM(PatchTokens(), layer="tokens", token_grid=(2, 0))
    with pytest.raises(ValueError, match="token_grid|prefix_tokens"):
        GuidedGradCAM(PatchTokens(), layer="tokens", token_grid=(3, 3), prefix_tokens=1).attribute(_image(), 0)
