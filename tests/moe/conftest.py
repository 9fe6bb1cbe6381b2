"""Fixtures of the MoE tests: digits as dict batches with sample indices (one thread: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset


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


@pytest.fixture(scope="session")
def digits_loaders():
    def make(batch_size: int = 64):
        train = DataLoader(FlatDigits("train"), batch_size=batch_size, shuffle=True)
        val = DataLoader(FlatDigits("val"), batch_size=batch_size)
        return train, val

    return make

