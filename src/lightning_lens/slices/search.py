"""Level-wise enumeration of conjunctive slices (SliceLine's lattice search), counted in chunks of rows.

Sagadeeva & Boehm, "SliceLine: Fast, Linear-Algebra-based Slice Finding for ML Model Debugging", SIGMOD 2021.

Each row's binned attributes are kept as small integers (one byte per attribute up to 256 levels). The candidates over
one combination of attributes ``A = (a_1 < ... < a_l)`` are the slices kept at level ``l - 1`` over
``(a_1, ..., a_{l-1})`` joined with a kept level of ``a_l``. Slices over the same attributes are disjoint, so a row
belongs to at most one parent: the parent's index (its *slot*, looked up level by level from the row's codes) and the
row's ``a_l`` level give one cell of a small table per combination, and a ``bincount`` over the cells of a chunk of
rows adds every candidate's size and error sum at once. Memory is the codes (rows x attributes bytes) plus the tables
(the candidates' statistics), whatever the number of rows; no per-candidate row mask is ever built.

A child is counted and tested

- if every one of its ``l`` parents was kept (SliceLine's missing-parent pruning), and
- if it has at least ``min_support`` members (and is not the whole data);

and a slice is kept for expansion only if some descendant could still reach ``min_gap``: a child has at most the
parent's size and errors, so its best gap is the parent's bound evaluated at SliceLine's candidate sizes.

The counting only ever adds over rows, so it runs on shards of the data too (:mod:`lightning_lens.slices.shards`):
:func:`slice_count_steps` yields the tables to be summed over shards, and every shard takes the same decisions.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Optional

import numpy as np

from lightning_lens.slices.shards import Gather, Steps, Sum, run_local

__all__ = ["Candidates", "enumerate_slices", "gap_upper_bound", "slice_count_steps"]

_CHUNK_ROWS = 1 << 16  # rows counted at a time: a few MB of temporaries per attribute combination
_DENSE_CELLS = 1 << 22  # cells of one combination's table counted densely; larger tables count only present cells
_GROUP_CELLS = 1 << 23  # dense cells counted in one pass over the rows (more combinations: more passes)


@dataclass
class Candidates:
    """Every slice tested, as parallel arrays (row ``i`` is one conjunction).

    Attributes:
        features: ``(m, max_level)`` feature ids (columns of the one-hot matrix), ``-1``-padded.
        level: number of predicates of each candidate.
        size, err_sum, loss_sum, sq_sum: members, sum of the measure, sum of losses, sum of squared measure.
        attributes: attribute order; ``feature_attr``/``feature_code`` map a feature id to (attribute index, code).
        depth_reached: deepest level searched (less than asked when the time budget ran out).
    """

    features: np.ndarray
    level: np.ndarray
    size: np.ndarray
    err_sum: np.ndarray
    loss_sum: Optional[np.ndarray]
    sq_sum: Optional[np.ndarray]
    attributes: list[str]
    feature_attr: np.ndarray
    feature_code: np.ndarray
    depth_reached: int

    def __len__(self) -> int:
        return int(self.size.size)

    def keys(self, n_features: Optional[int] = None) -> np.ndarray:
        """One int64 per candidate identifying its (sorted) feature set."""
        base = int(n_features or self.feature_attr.size) + 1
        key = np.zeros(len(self), dtype=np.int64)
        for j in range(self.features.shape[1]):
            key = key * base + (self.features[:, j] + 1)
        return key


def gap_upper_bound(size_ub, err_ub, max_err, total_err: float, n: int, min_support: int) -> np.ndarray:
    """Largest ``rate(S) - rate(rest)`` any subset S of a slice with ``size_ub`` members, ``err_ub`` summed error
    and per-sample error at most ``max_err`` can reach while keeping ``min_support`` members.

    The gap rises with |S| while S can be all errors and falls after, so it peaks at
    ``|S| = clip(err_ub / max_err, min_support, size_ub)`` (SliceLine evaluates its score bound at the same sizes).

    Example:
        >>> round(float(gap_upper_bound(100, 5, 1.0, total_err=100, n=1000, min_support=30)), 6)  # 5/30 - 95/970
        0.068729
    """
    s_ub = np.asarray(size_ub, dtype=np.float64)
    e_ub = np.asarray(err_ub, dtype=np.float64)
    m = max(float(max_err), 1e-300)
    s = np.clip(e_ub / m, float(min_support), np.maximum(s_ub, float(min_support)))
    e = np.minimum(e_ub, s * m)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = e / s - (total_err - e) / (n - s)
    return np.where(s < n, gap, -np.inf)


def _narrow(columns: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """``(attributes, rows)`` codes in the smallest unsigned type that holds every level."""
    top = max(sizes) if sizes else 1
    dtype = np.uint8 if top <= 1 << 8 else np.uint16 if top <= 1 << 16 else np.uint32 if top <= 1 << 32 else np.int64
    n = columns[0].size if columns else 0
    out = np.empty((len(columns), n), dtype=dtype)
    for i, (col, k) in enumerate(zip(columns, sizes)):
        col = np.asarray(col)
        if col.size != n:
            raise ValueError(f"every attribute needs one code per row: {col.size} codes for {n} rows")
        if n and (int(col.min()) < 0 or int(col.max()) >= k):
            raise ValueError(f"codes must lie in 0..n_levels-1 ({k} levels), got {int(col.min())}..{int(col.max())}")
        out[i] = col
    return out


class _Lookup:
    """Cell of a combination's table -> slot of the kept slice in it (1 + its index; 0 = not kept)."""

    def __init__(self, cells: np.ndarray, size: int) -> None:
        self.dense = size <= _DENSE_CELLS
        if self.dense:
            self.table = np.zeros(size, dtype=np.int64)
            self.table[cells] = np.arange(1, cells.size + 1)
        else:
            self.cells = np.asarray(cells, dtype=np.int64)  # ascending

    def __call__(self, cell: np.ndarray) -> np.ndarray:
        if self.dense:
            return self.table[cell]
        if self.cells.size == 0:
            return np.zeros(cell.shape, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.cells, cell), self.cells.size - 1)
        return np.where(self.cells[pos] == cell, pos + 1, 0)


