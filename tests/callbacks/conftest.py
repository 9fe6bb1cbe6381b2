"""Fixtures of the callback tests: small seeded data sets, trainers and readers.

Names say which data set they hold (``saliency_digits``, ``seven_segment_digits``, ``knn_digits``): several callbacks
are tested on different "digits". Data classes and concept helpers live in tests/_data.py and tests/_concepts.py
(shared with tests/interpretable_models).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import _concepts
import pytest
import torch
from _data import DigitsSplit, FlatDigits
from torch.utils.data import DataLoader, Subset

from lightning_lens.datasets import SevenSegmentDigits, SpuriousDigits


# ------------------------------------------------------------------------------------------ SaliencyMapCallback
@pytest.fixture
def saliency_fast() -> dict[str, Any]:
    """SaliencyMapCallback arguments for the four default methods at a cost tests can afford."""
    return {
        "methods": ["gradient", "smoothgrad", "integrated_gradients", "gradcam"],
        "method_kwargs": {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"n_steps": 8}},
        "num_probes": 4,
    }


@pytest.fixture(scope="session")
def saliency_digits() -> dict[str, SpuriousDigits]:
    return {"train": SpuriousDigits("train", seed=0), "val": SpuriousDigits("val", seed=0)}


@pytest.fixture
def saliency_loaders(saliency_digits):
    """(train, val) loaders over 96 training and 48 validation SpuriousDigits, deterministic (no workers)."""

    def make(n_train: int = 96, n_val: int = 48, batch_size: int = 16, shuffle: bool = True):
        gen = torch.Generator().manual_seed(0)
        train = DataLoader(Subset(saliency_digits["train"], range(n_train)), batch_size=batch_size, shuffle=shuffle,
                           generator=gen, num_workers=0)
        val = DataLoader(Subset(saliency_digits["val"], range(n_val)), batch_size=batch_size, num_workers=0)
        return train, val

    return make


@pytest.fixture
def trainer_kwargs(tmp_path):
    """Trainer arguments for a short, quiet CPU run; keyword overrides win."""

    def make(**overrides: Any) -> dict[str, Any]:
        kwargs = dict(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=str(tmp_path),
            num_sanity_val_steps=1,
            log_every_n_steps=1,
        )
        kwargs.update(overrides)
        return kwargs

    return make


@pytest.fixture
def read_tensorboard():
    return _read_tensorboard


def _read_tensorboard(log_dir: str):
    """EventAccumulator over the single event file under ``log_dir`` with nothing sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    ea = EventAccumulator(files[0], size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


# ------------------------------------------------------------------------------------------ ConceptMonitor
@pytest.fixture(scope="session")
def seven_segment_digits() -> dict[str, SevenSegmentDigits]:
    return {s: SevenSegmentDigits(s, seed=0) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def concept_helpers():
    """tests/_concepts.py: ``mlp_body``, ``trainer``, ``HIDDEN``, ``LR``."""
    return _concepts


# ------------------------------------------------------------------------------ NeighborGallery, KNNMemoryRefresh
@pytest.fixture(scope="session")
def knn_digits() -> DigitsSplit:
    return DigitsSplit()


# ------------------------------------------------------------------------------------------ RoutingMonitor
@pytest.fixture(scope="session")
def flat_digits_loaders():
    """(train, val) loaders over FlatDigits dict batches with sample indices."""

    def make(batch_size: int = 64):
        train = DataLoader(FlatDigits("train"), batch_size=batch_size, shuffle=True)
        val = DataLoader(FlatDigits("val"), batch_size=batch_size)
        return train, val

    return make
