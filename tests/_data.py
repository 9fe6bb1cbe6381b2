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
