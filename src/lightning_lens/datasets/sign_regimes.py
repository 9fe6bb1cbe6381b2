"""A regression task with hidden regimes: the sign pattern of two input features picks one of four affine maps.

Used to check that a mixture-of-experts router finds regimes it must infer from the inputs (no one-hot regime
indicator is given), by comparing each token's top-1 expert with the true regime (NMI; see
:func:`lightning_lens.interpretable_models.moe.routing_statistics`). Pure PyTorch, private generators.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_lens.utils.checks import check_choice, check_float, check_int

__all__ = ["SignRegimes"]

_SPLITS = ("train", "val", "test")


class SignRegimes(Dataset):
    """``x ~ N(0, I)``; the regime is ``r = 2 * [x_0 > 0] + [x_1 > 0]`` (4 regimes, a quarter of the samples each);
    the target is the regime's own affine map ``y = A_r x + b_r`` (plus optional Gaussian noise).

    The maps ``A_r ~ N(0, 1 / features)`` and ``b_r ~ N(0, 1)`` depend on ``seed`` only, so the splits of one seed
    share them; the samples of each split come from their own generator (disjoint draws, reproducible). A linear
    router without bias can represent the regimes exactly (expert ``r`` with weight ``(+-a, +-a, 0, ...)``), and one
    affine expert per regime fits the targets exactly; a single affine map cannot.

    Items are dicts ``{"x": (features,), "y": (outputs,), "regime": int, "index": int}``; the whole split is also
    available as the tensors ``x``, ``y`` and ``regime``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: samples in the split.
        seed: seed of the maps and of the samples.
        features: input size (>= 2: features 0 and 1 pick the regime, all of them enter the maps).
        outputs: output size.
        noise: standard deviation of the Gaussian noise added to the targets.

    Example:
        >>> ds = SignRegimes("train", n=6, seed=0)
        >>> bool((ds.regime == 2 * (ds.x[:, 0] > 0) + (ds.x[:, 1] > 0)).all())
        True
        >>> r = ds.regime[0]
        >>> torch.allclose(ds.y[0], ds.weights[r] @ ds.x[0] + ds.biases[r])
        True
        >>> sorted(ds[0])
        ['index', 'regime', 'x', 'y']
    """

    num_regimes = 4

    def __init__(
        self,
        split: str = "train",
        n: int = 4096,
        seed: int = 0,
        features: int = 8,
        outputs: int = 4,
        noise: float = 0.0,
    ) -> None:
        check_choice(split, "split", _SPLITS)
        check_int(n, "n", minimum=1)
        check_int(seed, "seed", minimum=0)
        check_int(features, "features", minimum=2)
        check_int(outputs, "outputs", minimum=1)
        noise = check_float(noise, "noise", minimum=0.0)
        # distinct generators for the maps and each split: one seed gives the same maps and disjoint draws
        maps = torch.Generator().manual_seed(4 * seed)
        self.weights = torch.randn(self.num_regimes, outputs, features, generator=maps) / features ** 0.5
        self.biases = torch.randn(self.num_regimes, outputs, generator=maps)
        gen = torch.Generator().manual_seed(4 * seed + 1 + _SPLITS.index(split))
        self.x = torch.randn(n, features, generator=gen)
        self.regime = 2 * (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.y = torch.einsum("nof,nf->no", self.weights[self.regime], self.x) + self.biases[self.regime]
        if noise > 0:
            self.y = self.y + noise * torch.randn(n, outputs, generator=gen)
        self.split, self.seed, self.noise = split, seed, noise

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a split of {len(self)} samples")
        index = index % len(self)
        return {"x": self.x[index], "y": self.y[index], "regime": int(self.regime[index]), "index": index}

    def __repr__(self) -> str:
        return (f"SignRegimes(split={self.split!r}, n={len(self)}, seed={self.seed}, features={self.x.shape[1]}, "
                f"outputs={self.y.shape[1]}, noise={self.noise})")