class _Present:
    """Sums per present cell of a table too large to hold densely (accumulated over chunks, merged over shards)."""

    def __init__(self, n_stats: int) -> None:
        self.n_stats = n_stats
        self.cells = np.zeros(0, dtype=np.int64)
        self.stats = np.zeros((n_stats, 0))
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, cells: np.ndarray, weights: list[Optional[np.ndarray]]) -> None:
        uniq, inverse = np.unique(cells, return_inverse=True)
        stats = np.stack([np.bincount(inverse, weights=w, minlength=uniq.size) for w in weights]) if uniq.size else (
            np.zeros((self.n_stats, 0)))
        self._parts.append((uniq, stats))
        self._pending += uniq.size
        if self._pending > max(self.cells.size, 1 << 20):
            self.merge()

    def merge(self) -> "_Present":
        if self._parts:
            self.cells, self.stats = merge_present([(self.cells, self.stats)] + self._parts, self.n_stats)
            self._parts, self._pending = [], 0
        return self


def merge_present(parts: list[tuple[np.ndarray, np.ndarray]], n_stats: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``(cells, stats)`` tables (stats: ``(n_stats, len(cells))``) into one with ascending unique cells."""
    cells = np.concatenate([np.asarray(c, dtype=np.int64) for c, _ in parts]) if parts else np.zeros(0, np.int64)
    if cells.size == 0:
        return cells, np.zeros((n_stats, 0))
    stats = np.concatenate([np.asarray(s, dtype=np.float64).reshape(n_stats, -1) for _, s in parts], axis=1)
    uniq, inverse = np.unique(cells, return_inverse=True)
    return uniq, np.stack([np.bincount(inverse, weights=stats[i], minlength=uniq.size) for i in range(n_stats)])


class _Lattice:
    """The slices kept for expansion, per attribute combination, and the slot lookups that place rows among them."""

    def __init__(self, codes: np.ndarray, sizes: list[int], ok_codes: list[np.ndarray]) -> None:
        self.codes = codes
        self.sizes = sizes
        self.ok_codes = ok_codes  # levels of each attribute kept at level 1
        self.slot1 = []
        for k, ok in zip(sizes, ok_codes):
            table = np.zeros(k, dtype=np.int64)
            table[ok] = np.arange(1, ok.size + 1)
            self.slot1.append(table)
        self.kept: dict[tuple[int, ...], np.ndarray] = {(a,): ok[:, None] for a, ok in enumerate(ok_codes) if ok.size}
        self.lookups: dict[tuple[int, ...], _Lookup] = {}

    def n_kept(self, combo: tuple[int, ...]) -> int:
        found = self.kept.get(combo)
        return 0 if found is None else int(found.shape[0])

    def width(self, combo: tuple[int, ...]) -> int:
        """Columns of a combination's table: the kept levels of its last attribute, plus 'none'."""
        return self.ok_codes[combo[-1]].size + 1

    def cells_of(self, combo: tuple[int, ...]) -> int:
        return (self.n_kept(combo[:-1]) + 1) * self.width(combo)

    def combos(self, level: int) -> list[tuple[int, ...]]:
        """Combinations whose parents over every (level-1)-subset were kept (others cannot have children)."""
        parents = [c for c in self.kept if len(c) == level - 1]
        out = []
        for prefix in parents:
            for b in range(prefix[-1] + 1, len(self.sizes)):
                combo = prefix + (b,)
                if (b,) in self.kept and all(sub in self.kept for sub in combinations(combo, level - 1)):
                    out.append(combo)
        return sorted(out)

    def slots(self, combo: tuple[int, ...], column: Callable[[int], np.ndarray], cache: dict) -> np.ndarray:
        """Slot of each row among the kept slices of ``combo`` (0 = in none), from the rows' codes."""
        found = cache.get(combo)
        if found is None:
            if len(combo) == 1:
                found = self.slot1[combo[0]][column(combo[0])]
            else:
                found = self.lookups[combo](self.cells(combo, column, cache))
            cache[combo] = found
        return found

    def cells(self, combo: tuple[int, ...], column: Callable[[int], np.ndarray], cache: dict) -> np.ndarray:
        """Cell of each row in ``combo``'s table: ``parent slot x width + slot of the last attribute's level``."""
        return self.slots(combo[:-1], column, cache) * self.width(combo) + self.slots(combo[-1:], column, cache)

    def decode(self, combo: tuple[int, ...], cells: np.ndarray) -> np.ndarray:
        """Codes ``(len(cells), level)`` of the children in cells whose parent slot and level slot are both set."""
        w = self.width(combo)
        parent, last = cells // w - 1, cells % w - 1
        return np.concatenate([self.kept[combo[:-1]][parent], self.ok_codes[combo[-1]][last][:, None]], axis=1)

    def all_parents_kept(self, combo: tuple[int, ...], codes: np.ndarray) -> np.ndarray:
        """Whether each child (rows of ``codes`` over ``combo``) has every parent kept (SliceLine's pruning)."""
        ok = np.ones(codes.shape[0], dtype=bool)
        position = {a: j for j, a in enumerate(combo)}
        for drop in range(len(combo) - 1):  # dropping the last attribute gives the parent it was joined from
            sub = combo[:drop] + combo[drop + 1:]
            if sub not in self.kept:
                return np.zeros(codes.shape[0], dtype=bool)
            ok &= self.slots(sub, lambda a: codes[:, position[a]], {}) > 0
        return ok

    def keep(self, combo: tuple[int, ...], cells: np.ndarray, codes: np.ndarray) -> None:
        self.kept[combo] = codes
        self.lookups[combo] = _Lookup(cells, self.cells_of(combo))

    def count(
        self,
        group: list[tuple[int, ...]],
        measure: np.ndarray,
        losses: Optional[np.ndarray],
        need_squares: bool,
        chunk_rows: int,
    ) -> tuple[dict[tuple[int, ...], np.ndarray], dict[tuple[int, ...], _Present]]:
        """This shard's sums per cell: dense ``(n_stats, cells)`` tables, or present cells of very large tables."""
        binary = bool(np.all((measure == 0) | (measure == 1)))
        n_stats = 2 + (losses is not None) + need_squares
        dense = {c: np.zeros((n_stats, self.cells_of(c))) for c in group if self.cells_of(c) <= _DENSE_CELLS}
        present = {c: _Present(n_stats) for c in group if c not in dense}
        n = self.codes.shape[1]
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            cache: dict = {}
            e = measure[lo:hi]
            weights = [None, e] + ([losses[lo:hi]] if losses is not None else []) + ([e * e] if need_squares else [])
            wrong = np.flatnonzero(e) if binary else None

            def column(a: int, lo: int = lo, hi: int = hi) -> np.ndarray:
                return self.codes[a, lo:hi]

            for combo in group:
                cell = self.cells(combo, column, cache)
                table = dense.get(combo)
                if table is not None:
                    size = table.shape[1]
                    table[0] += np.bincount(cell, minlength=size)
                    # 0/1 errors: the error sum is the count over the wrong rows (cheaper than a weighted count)
                    table[1] += np.bincount(cell[wrong], minlength=size) if binary else (
                        np.bincount(cell, weights=e, minlength=size))
                    for i, w in enumerate(weights[2:], start=2):
                        table[i] += np.bincount(cell, weights=w, minlength=size)
                else:
                    w = self.width(combo)
                    sel = np.flatnonzero((cell >= w) & (cell % w > 0))
                    present[combo].add(cell[sel], [None if x is None else x[sel] for x in weights])
        return dense, {c: p.merge() for c, p in present.items()}


def slice_count_steps(
    codes: Mapping[str, np.ndarray],
    n_levels: Mapping[str, int],
    measure: np.ndarray,
    min_support: int,
    min_gap: float,
    max_depth: int = 2,
    losses: Optional[np.ndarray] = None,
    need_squares: bool = False,
    deadline: Optional[float] = None,
    max_candidates: int = 2_000_000,
    totals: Optional[tuple[int, float, float]] = None,
    chunk_rows: int = _CHUNK_ROWS,
) -> Steps[Candidates]:
    """:func:`enumerate_slices` on one shard of the rows: a generator of :class:`~lightning_lens.slices.shards.Sum`
    (and, for tables too large to hold densely, :class:`~lightning_lens.slices.shards.Gather`) requests that returns
    the :class:`Candidates` of all shards together.

    ``totals`` = ``(n, total measure, max measure)`` over all shards (None: this shard is all the data). The time
    budget is agreed too: a deeper level starts only if no shard has passed its ``deadline``.
    """
    attributes = list(codes)
    if not attributes:
        raise ValueError("enumerate_slices needs at least one attribute")
    sizes = [int(n_levels[a]) for a in attributes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    feat_attr = np.repeat(np.arange(len(attributes)), sizes)
    feat_code = np.concatenate([np.arange(k) for k in sizes])
    narrow = _narrow([np.asarray(codes[a]) for a in attributes], sizes)
    e = np.asarray(measure, dtype=np.float64)
    loss_arr = None if losses is None else np.asarray(losses, dtype=np.float64)
    if totals is None:
        totals = (int(e.size), float(e.sum()), float(e.max()) if e.size else 0.0)
    n, total, max_e = int(totals[0]), float(totals[1]), float(totals[2])
    stat_names = ["size", "err"] + (["loss"] if loss_arr is not None else []) + (["sq"] if need_squares else [])

    def late() -> np.ndarray:
        return np.array([float(deadline is not None and time.perf_counter() > deadline)])

    # Level 1: one table per attribute.
    local = np.zeros((len(stat_names), int(sum(sizes))))
    for lo in range(0, narrow.shape[1], chunk_rows):
        hi = min(narrow.shape[1], lo + chunk_rows)
        fid = (narrow[:, lo:hi].astype(np.int64) + offsets[:, None]).ravel()
        x = e[lo:hi]
        weights = [None, x] + ([loss_arr[lo:hi]] if loss_arr is not None else []) + ([x * x] if need_squares else [])
        for i, w in enumerate(weights):
            local[i] += np.bincount(fid, weights=None if w is None else np.tile(w, len(sizes)), minlength=local.shape[1])
    reply = yield Sum({**{s: local[i] for i, s in enumerate(stat_names)}, "late": late()})
    out_of_time = reply["late"][0] > 0
    size1, err1 = reply["size"], reply["err"]
    loss1, sq1 = reply.get("loss"), reply.get("sq")

    tested1 = (size1 >= min_support) & (size1 < n)
    feats_out = [np.flatnonzero(tested1)[:, None]]
    stats_out = [(size1[tested1], err1[tested1], None if loss1 is None else loss1[tested1],
                  None if sq1 is None else sq1[tested1])]

    def expandable(size: np.ndarray, err: np.ndarray) -> np.ndarray:
        bound = gap_upper_bound(size, err, max_e, total, n, min_support)
        return (size >= min_support) & (size < n) & (bound >= min_gap)

    feat_ok = np.zeros(feat_attr.size, dtype=bool)
    feat_ok[tested1] = expandable(size1[tested1], err1[tested1])

    depth_reached = 1
    if max_depth >= 2 and feat_ok.sum() >= 2:
        ok_codes = [np.flatnonzero(feat_ok[o:o + k]) for o, k in zip(offsets, sizes)]
        lattice = _Lattice(narrow, sizes, ok_codes)
        for level in range(2, max_depth + 1):
            if out_of_time:
                break
            combos = lattice.combos(level)
            if not any(len(c) == level - 1 for c in lattice.kept):
                break
            # Count, one pass over the rows per group of combinations whose dense tables fit the group budget.
            groups: list[list[tuple[int, ...]]] = [[]]
            cells_in_group = 0
            for combo in combos:
                cells = lattice.cells_of(combo) if lattice.cells_of(combo) <= _DENSE_CELLS else 0
                if groups[-1] and cells_in_group + cells > _GROUP_CELLS:
                    groups.append([])
                    cells_in_group = 0
                groups[-1].append(combo)
                cells_in_group += cells
            found: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []  # (combo, cells, stats) per combination
            for group in groups:
                if not group:
                    continue
                dense, present = lattice.count(group, e, loss_arr, need_squares, chunk_rows)
                order = list(dense)
                flat = {s: np.concatenate([dense[c][i] for c in order]) if order else np.zeros(0)
                        for i, s in enumerate(stat_names)}
                reply = yield Sum({**flat, "late": late()})
                out_of_time = out_of_time or reply["late"][0] > 0
                start = 0
                for c in order:
                    size = dense[c].shape[1]
                    stats = np.stack([reply[s][start:start + size] for s in stat_names])
                    start += size
                    cells = np.flatnonzero((stats[0] >= min_support) & (stats[0] < n))
                    w = lattice.width(c)
                    cells = cells[(cells >= w) & (cells % w > 0)]
                    found.append((c, cells, stats[:, cells]))
                if present:
                    shards = yield Gather({c: (p.cells, p.stats) for c, p in present.items()})
                    for c in present:
                        cells, stats = merge_present([shard[c] for shard in shards], len(stat_names))
                        keep = (stats[0] >= min_support) & (stats[0] < n)
                        found.append((c, cells[keep], stats[:, keep]))
            children = []
            for combo, cells, stats in found:
                child_codes = lattice.decode(combo, cells)
                keep = lattice.all_parents_kept(combo, child_codes) if level >= 3 else np.ones(cells.size, bool)
                children.append((combo, cells[keep], child_codes[keep], stats[:, keep]))
            n_children = sum(c[1].size for c in children)
            if n_children > max_candidates:
                warnings.warn(
                    f"slice search stopped before level {level}: {n_children} candidates exceed "
                    f"max_candidates={max_candidates}; raise min_support or lower max_depth",
                    stacklevel=2,
                )
                break
            feats = [offsets[list(combo)][None, :] + child_codes for combo, _, child_codes, _ in children]
            feats_level = np.concatenate(feats) if feats else np.zeros((0, level), dtype=np.int64)
            stats_level = np.concatenate([s for *_, s in children], axis=1) if children else (
                np.zeros((len(stat_names), 0)))
            order = np.lexsort(feats_level.T[::-1]) if feats_level.shape[0] else np.zeros(0, dtype=np.int64)
            feats_out.append(feats_level[order])
            named = dict(zip(stat_names, stats_level[:, order]))
            stats_out.append((named["size"], named["err"], named.get("loss"), named.get("sq")))
            depth_reached = level
            if level == max_depth:
                break
            for combo, cells, child_codes, stats in children:
                ok = expandable(stats[0], stats[1])
                if ok.any():
                    lattice.keep(combo, cells[ok], child_codes[ok])
            if not any(len(c) == level for c in lattice.kept):
                break

    width = max(f.shape[1] for f in feats_out)
    features = np.concatenate(
        [np.pad(f, ((0, 0), (0, width - f.shape[1])), constant_values=-1) for f in feats_out]
    ).astype(np.int64)
    level_arr = np.concatenate([np.full(f.shape[0], f.shape[1], dtype=np.int64) for f in feats_out])
    cat = lambda i: None if stats_out[0][i] is None else np.concatenate([s[i] for s in stats_out])  # noqa: E731
    return Candidates(
        features=features,
        level=level_arr,
        size=cat(0),
        err_sum=cat(1),
        loss_sum=cat(2),
        sq_sum=cat(3),
        attributes=attributes,
        feature_attr=feat_attr,
        feature_code=feat_code,
        depth_reached=depth_reached,
    )


def enumerate_slices(
    codes: Mapping[str, np.ndarray],
    n_levels: Mapping[str, int],
    measure: np.ndarray,
    min_support: int,
    min_gap: float,
    max_depth: int = 2,
    losses: Optional[np.ndarray] = None,
    need_squares: bool = False,
    deadline: Optional[float] = None,
    max_candidates: int = 2_000_000,
    chunk_rows: int = _CHUNK_ROWS,
) -> Candidates:
    """Enumerate and count every conjunction of up to ``max_depth`` predicates that survives the pruning rules.

    Args:
        codes: attribute -> integer level codes (``0..n_levels-1``), all of length n.
        n_levels: attribute -> number of levels.
        measure: per-sample 0/1 error (or loss) whose sums are counted.
        min_support: smallest slice size tested.
        min_gap: slices whose descendants cannot reach this gap are not expanded.
        max_depth: largest number of predicates.
        losses: per-sample losses to sum as well (for the mean loss of error-based slices).
        need_squares: also sum ``measure ** 2`` (loss-based slices need variances).
        deadline: ``time.perf_counter()`` value after which no deeper level is started.
        max_candidates: stop before a level that would hold more children than this (with a warning).
        chunk_rows: rows counted at a time (memory of the temporaries; the result does not depend on it).

    Example:
        >>> codes = {"a": np.array([0, 0, 1, 1]), "b": np.array([0, 1, 0, 1])}
        >>> c = enumerate_slices(codes, {"a": 2, "b": 2}, np.array([1.0, 0, 0, 0]), min_support=1, min_gap=0.0)
        >>> c.features.tolist(), c.size.tolist(), c.err_sum.tolist()
        ([[0, -1], [1, -1], [2, -1], [3, -1], [0, 2]], [2.0, 2.0, 2.0, 2.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0])
    """
    return run_local(slice_count_steps(codes, n_levels, measure, min_support, min_gap, max_depth=max_depth,
                                       losses=losses, need_squares=need_squares, deadline=deadline,
                                       max_candidates=max_candidates, chunk_rows=chunk_rows))
