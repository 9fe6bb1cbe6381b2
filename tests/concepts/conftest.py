"""Shared data and one trained joint concept bottleneck model (trained once per session: it is the slow part)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import LightningModule, Trainer, pl
from lightning_lens.datasets import SevenSegmentDigits
from lightning_lens.interpretable_models import ConceptBottleneckModule

EPOCHS = 30
LR = 3e-3  # a linear c -> y head on probabilities needs large weights; at 1e-3 Adam reaches them in ~60 epochs
HIDDEN = 128


def mlp_body(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def trainer(tmp_path, max_epochs: int, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kwargs)


class Baseline(LightningModule):
    """The same backbone with a plain linear classifier: no bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp_body(), nn.Linear(HIDDEN, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


@pytest.fixture(scope="session")
def digits():
    return {s: SevenSegmentDigits(s, seed=0) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def helpers():
    """Plain functions for tests (conftest modules cannot be imported under --import-mode=importlib)."""
    return type("Helpers", (), {"mlp_body": staticmethod(mlp_body), "trainer": staticmethod(trainer),
                                "HIDDEN": HIDDEN, "LR": LR})


def _fit(module, train_ds, tmp_path, seed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, EPOCHS, limit_val_batches=0).fit(
            module, DataLoader(train_ds, batch_size=64, shuffle=True))


@pytest.fixture(scope="session")
def joint_run(digits, tmp_path_factory):
    """(trained joint ConceptBottleneckModule in eval mode, baseline test accuracy), both seeded, same loop."""
    pl.seed_everything(0, verbose=False)
    module = ConceptBottleneckModule(concept_encoder=nn.Sequential(mlp_body(), nn.Linear(HIDDEN, 7)),
                                     num_concepts=7, num_classes=10, concept_names=digits["train"].concept_names,
                                     training="joint", concept_loss_weight=1.0, lr=LR)
    _fit(module, digits["train"], tmp_path_factory.mktemp("joint"), seed=0)
    pl.seed_everything(0, verbose=False)
    base = Baseline()
    _fit(base, digits["train"], tmp_path_factory.mktemp("base"), seed=0)
    base.eval()
    test = digits["test"]
    with torch.no_grad():
        base_acc = (base.net(test.images).argmax(1) == test.labels).float().mean().item()
    module.eval()
    return module, base_acc
