"""Handwritten digits whose concepts are the segments of a seven-segment display (a concept-bottleneck benchmark).

The images are scikit-learn's bundled ``load_digits`` (1,797 grey 8x8 scans, no download). Each digit's concepts are
the seven segments lit when that digit is drawn on a seven-segment display::

     aaa
    f   b
     ggg
    e   c
     ddd

The table (:data:`SEVEN_SEGMENT_TABLE`) uses the common forms: 6 with its top bar (a), 7 as a, b, c (no f), 9 with
its bottom bar (d). All ten codes are distinct, so the label is a deterministic function of the concepts: intervening
on all seven concepts with their true values makes the task solvable exactly (a correct head reaches 100%). The
closest pairs differ by one segment (8/0 by g, 8/6 by b, 8/9 by e, 1/7 by a, ...), so concept errors matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_lens.utils.checks import check_choice, check_int

SEGMENT_NAMES: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g")
"""Segment names in concept order (index 0 = a)."""

SEGMENT_DESCRIPTIONS: dict[str, str] = {
    "a": "top bar",
    "b": "upper right bar",
    "c": "lower right bar",
    "d": "bottom bar",
    "e": "lower left bar",
    "f": "upper left bar",
    "g": "middle bar",
}

_LIT = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}

SEVEN_SEGMENT_TABLE: np.ndarray = np.array(
    [[1.0 if s in _LIT[d] else 0.0 for s in SEGMENT_NAMES] for d in range(10)], dtype=np.float32
)
"""(10, 7) float32: row ``d`` holds the segments a..g lit for digit ``d`` (1 = lit)."""

_SPLITS = ("train", "val", "test")


def stratified_split_indices(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Disjoint, class-stratified index sets covering ``labels``, one per fraction, deterministic in ``seed``.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut by cumulative rounded fractions, so every
    split holds about ``fraction`` of every class. Indices are returned sorted.
    """
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        cuts = np.round(bounds * len(members)).astype(int)
        cuts[-1] = len(members)
        start = 0
        for k, stop in enumerate(cuts):
            parts[k].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


class SevenSegmentDigits(Dataset):
    """scikit-learn's 8x8 handwritten digits with seven-segment concepts, split reproducibly.

    Items are dicts::

        {"image": float (1, S, S) in [0, 1], "label": int, "concepts": float (7,) of 0/1, "index": int}

    ``index`` is the item's position in this split (unique within the split, for de-duplication); the row in
    ``load_digits`` is ``source_indices[index]``. Pixel intensities (0..16) are divided by 16. With ``image_size`` S
    other than 8 the images are upscaled by bilinear interpolation (``align_corners=False``); values stay in [0, 1].

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the stratified split (the same seed always gives the same, disjoint splits).
        fractions: train/val/test fractions of every class (default 0.6/0.2/0.2: 1,078/360/359 images).
        image_size: side of the returned images (8 = native; e.g. 32 for CNNs built for larger inputs).

    Attributes:
        concept_names: ``["a", ..., "g"]``.
        concept_descriptions: human-readable names in the same order (``"top bar"`` ...).
        images: (N, 1, S, S) float tensor; labels: (N,) long tensor; concepts: (N, 7) float tensor.
        source_indices: (N,) numpy array of rows in ``sklearn.datasets.load_digits()``.
        table: the (10, 7) digit -> segments table.

    Example:
        >>> ds = SevenSegmentDigits("train", seed=0)
        >>> item = ds[0]
        >>> item["image"].shape, item["concepts"].shape, ds.concept_names[:3]
        (torch.Size([1, 8, 8]), torch.Size([7]), ['a', 'b', 'c'])
        >>> ds.table[7].tolist()  # 7 lights a, b, c
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    """

    num_classes = 10
    num_concepts = len(SEGMENT_NAMES)

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        image_size: int = 8,
    ) -> None:
        check_choice(split, "split", _SPLITS)
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must be three non-negative numbers summing to 1 (train, val, test), got {fractions}"
            )
        check_int(seed, "seed", minimum=0)
        check_int(image_size, "image_size", minimum=1)  # 8 = the digits' native resolution
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        digits = load_digits()
        labels = digits.target.astype(np.int64)
        chosen = stratified_split_indices(labels, fractions, seed)[_SPLITS.index(split)]

        images = torch.from_numpy(digits.images[chosen].astype(np.float32) / 16.0).unsqueeze(1)
        if image_size != 8:
            images = torch.nn.functional.interpolate(
                images, size=(image_size, image_size), mode="bilinear", align_corners=False
            ).clamp_(0.0, 1.0)
        self.split = split
        self.seed = seed
        self.image_size = image_size
        self.source_indices = chosen
        self.images = images.contiguous()
        self.labels = torch.from_numpy(labels[chosen])
        self.table = torch.from_numpy(SEVEN_SEGMENT_TABLE.copy())
        self.concepts = self.table[self.labels]
        self.concept_names = list(SEGMENT_NAMES)
        self.concept_descriptions = [SEGMENT_DESCRIPTIONS[s] for s in SEGMENT_NAMES]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a split of {len(self)} items")
        index = index % len(self)
        return {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "concepts": self.concepts[index],
            "index": index,
        }

    def __repr__(self) -> str:
        return (
            f"SevenSegmentDigits(split={self.split!r}, seed={self.seed}, n={len(self)}, "
            f"image_size={self.image_size})"
        )
