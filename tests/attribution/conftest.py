"""Fixtures: Captum's toy models (from ``lightning_lens.testing``, with published expected values) and a tiny CNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.testing.models import MultiLayerModel, OneConvReLUModel


class TinyCNN(nn.Module):
    """A small CNN for 1x8x8 inputs mixing BatchNorm, inplace/functional ReLUs, pooling and dropout."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
        )
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.features(x))
        return self.classifier(self.dropout(h.flatten(1)))


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)  # tests may seed the global RNG; library code never does
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5, generator=_seeded(1))
        model.features[1].running_var.uniform_(0.5, 2.0, generator=_seeded(2))
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 1, 8, 8, generator=_seeded(3))


@pytest.fixture
def one_conv() -> type[OneConvReLUModel]:
    return OneConvReLUModel


@pytest.fixture
def multi_layer() -> MultiLayerModel:
    return MultiLayerModel()


# small settings so every method runs fast in the cross-method tests
FAST_KWARGS = {
    "smoothgrad": {"n_samples": 6},
    "smoothgrad_squared": {"n_samples": 6},
    "vargrad": {"n_samples": 6},
    "integrated_gradients": {"n_steps": 5},
    "occlusion": {"window": 4, "stride": 2},
    "kernel_shap": {"n_samples": 24},  # 16 patch groups by default: sampled coalitions, not all 2^16
    "lime": {"n_samples": 24},
    "rise": {"n_masks": 16, "grid_size": 4},
}


@pytest.fixture
def fast_kwargs() -> dict:
    return FAST_KWARGS
