"""Data sets shared by test folders, importable as ``_data`` (tests/conftest.py puts tests/ on ``sys.path``).

Fixtures wrap these in tests/callbacks/conftest.py and tests/interpretable_models/conftest.py; the DDP scripts, which
run outside pytest, import them directly.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from lightning_lens.datasets import SpuriousDigits


class DigitsSplit:
    """sklearn digits (8x8 -> 64 features in [0, 1]): train / calibration / test, stratified, seeded."""

    def __init__(self, seed: int = 0):
        d = load_digits()
        self.x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        self.y = torch.tensor(d.target)
        tr, rest = train_test_split(np.arange(len(self.y)), test_size=0.3, random_state=seed, stratify=d.target)
        cal, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=d.target[rest])
        self.train, self.cal, self.test = (torch.tensor(a) for a in (tr, cal, te))


class FlatDigits(Dataset):
    """sklearn's 8x8 digits, flattened and scaled to [0, 1]: items ``{"x": (64,), "label": int, "index": int}``."""

    def __init__(self, split: str) -> None:
        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        cut = int(0.7 * len(y))
        idx = order[:cut] if split == "train" else order[cut:]
        self.x, self.y, self.ids = x[idx], y[idx], idx

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.y[i], "index": self.ids[i]}


class FlippedDigits(Dataset):
    """The first ``n`` SpuriousDigits of a split as dict items, a seeded ``fraction`` of the labels flipped."""

    def __init__(self, n: int, fraction: float = 0.1, split: str = "train", seed: int = 0) -> None:
        data = SpuriousDigits(split, seed=0)
        self.images = data.images[:n]
        self.labels = data.labels[:n].clone()
        self.flipped = torch.zeros(n, dtype=torch.bool)
        if fraction:
            gen = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(n, generator=gen)[: int(round(n * fraction))]
            self.labels[chosen] = (self.labels[chosen] + torch.randint(1, 10, (len(chosen),), generator=gen)) % 10
            self.flipped[chosen] = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": int(i)}
