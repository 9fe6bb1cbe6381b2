"""SpuriousDigits: scikit-learn's bundled 8x8 digits at 32x32 with a planted, class-specific shortcut.

Built in memory from ``sklearn.datasets.load_digits()`` (1797 images shipped inside scikit-learn: nothing downloads),
deterministically from ``seed``, in well under a second.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_lens.utils.checks import check_choice, check_fraction, check_instance, check_int

__all__ = ["SpuriousDigits"]

_SPLITS = ("train", "val", "test")
_EVAL_MODES = ("random", "conflicting", "consistent", "absent")
_SIDE = 32
_METADATA_KEYS = (
    "digit",
    "shortcut_present",
    "shortcut_consistent",
    "shortcut_position",
    "thickness",
    "mislabeled",
)


def split_rows(targets: np.ndarray, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Class-stratified train/val/test row indices of ``targets``, deterministic in ``seed``.

    Each class is shuffled and cut at ``round(fraction * class size)``; each split is then shuffled as a whole.

    Example:
        >>> rows = split_rows(np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]), (0.6, 0.2, 0.2), seed=0)
        >>> [len(rows[s]) for s in ("train", "val", "test")]
        [6, 2, 2]
    """
    rng = np.random.default_rng([seed, 0])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_train = int(round(fractions[0] * len(members)))
        n_val = int(round(fractions[1] * len(members)))
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train : n_train + n_val])
        parts["test"].append(members[n_train + n_val :])
    # Shuffle the classes together so consecutive items (and sequential batches) mix classes.
    return {s: rng.permutation(np.concatenate(parts[s])) for s in _SPLITS}


def item_index(index: int, length: int) -> int:
    """``index`` as a position ``0..length-1`` of a split (negative indices count from the end), or an IndexError.

    Example:
        >>> item_index(-1, 5)
        4
    """
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for a split of {length} samples")
    return int(index) % length


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in [0, 1], targets (N,), thickness bins (N,)) of the whole bundled data set, cached."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    targets = data.target.astype(np.int64)
    # Ink mass on the 8x8 image; tertiles over all 1797 digits, so a sample's bin never depends on the split or seed.
    ink = images.reshape(len(images), -1).sum(axis=1)
    edges = np.quantile(ink, [1.0 / 3.0, 2.0 / 3.0])
    thickness = np.digitize(ink, edges).astype(np.int64)
    return images, targets, thickness


def _square_positions(square_size: int) -> np.ndarray:
    """Top-left (row, col) of each class's square: classes 0-4 down the left border, 5-9 down the right border.

    The outer columns of the 8x8 digits are almost always blank, so the squares rarely touch a stroke.
    """
    rows = np.linspace(0, _SIDE - square_size, 5).round().astype(np.int64)
    left = [(int(r), 0) for r in rows]
    right = [(int(r), _SIDE - square_size) for r in rows]
    return np.array(left + right, dtype=np.int64)


def _choose_per_class(rng: np.random.Generator, classes: np.ndarray, fraction: float, pool: np.ndarray) -> np.ndarray:
    """Boolean mask selecting ``round(fraction * n_c)`` of the ``pool`` members of each class ``c``: exact rates."""
    chosen = np.zeros(len(classes), dtype=bool)
    for c in np.unique(classes):
        members = np.flatnonzero((classes == c) & pool)
        k = int(round(fraction * len(members)))
        chosen[rng.permutation(members)[:k]] = True
    return chosen


