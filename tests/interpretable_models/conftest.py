"""Fixtures of the interpretable model tests; the trained joint concept bottleneck model is built once per session.

Names say which data set they hold (``seven_segment_digits``, ``knn_digits``). Data classes and concept helpers live
in tests/_data.py and tests/_concepts.py (shared with tests/callbacks).
"""

from __future__ import annotations

import _concepts
import pytest
import torch
import torch.nn.functional as F
from _data import DigitsSplit
from torch import nn

from lightning_lens.datasets import SevenSegmentDigits
from lightning_lens.interpretable_models import KNNClassifier, KNNHead


# ------------------------------------------------------------------------------------------ concept bottleneck
@pytest.fixture(scope="session")
def seven_segment_digits() -> dict[str, SevenSegmentDigits]:
    return {s: SevenSegmentDigits(s, seed=0) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def concept_helpers():
    """tests/_concepts.py: ``mlp_body``, ``trainer``, ``HIDDEN``, ``LR``."""
    return _concepts


@pytest.fixture(scope="session")
def joint_run(seven_segment_digits, tmp_path_factory):
    """(trained joint ConceptBottleneckModule in eval mode, baseline test accuracy), both seeded, same loop."""
    return _concepts.train_joint_run(seven_segment_digits, tmp_path_factory)


# ------------------------------------------------------------------------------------------ kNN head
@pytest.fixture(scope="session")
def knn_digits() -> DigitsSplit:
    return DigitsSplit()


@pytest.fixture(scope="session")
def trained_knn(knn_digits):
    """An MLP encoder trained through a kNN head (in-place memory, leave-one-out), 12 epochs."""
    digits = knn_digits
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    n = len(digits.train)
    model = KNNClassifier(enc, KNNHead(64, 10, k=10, temperature=0.1, memory_size=n))
    xs, ys, ids = digits.x[digits.train], digits.y[digits.train], torch.arange(n)
    opt = torch.optim.Adam(enc.parameters(), 1e-3)
    with torch.no_grad():
        model.head.write(enc(xs), ys, ids)
    for _ in range(12):
        model.train()
        for b in torch.randperm(n, generator=gen).split(64):
            loss = F.nll_loss(model(xs[b], labels=ys[b], ids=ids[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model.head.write(enc(xs), ys, ids)
    return model
