"""Following slices across epochs: stable names, and each followed slice re-measured on every epoch's data.

A slice found at epoch 3 keeps its accuracy curve afterwards: metadata slices are re-applied through the frozen
:class:`~lightning_lens.slices.Binning` (so ``digit=7`` names the same group at every epoch); embedding clusters,
whose centres move with the model, are followed by the ids of their members at the epoch they were found.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import numpy as np

from lightning_lens.slices.binning import Binning
from lightning_lens.slices.slice import Slice
from lightning_lens.utils.checks import check_int

__all__ = ["SliceTracker", "tracking_name"]


def tracking_name(s: Slice, epoch: int) -> str:
    """A stable, metric-safe name for a slice: ``digit=3 & thickness=2`` -> ``digit=3&thickness=2``; a cluster is
    named by the epoch it was found at (``cluster4@epoch2``), since cluster numbers are not stable across epochs.

    Example:
        >>> from lightning_lens.slices import Predicate
        >>> predicates = (Predicate("digit", 3, "digit=3"), Predicate("size", 0, "size<2"))
        >>> s = Slice("digit=3 & size<2", "metadata", predicates, np.arange(3), 3, 0.1, 2.0, 0.67, 0.2, 0.9, 0.1,
        ...           0.57, 6.7, 0.01, 0.02, 1.0)
        >>> tracking_name(s, epoch=5)
        'digit=3&size<2'
    """
    if s.kind == "metadata":
        return re.sub(r"[^\w=.<>&\-]+", "_", s.name.replace(" & ", "&")).strip("_")
    return f"cluster{s.cluster}@epoch{int(epoch)}"


class SliceTracker:
    """The slices followed across epochs (at most ``max_tracked``, the first ones seen) and their accuracy per epoch.

    Args:
        max_tracked: slices followed; later new slices are still named but not followed.

    Example:
        >>> from lightning_lens.slices import SliceFinder
        >>> rng = np.random.default_rng(0)
        >>> meta = {"site": rng.choice(["a", "b"], 2000), "age": rng.integers(0, 3, 2000)}
        >>> errors = rng.random(2000) < np.where((meta["site"] == "b") & (meta["age"] == 2), 0.5, 0.1)
        >>> finder = SliceFinder()
        >>> tracker = SliceTracker()
        >>> tracker.add(finder.find(errors, meta), epoch=0)
        ['site=b&age=2']
        >>> acc = tracker.accuracies(~errors, np.arange(2000), meta, finder.binning_)
        >>> bool(acc["site=b&age=2"] == (~errors)[(meta["site"] == "b") & (meta["age"] == 2)].mean())
        True
    """

    def __init__(self, max_tracked: int = 50) -> None:
        self.max_tracked = check_int(max_tracked, "max_tracked", minimum=0)
        self.tracked: dict[str, dict[str, Any]] = {}  # name -> definition (kind, name, first_seen, predicates | ids)

    def add(self, slices: Iterable[Slice], epoch: int) -> list[str]:
        """Follow the new ones among ``slices`` (found at ``epoch``); their names, in order."""
        names = []
        for s in slices:
            key = tracking_name(s, epoch)
            if key not in self.tracked and len(self.tracked) < self.max_tracked:
                spec: dict[str, Any] = {"kind": s.kind, "name": s.name, "first_seen": int(epoch)}
                if s.kind == "metadata":
                    spec["predicates"] = [p.to_dict() for p in s.predicates]
                else:
                    spec["ids"] = [int(i) for i in np.asarray(s.indices).ravel()]
                self.tracked[key] = spec
            names.append(key)
        return names

    def first_seen(self, name: str, default: Optional[int] = None) -> Optional[int]:
        spec = self.tracked.get(name)
        return default if spec is None else int(spec["first_seen"])

    def mask(
        self, name: str, ids: np.ndarray, metadata: Mapping[str, Any], binning: Optional[Binning]
    ) -> Optional[np.ndarray]:
        """Membership of followed slice ``name`` among samples ``ids`` (None when it cannot be measured: the
        binning or one of its attributes is missing)."""
        spec = self.tracked[name]
        ids = np.asarray(ids)
        if spec["kind"] != "metadata":
            return np.isin(ids, np.asarray(spec["ids"], dtype=np.int64))
        if binning is None:
            return None
        mask = np.ones(ids.size, dtype=bool)
        for p in spec["predicates"]:
            attr = p["attribute"]
            if attr not in binning.attributes or attr not in metadata:
                return None
            mask &= binning.attributes[attr].codes(metadata[attr]) == int(p["code"])
        return mask

    def accuracies(
        self, correct: Any, ids: Any, metadata: Mapping[str, Any], binning: Optional[Binning]
    ) -> dict[str, float]:
        """Accuracy of every followed slice that has members in this data (``correct``: per-sample 0/1)."""
        return self.accuracies_from_counts(self.counts(correct, ids, metadata, binning))

    def counts(
        self, correct: Any, ids: Any, metadata: Mapping[str, Any], binning: Optional[Binning]
    ) -> dict[str, np.ndarray]:
        """Members and correct members of every followed slice in this data, in the order of :attr:`tracked`
        (``-1`` members: not measurable). Sums over shards of the data, so sharded data is measured by adding them.

        Example:
            >>> tracker = SliceTracker()
            >>> tracker.tracked = {"c": {"kind": "embedding", "name": "c", "first_seen": 0, "ids": [1, 2]}}
            >>> {k: v.tolist() for k, v in tracker.counts([True, False, True], [0, 1, 2], {}, None).items()}
            {'size': [2.0], 'correct': [1.0]}
        """
        correct = np.asarray(correct, dtype=bool)
        size, right = np.zeros(len(self.tracked)), np.zeros(len(self.tracked))
        for i, name in enumerate(self.tracked):
            mask = self.mask(name, np.asarray(ids), metadata, binning)
            if mask is None:
                size[i] = -1.0
            else:
                size[i], right[i] = np.count_nonzero(mask), np.count_nonzero(correct & mask)
        return {"size": size, "correct": right}

    def accuracies_from_counts(self, counts: Mapping[str, np.ndarray]) -> dict[str, float]:
        """:meth:`accuracies` from (summed) :meth:`counts`: slices with no measurable member are left out."""
        return {name: float(counts["correct"][i] / counts["size"][i])
                for i, name in enumerate(self.tracked) if counts["size"][i] > 0}

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly: name -> definition."""
        return {name: dict(spec) for name, spec in self.tracked.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracked = {str(name): dict(spec) for name, spec in state.items()}
