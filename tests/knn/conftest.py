import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_lens.interpretable_models import KNNClassifier, KNNHead


class DigitsSplit:
    """sklearn digits (8x8 -> 64 features in [0, 1]): train / calibration / test, stratified, seeded."""

    def __init__(self, seed: int = 0):
        d = load_digits()
        self.x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        self.y = torch.tensor(d.target)
        tr, rest = train_test_split(np.arange(len(self.y)), test_size=0.3, random_state=seed, stratify=d.target)
        cal, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=d.target[rest])
        self.train, self.cal, self.test = (torch.tensor(a) for a in (tr, cal, te))


@pytest.fixture(scope="session")
def digits():
    return DigitsSplit()


@pytest.fixture(scope="session")
def trained_knn(digits):
    """An MLP encoder trained through a kNN head (in-place memory, leave-one-out), 12 epochs."""
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
