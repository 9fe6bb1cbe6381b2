"""LeakyTabular: a scikit-learn bundled table (breast cancer or wine) with a planted leaky feature.

Built in memory from ``sklearn.datasets.load_breast_cancer()`` / ``load_wine()`` (shipped inside scikit-learn: nothing
downloads), deterministically from ``seed``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_lens.datasets.spurious_digits import item_index, split_rows
from lightning_lens.utils.checks import check_choice, check_int, check_positive_number

__all__ = ["LeakyTabular"]

_SPLITS = ("train", "val", "test")
_TABLES = ("breast_cancer", "wine")
_EVAL_MODES = ("shuffled", "consistent")
#: raw columns binned into tertiles (over the whole table) for slices
_BINNED = {"breast_cancer": ("mean radius", "mean texture"), "wine": ("alcohol", "color_intensity")}
LEAK_NAME = "leak"


@functools.lru_cache(maxsize=2)
def _table(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_breast_cancer, load_wine

    data = load_breast_cancer() if name == "breast_cancer" else load_wine()
    names = tuple(str(n).replace(" ", "_").replace("/", "_") for n in data.feature_names)
    return data.data.astype(np.float64), data.target.astype(np.int64), names


class LeakyTabular(Dataset):
    """A bundled scikit-learn table, standardised, with one extra column that leaks the label in training.

    **Leak.** The last column, ``leak``, is the label plus Gaussian noise of standard deviation ``leak_noise`` in the
    training split: a model can read the label off it. In the validation and test splits it is, with
    ``eval_leak_mode="shuffled"`` (default), the same kind of values permuted across the rows (uninformative, same
    marginal distribution), or, with ``"consistent"``, label plus noise as in training. Permutation importance on the
    validation split shows the drop a model that leans on the leak suffers.

    **Features** are standardised with the training split's mean and standard deviation (the leak included), so the
    three splits share one scale. Feature names are scikit-learn's with ``_`` for spaces (:attr:`feature_names`).

    **Items** are dicts: ``features`` (``num_features``,) float32, ``label`` int, ``index`` (position in this split),
    and metadata for slices: ``<column>_bin`` (0/1/2, the tertile of a raw column over the whole table: ``mean_radius``
    and ``mean_texture`` for breast cancer, ``alcohol`` and ``color_intensity`` for wine) and ``leak_consistent``
    (1 iff the leak, rounded, equals the label).

    The splits partition the table, stratified by class, from ``seed`` alone.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the split, the noise and the shuffle (a private ``numpy`` generator).
        table: ``"breast_cancer"`` (569 rows, 30 features, 2 classes) or ``"wine"`` (178 rows, 13 features, 3 classes).
        leak_noise: standard deviation of the noise added to the label in the leaky column (in label units).
        eval_leak_mode: ``"shuffled"`` or ``"consistent"``.
        split_fractions: fractions of (train, val, test), summing to 1.

    Example:
        >>> ds = LeakyTabular("train", seed=0)
        >>> item = ds[0]
        >>> item["features"].shape, ds.feature_names[-1], ds.num_classes
        (torch.Size([31]), 'leak', 2)
        >>> float(ds.metadata["leak_consistent"].mean()) > 0.95
        True
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        table: str = "breast_cancer",
        leak_noise: float = 0.1,
        eval_leak_mode: str = "shuffled",
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        self.split = check_choice(split, "split", _SPLITS)
        self.seed = check_int(seed, "seed", minimum=0)
        self.table = check_choice(table, "table", _TABLES)
        self.leak_noise = check_positive_number(leak_noise, "leak_noise")
        self.eval_leak_mode = check_choice(eval_leak_mode, "eval_leak_mode", _EVAL_MODES)
        fractions = [float(f) for f in split_fractions]
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                "split_fractions must be three positive numbers (train, val, test) summing to 1, "
                f"got {split_fractions!r}"
            )
        self.split_fractions = tuple(fractions)
        self._build()

    def _leak(self, split: str, labels: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1 + _SPLITS.index(split)])
        leak = labels + rng.normal(0.0, self.leak_noise, size=len(labels))
        if split != "train" and self.eval_leak_mode == "shuffled":
            leak = leak[rng.permutation(len(leak))]
        return leak

    def _build(self) -> None:
        raw, targets, names = _table(self.table)
        rows = split_rows(targets, self.split_fractions, self.seed)
        train = np.column_stack([raw[rows["train"]], self._leak("train", targets[rows["train"]])])
        mean, std = train.mean(axis=0), train.std(axis=0)
        source = rows[self.split]
        labels = targets[source]
        x = np.column_stack([raw[source], self._leak(self.split, labels)])
        self.features = torch.from_numpy(((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32))
        self.labels = torch.from_numpy(labels)
        self.source_indices = source
        self.feature_names: list[str] = [*names, LEAK_NAME]
        self.num_classes = int(targets.max()) + 1
        self.metadata: dict[str, np.ndarray] = {}
        for column in _BINNED[self.table]:
            j = names.index(column.replace(" ", "_"))
            edges = np.quantile(raw[:, j], [1.0 / 3.0, 2.0 / 3.0])
            self.metadata[f"{names[j]}_bin"] = np.digitize(raw[source, j], edges).astype(np.int64)
        self.metadata["leak_consistent"] = (np.rint(x[:, -1]).astype(np.int64) == labels).astype(np.int64)

    @property
    def num_features(self) -> int:
        """Number of columns, the leak included."""
        return int(self.features.shape[1])

    @property
    def leak_index(self) -> int:
        """Column of the leaky feature (the last)."""
        return self.num_features - 1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = item_index(index, len(self))
        item: dict[str, Any] = {"features": self.features[index], "label": int(self.labels[index]), "index": index}
        for key, values in self.metadata.items():
            item[key] = int(values[index])
        return item

    @classmethod
    def splits(cls, seed: int = 0, **kwargs: Any) -> dict[str, LeakyTabular]:
        """The three splits built with the same options: ``{"train": ..., "val": ..., "test": ...}``."""
        return {split: cls(split, seed=seed, **kwargs) for split in _SPLITS}

    def __repr__(self) -> str:
        return f"LeakyTabular(split={self.split!r}, table={self.table!r}, seed={self.seed}, n={len(self)})"
