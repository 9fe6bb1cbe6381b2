"""Level-wise enumeration of conjunctive slices with sparse matrix products (SliceLine's lattice search).

Sagadeeva & Boehm, "SliceLine: Fast, Linear-Algebra-based Slice Finding for ML Model Debugging", SIGMOD 2021.

Metadata codes are one-hot encoded into a sparse ``n x F`` matrix ``X`` (one column per attribute level). The
members of the slices kept at level ``l - 1`` form a sparse ``n x p`` matrix ``P``; one product ``P.T @ X`` gives
the size of every child ``parent & level``, and ``P.T @ (e * X)`` its error sum. A child is generated only

- from a parent whose last attribute precedes the new level's attribute (each conjunction is generated once),
- if every one of its ``l`` parents was kept (SliceLine's missing-parent pruning), and
- if it has at least ``min_support`` members;

and a slice is kept for expansion only if some descendant could still reach ``min_gap``: a child has at most the
parent's size and errors, so its best gap is the parent's bound evaluated at SliceLine's candidate sizes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse

__all__ = ["Candidates", "enumerate_slices", "gap_upper_bound"]


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


def _one_hot(codes: list[np.ndarray], offsets: np.ndarray, n_features: int) -> sparse.csr_matrix:
    n = codes[0].size
    m = len(codes)
    cols = (np.stack(codes, axis=1) + offsets[None, :]).ravel()
    indptr = np.arange(0, n * m + 1, m, dtype=np.int64)
    return sparse.csr_matrix((np.ones(n * m), cols, indptr), shape=(n, n_features))


def _pair_values(product: sparse.spmatrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if not rows.size:
        return np.zeros(0)
    if product.shape[0] * product.shape[1] <= _DENSE_LIMIT:
        return product.toarray()[rows, cols]
    return np.asarray(product.tocsr()[rows, cols]).ravel()


_DENSE_LIMIT = 20_000_000  # entries of a parents x features product handled as a dense array


def _membership(
    slices: np.ndarray, feat_attr: np.ndarray, feat_code: np.ndarray, code_list: list[np.ndarray], sizes: list[int]
) -> sparse.csc_matrix:
    """Sparse ``n x len(slices)`` membership of conjunctions given as rows of feature ids.

    Slices over the same attributes partition the rows, so one mixed-radix key per row and a lookup table give every
    row's slice in that group: O(n) per attribute combination instead of products of sparse columns.
    """
    n = code_list[0].size
    attrs = feat_attr[slices]  # (m, l)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, attrs)):
        groups.setdefault(key, []).append(i)
    rows_out, cols_out = [], []
    for combo, members in groups.items():
        members = np.asarray(members)
        radix = [sizes[a] for a in combo]
        table_size = int(np.prod(radix))
        row_key = np.zeros(n, dtype=np.int64)
        slice_key = np.zeros(members.size, dtype=np.int64)
        for j, a in enumerate(combo):
            row_key = row_key * radix[j] + code_list[a]
            slice_key = slice_key * radix[j] + feat_code[slices[members, j]]
        if table_size <= 4 * n + 1024:
            table = np.full(table_size, -1, dtype=np.int64)
            table[slice_key] = members
            col = table[row_key]
        else:
            order = np.argsort(slice_key)
            pos = np.clip(np.searchsorted(slice_key[order], row_key), 0, members.size - 1)
            col = np.where(slice_key[order][pos] == row_key, members[order][pos], -1)
        hit = np.flatnonzero(col >= 0)
        rows_out.append(hit)
        cols_out.append(col[hit])
    rows = np.concatenate(rows_out) if rows_out else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols_out) if cols_out else np.zeros(0, dtype=np.int64)
    return sparse.csc_matrix((np.ones(rows.size), (rows, cols)), shape=(n, slices.shape[0]))


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
) -> Candidates:
    """Enumerate and count every conjunction of up to ``max_depth`` predicates that survives the pruning rules.

    Args:
        codes: attribute -> int64 level codes (``0..n_levels-1``), all of length n.
        n_levels: attribute -> number of levels.
        measure: per-sample 0/1 error (or loss) whose sums are counted.
        min_support: smallest slice size tested.
        min_gap: slices whose descendants cannot reach this gap are not expanded.
        max_depth: largest number of predicates.
        losses: per-sample losses to sum as well (for the mean loss of error-based slices).
        need_squares: also sum ``measure ** 2`` (loss-based slices need variances).
        deadline: ``time.perf_counter()`` value after which no deeper level is started.
        max_candidates: stop before a level that would hold more children than this (with a warning).

    Example:
        >>> codes = {"a": np.array([0, 0, 1, 1]), "b": np.array([0, 1, 0, 1])}
        >>> c = enumerate_slices(codes, {"a": 2, "b": 2}, np.array([1.0, 0, 0, 0]), min_support=1, min_gap=0.0)
        >>> c.features.tolist(), c.size.tolist(), c.err_sum.tolist()
        ([[0, -1], [1, -1], [2, -1], [3, -1], [0, 2]], [2.0, 2.0, 2.0, 2.0, 1.0], [1.0, 0.0, 1.0, 0.0, 1.0])
    """
    attributes = list(codes)
    n = int(measure.size)
    if not attributes:
        raise ValueError("enumerate_slices needs at least one attribute")
    sizes_l = [int(n_levels[a]) for a in attributes]
    offsets = np.concatenate([[0], np.cumsum(sizes_l)[:-1]]).astype(np.int64)
    F = int(sum(sizes_l))
    feat_attr = np.repeat(np.arange(len(attributes)), sizes_l)
    feat_code = np.concatenate([np.arange(k) for k in sizes_l])
    code_list = [np.asarray(codes[a], dtype=np.int64) for a in attributes]
    e = np.asarray(measure, dtype=np.float64)
    total = float(e.sum())
    max_e = float(e.max()) if n else 0.0

    # Level 1 with bincount (cheaper than a product).
    fids = np.stack(code_list, axis=1) + offsets[None, :]
    size1 = np.bincount(fids.ravel(), minlength=F).astype(np.float64)
    err1 = np.bincount(fids.ravel(), weights=np.repeat(e, len(attributes)), minlength=F)
    flat = fids.ravel()
    m = len(attributes)
    loss1 = np.bincount(flat, weights=np.repeat(losses, m), minlength=F) if losses is not None else None
    sq1 = np.bincount(flat, weights=np.repeat(e * e, m), minlength=F) if need_squares else None

    tested1 = (size1 >= min_support) & (size1 < n)
    feats_out = [np.flatnonzero(tested1)[:, None]]
    stats_out = [(size1[tested1], err1[tested1], None if loss1 is None else loss1[tested1],
                  None if sq1 is None else sq1[tested1])]

    def expandable(size: np.ndarray, err: np.ndarray) -> np.ndarray:
        bound = gap_upper_bound(size, err, max_e, total, n, min_support)
        return (size >= min_support) & (size < n) & (bound >= min_gap)

    feat_ok = np.zeros(F, dtype=bool)
    feat_ok[tested1] = expandable(size1[tested1], err1[tested1])

    depth_reached = 1
    if max_depth >= 2 and feat_ok.sum() >= 2:
        X = _one_hot(code_list, offsets, F)
        X_csc = X.tocsc()
        Xe = sparse.csr_matrix(X.multiply(e[:, None]))
        Xl = sparse.csr_matrix(X.multiply(losses[:, None])) if losses is not None else None
        Xs = sparse.csr_matrix(X.multiply((e * e)[:, None])) if need_squares else None

        parent_feats = np.flatnonzero(feat_ok)[:, None]
        P = X_csc[:, parent_feats[:, 0]]
        parent_keys_sorted = None
        base = F + 1
        for level in range(2, max_depth + 1):
            if deadline is not None and time.perf_counter() > deadline:
                break
            if parent_feats.shape[0] == 0:
                break
            PT = P.T.tocsr()
            product = PT @ X
            if product.shape[0] * product.shape[1] <= _DENSE_LIMIT:
                dense = product.toarray()
                rows, cols = np.nonzero(dense)
                cnt = dense[rows, cols]
            else:
                counts = product.tocoo()
                rows, cols, cnt = counts.row, counts.col, counts.data
            last_attr = feat_attr[parent_feats[:, -1]]
            keep = (cnt >= min_support) & (cnt < n) & feat_ok[cols] & (feat_attr[cols] > last_attr[rows])
            rows, cols, cnt = rows[keep], cols[keep], cnt[keep]
            children = np.concatenate([parent_feats[rows], cols[:, None]], axis=1)
            if level >= 3 and children.shape[0]:
                # Missing-parent pruning: drop one of the first level-1 features; the rest must be a kept parent.
                ok = np.ones(children.shape[0], dtype=bool)
                for drop in range(level - 1):
                    sub = np.delete(children, drop, axis=1)
                    key = np.zeros(sub.shape[0], dtype=np.int64)
                    for j in range(sub.shape[1]):
                        key = key * base + (sub[:, j] + 1)
                    pos = np.clip(np.searchsorted(parent_keys_sorted, key), 0, max(parent_keys_sorted.size - 1, 0))
                    ok &= parent_keys_sorted.size > 0
                    ok &= parent_keys_sorted[pos] == key
                rows, cols, cnt, children = rows[ok], cols[ok], cnt[ok], children[ok]
            if children.shape[0] > max_candidates:
                warnings.warn(
                    f"slice search stopped before level {level}: {children.shape[0]} candidates exceed "
                    f"max_candidates={max_candidates}; raise min_support or lower max_depth",
                    stacklevel=3,
                )
                break
            err = _pair_values(PT @ Xe, rows, cols)
            loss = _pair_values(PT @ Xl, rows, cols) if Xl is not None else None
            sq = _pair_values(PT @ Xs, rows, cols) if Xs is not None else None
            feats_out.append(children)
            stats_out.append((cnt.astype(np.float64), err, loss, sq))
            depth_reached = level
            if level == max_depth:
                break
            ok = expandable(cnt, err)
            parent_feats = children[ok]
            if parent_feats.shape[0] == 0:
                break
            P = _membership(parent_feats, feat_attr, feat_code, code_list, sizes_l)
            key = np.zeros(parent_feats.shape[0], dtype=np.int64)
            for j in range(parent_feats.shape[1]):
                key = key * base + (parent_feats[:, j] + 1)
            parent_keys_sorted = np.sort(key)

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
