"""Toy models with known attributions (several reproduce Captum's test models, whose expected values we check)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class OneConv(nn.Module):
    """Captum's ``BasicModel_ConvNet_One_Conv``: ones 3x3 conv (bias -50, -75), ReLU, fixed linear head, ReLU."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        return self.relu2(self.fc1(x.view(-1, 8)))


class MultiLayer(nn.Module):
    """Captum's ``BasicModel_MultiLayer``: identity, ones(4,3) + bias (-10, 1, 1, 1), ReLU, ones(2,4) + bias (-1, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear0 = nn.Linear(3, 3)
        self.linear1 = nn.Linear(3, 4)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.linear0.weight.copy_(torch.eye(3))
            self.linear0.bias.zero_()
            self.linear1.weight.fill_(1.0)
            self.linear1.bias.copy_(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
            self.linear2.weight.fill_(1.0)
            self.linear2.bias.copy_(torch.tensor([-1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(self.linear0(x))))


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
def one_conv() -> type[OneConv]:
    return OneConv


@pytest.fixture
def multi_layer() -> MultiLayer:
    return MultiLayer()


# small settings so every method runs fast in the cross-method tests
FAST_KWARGS = {
    "smoothgrad": {"n_samples": 6},
    "smoothgrad_squared": {"n_samples": 6},
    "vargrad": {"n_samples": 6},
    "integrated_gradients": {"n_steps": 5},
    "occlusion": {"window": 4, "stride": 2},
}


@pytest.fixture
def fast_kwargs() -> dict:
    return FAST_KWARGS