class SpuriousDigits(Dataset):
    """Handwritten digits (sklearn, 8x8 upscaled to 1x32x32 in [0, 1]) with a planted shortcut and ground-truth masks.

    **Shortcut.** A ``square_size`` x ``square_size`` square of value ``square_value`` is written over the image at a
    position specific to the digit's class: classes 0-4 down the left border, 5-9 down the right border (see
    :attr:`class_positions`). In the training split it appears, always at the class position, in
    ``train_shortcut_fraction`` of the images of every class (exact counts per class). In the validation and test
    splits ``eval_shortcut_fraction`` of the images carry a square placed according to ``eval_shortcut_mode``:

    - ``"random"``: at one of the ten class positions drawn uniformly (so 1 in 10 matches the class by chance);
    - ``"conflicting"``: at the position of a different class (always misleading: measures shortcut reliance);
    - ``"consistent"``: at the class position, as in training (measures how much the shortcut is used);
    - ``"absent"``: never (``eval_shortcut_fraction`` is ignored).

    **Mislabeled subgroup (training split only).** ``mislabel_group={"digit": 3, "thickness": 2}`` with
    ``mislabel_as=8`` relabels ``mislabel_fraction`` of the training images matching every condition as 8. The square
    still follows the true digit, and images and squares are identical with and without the group. Such samples
    have ``mislabeled=1``; validation and test labels are always true.

    **Items** are dicts: ``image`` (1, 32, 32) float, ``label`` int, ``index`` (position in this split), and metadata
    ``digit`` (true class), ``shortcut_present`` (0/1), ``shortcut_consistent`` (1 iff the square sits at the position
    of the sample's label), ``shortcut_position`` (class whose position the square occupies, -1 if none),
    ``thickness`` (0/1/2: tertile of the 8x8 ink mass over all 1797 digits, a stroke-thickness proxy),
    ``mislabeled`` (0/1), and masks ``digit_mask`` (upscaled digit > ``mask_threshold``, before the square is drawn)
    and ``square_mask``, both (1, 32, 32) float 0/1.

    The three splits partition the 1797 digits, stratified by class, from ``seed`` alone: asking for ``"val"`` with
    other shortcut options never changes which digits are in ``"train"``. Same arguments give identical tensors.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the split and of every random choice (a private ``numpy`` generator; global RNGs untouched).
        train_shortcut_fraction: fraction of training images with the square at the class position.
        eval_shortcut_fraction: fraction of validation/test images with a square (see ``eval_shortcut_mode``).
        eval_shortcut_mode: ``"random"``, ``"conflicting"``, ``"consistent"`` or ``"absent"``.
        split_fractions: fractions of (train, val, test), summing to 1.
        square_size: side of the square in pixels (1..8).
        square_value: pixel value of the square, in (0, 1].
        upsample: ``"bilinear"`` (smooth strokes, values stay in [0, 1]) or ``"nearest"`` (4x4 blocks).
        mask_threshold: intensity above which an upscaled digit pixel belongs to ``digit_mask``.
        mislabel_group: conditions on ``digit`` and/or ``thickness`` selecting training images to relabel, or None.
        mislabel_as: the wrong label given to the group (required with ``mislabel_group``).
        mislabel_fraction: fraction of the group that is relabeled.

    Example:
        >>> ds = SpuriousDigits("train", seed=0)
        >>> item = ds[0]
        >>> item["image"].shape, len(ds), ds.num_classes
        (torch.Size([1, 32, 32]), 1078, 10)
        >>> sorted(ds.metadata)[:3]
        ['digit', 'mislabeled', 'shortcut_consistent']
    """

    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, _SIDE, _SIDE)

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        train_shortcut_fraction: float = 0.9,
        eval_shortcut_fraction: float = 0.5,
        eval_shortcut_mode: str = "random",
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        square_size: int = 4,
        square_value: float = 1.0,
        upsample: str = "bilinear",
        mask_threshold: float = 0.25,
        mislabel_group: Optional[Mapping[str, int]] = None,
        mislabel_as: Optional[int] = None,
        mislabel_fraction: float = 1.0,
    ) -> None:
        check_choice(split, "split", _SPLITS)
        check_int(seed, "seed", minimum=0)
        self.train_shortcut_fraction = check_fraction(train_shortcut_fraction, "train_shortcut_fraction",
                                                      allow_zero=True)
        self.eval_shortcut_fraction = check_fraction(eval_shortcut_fraction, "eval_shortcut_fraction", allow_zero=True)
        check_choice(eval_shortcut_mode, "eval_shortcut_mode", _EVAL_MODES)
        fractions = [float(f) for f in split_fractions]
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                "split_fractions must be three positive numbers (train, val, test) summing to 1, "
                f"got {split_fractions!r}"
            )
        check_int(square_size, "square_size", minimum=1, maximum=8)
        check_fraction(square_value, "square_value")
        check_choice(upsample, "upsample", ("bilinear", "nearest"))
        check_fraction(mask_threshold, "mask_threshold", allow_zero=True, allow_one=False)
        self.mislabel_fraction = check_fraction(mislabel_fraction, "mislabel_fraction", allow_zero=True)
        if mislabel_group is not None:
            check_instance(mislabel_group, "mislabel_group", Mapping, hint="a dict like {'digit': 3, 'thickness': 2}")
            if not mislabel_group:
                raise ValueError("mislabel_group must be a non-empty dict like {'digit': 3, 'thickness': 2}")
            unknown = set(mislabel_group) - {"digit", "thickness"}
            if unknown:
                raise ValueError(f"mislabel_group may only use the keys 'digit' and 'thickness', got {sorted(unknown)}")
            if mislabel_as is None:
                raise ValueError("mislabel_as must be a class in [0, 9] when mislabel_group is set, got None")
            check_int(mislabel_as, "mislabel_as", minimum=0, maximum=self.num_classes - 1)
            if "digit" in mislabel_group and int(mislabel_group["digit"]) == int(mislabel_as):
                raise ValueError("mislabel_as equals the group's digit: nothing would be mislabeled")
        elif mislabel_as is not None:
            raise ValueError("mislabel_as is set but mislabel_group is None; pass mislabel_group={'digit': ...}")

        self.split = split
        self.seed = int(seed)
        self.eval_shortcut_mode = eval_shortcut_mode
        self.split_fractions = tuple(fractions)
        self.square_size = square_size
        self.square_value = float(square_value)
        self.upsample = upsample
        self.mask_threshold = float(mask_threshold)
        self.mislabel_group = dict(mislabel_group) if mislabel_group is not None else None
        self.mislabel_as = int(mislabel_as) if mislabel_as is not None else None
        self._build()

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        images8, targets, thickness_all = _digits()
        source = split_rows(targets, self.split_fractions, self.seed)[self.split]
        n = len(source)
        digit = targets[source]
        thickness = thickness_all[source]
        # Separate streams: turning the mislabeled group on or off must not move any square.
        rng = np.random.default_rng([self.seed, 1 + _SPLITS.index(self.split)])
        rng_mislabel = np.random.default_rng([self.seed, 100])

        label = digit.copy()
        mislabeled = np.zeros(n, dtype=np.int64)
        if self.split == "train" and self.mislabel_group is not None:
            group = np.ones(n, dtype=bool)
            if "digit" in self.mislabel_group:
                group &= digit == int(self.mislabel_group["digit"])
            if "thickness" in self.mislabel_group:
                group &= thickness == int(self.mislabel_group["thickness"])
            chosen = _choose_per_class(rng_mislabel, np.zeros(n, dtype=np.int64), self.mislabel_fraction, group)
            label[chosen] = self.mislabel_as
            mislabeled[chosen] = 1

        position = np.full(n, -1, dtype=np.int64)
        all_rows = np.ones(n, dtype=bool)
        if self.split == "train":
            present = _choose_per_class(rng, digit, self.train_shortcut_fraction, all_rows)
            position[present] = digit[present]
        elif self.eval_shortcut_mode != "absent":
            present = _choose_per_class(rng, digit, self.eval_shortcut_fraction, all_rows)
            if self.eval_shortcut_mode == "consistent":
                position[present] = digit[present]
            elif self.eval_shortcut_mode == "random":
                position[present] = rng.integers(0, self.num_classes, size=int(present.sum()))
            else:  # conflicting: one of the nine other classes' positions
                offset = rng.integers(1, self.num_classes, size=int(present.sum()))
                position[present] = (digit[present] + offset) % self.num_classes

        small = torch.from_numpy(images8[source]).unsqueeze(1)
        if self.upsample == "bilinear":
            digits = F.interpolate(small, size=(_SIDE, _SIDE), mode="bilinear", align_corners=False)
        else:
            digits = F.interpolate(small, size=(_SIDE, _SIDE), mode="nearest")
        digits = digits.clamp_(0.0, 1.0)
        digit_mask = (digits > self.mask_threshold).float()

        square_mask = torch.zeros(n, 1, _SIDE, _SIDE)
        s = self.square_size
        for i in np.flatnonzero(position >= 0):
            r, c = self.class_positions[position[i]]
            square_mask[i, 0, r : r + s, c : c + s] = 1.0
        images = torch.where(square_mask > 0, torch.full_like(digits, self.square_value), digits)

        self.images = images.contiguous()
        self.labels = torch.from_numpy(label)
        self.digit_masks = digit_mask
        self.square_masks = square_mask
        self.source_indices = source
        present_flag = (position >= 0).astype(np.int64)
        self.metadata: dict[str, np.ndarray] = {
            "digit": digit,
            "shortcut_present": present_flag,
            "shortcut_consistent": ((position >= 0) & (position == label)).astype(np.int64),
            "shortcut_position": position,
            "thickness": thickness,
            "mislabeled": mislabeled,
        }

    # ------------------------------------------------------------------ public API
    @functools.cached_property
    def class_positions(self) -> np.ndarray:
        """(10, 2) int array: top-left (row, col) of the square of each class."""
        return _square_positions(self.square_size)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = item_index(index, len(self))
        item: dict[str, Any] = {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "index": index,
        }
        for key in _METADATA_KEYS:
            item[key] = int(self.metadata[key][index])
        item["digit_mask"] = self.digit_masks[index]
        item["square_mask"] = self.square_masks[index]
        return item

    @classmethod
    def splits(cls, seed: int = 0, **kwargs: Any) -> dict[str, SpuriousDigits]:
        """The three splits built with the same options: ``{"train": ..., "val": ..., "test": ...}``."""
        return {split: cls(split, seed=seed, **kwargs) for split in _SPLITS}

    def __repr__(self) -> str:
        present = float(self.metadata["shortcut_present"].mean()) if len(self) else 0.0
        return (
            f"SpuriousDigits(split={self.split!r}, seed={self.seed}, n={len(self)}, "
            f"shortcut_present={present:.2f}, mislabeled={int(self.metadata['mislabeled'].sum())})"
        )
