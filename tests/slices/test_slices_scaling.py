"""Issue 19: the slice search counts in chunks of rows (memory O(rows x attributes) + candidate statistics) with the
same candidates as the former sparse-product search, and sharded data (DDP ranks) gives the same slices as one
process from summed counts."""

import tracemalloc

import numpy as np
import pytest
from scipy import sparse

from lightning_lens.slices import SliceFinder, enumerate_slices
from lightning_lens.slices import search as search_module
from lightning_lens.slices.finder import _MembershipTable, _sample_rows
from lightning_lens.slices.shards import Gather, Sum, run_local, run_sharded
from lightning_lens.slices.search import gap_upper_bound


# ------------------------------------------------------------------------------------------------ reference
def former_search(codes, n_levels, measure, min_support, min_gap, max_depth=2, losses=None, need_squares=False):
    """The search before issue 19 (sparse one-hot products, per-candidate row masks), kept as the reference.

    Returns ``(features, level, size, err_sum, loss_sum, sq_sum, depth_reached)`` in the order it produced them.
    """
    attributes = list(codes)
    n = int(measure.size)
    sizes_l = [int(n_levels[a]) for a in attributes]
    offsets = np.concatenate([[0], np.cumsum(sizes_l)[:-1]]).astype(np.int64)
    F = int(sum(sizes_l))
    feat_attr = np.repeat(np.arange(len(attributes)), sizes_l)
    code_list = [np.asarray(codes[a], dtype=np.int64) for a in attributes]
    e = np.asarray(measure, dtype=np.float64)
    total, max_e = float(e.sum()), float(e.max())
    m = len(attributes)
    fids = (np.stack(code_list, axis=1) + offsets[None, :]).ravel()
    size1 = np.bincount(fids, minlength=F).astype(np.float64)
    err1 = np.bincount(fids, weights=np.repeat(e, m), minlength=F)
    loss1 = np.bincount(fids, weights=np.repeat(losses, m), minlength=F) if losses is not None else None
    sq1 = np.bincount(fids, weights=np.repeat(e * e, m), minlength=F) if need_squares else None
    tested1 = (size1 >= min_support) & (size1 < n)
    feats_out = [np.flatnonzero(tested1)[:, None]]
    pick = lambda a, k: None if a is None else a[k]  # noqa: E731
    stats_out = [(size1[tested1], err1[tested1], pick(loss1, tested1), pick(sq1, tested1))]

    def expandable(size, err):
        bound = gap_upper_bound(size, err, max_e, total, n, min_support)
        return (size >= min_support) & (size < n) & (bound >= min_gap)

    feat_ok = np.zeros(F, dtype=bool)
    feat_ok[tested1] = expandable(size1[tested1], err1[tested1])
    depth_reached = 1
    if max_depth >= 2 and feat_ok.sum() >= 2:
        X = sparse.csr_matrix((np.ones(n * m), fids, np.arange(0, n * m + 1, m)), shape=(n, F))
        weighted = {"err": sparse.csr_matrix(X.multiply(e[:, None]))}
        if losses is not None:
            weighted["loss"] = sparse.csr_matrix(X.multiply(losses[:, None]))
        if need_squares:
            weighted["sq"] = sparse.csr_matrix(X.multiply((e * e)[:, None]))
        parent_feats = np.flatnonzero(feat_ok)[:, None]
        P = X.tocsc()[:, parent_feats[:, 0]]
        parent_keys, base = None, F + 1
        for level in range(2, max_depth + 1):
            PT = P.T.tocsr()
            dense = (PT @ X).toarray()
            rows, cols = np.nonzero(dense)
            cnt = dense[rows, cols]
            last_attr = feat_attr[parent_feats[:, -1]]
            keep = (cnt >= min_support) & (cnt < n) & feat_ok[cols] & (feat_attr[cols] > last_attr[rows])
            rows, cols, cnt = rows[keep], cols[keep], cnt[keep]
            children = np.concatenate([parent_feats[rows], cols[:, None]], axis=1)
            if level >= 3 and children.shape[0]:
                ok = np.ones(children.shape[0], dtype=bool)
                for drop in range(level - 1):
                    sub = np.delete(children, drop, axis=1)
                    key = np.zeros(sub.shape[0], dtype=np.int64)
                    for j in range(sub.shape[1]):
                        key = key * base + (sub[:, j] + 1)
                    ok &= np.isin(key, parent_keys)
                rows, cols, cnt, children = rows[ok], cols[ok], cnt[ok], children[ok]
            sums = {k: (PT @ w).toarray()[rows, cols] for k, w in weighted.items()}
            feats_out.append(children)
            stats_out.append((cnt, sums["err"], sums.get("loss"), sums.get("sq")))
            depth_reached = level
            if level == max_depth:
                break
            parent_feats = children[expandable(cnt, sums["err"])]
            if parent_feats.shape[0] == 0:
                break
            member = np.ones((n, parent_feats.shape[0]), dtype=bool)  # the per-candidate row masks
            for j in range(parent_feats.shape[1]):
                member &= X.tocsc()[:, parent_feats[:, j]].toarray().astype(bool)
            P = sparse.csc_matrix(member.astype(np.float64))
            key = np.zeros(parent_feats.shape[0], dtype=np.int64)
            for j in range(parent_feats.shape[1]):
                key = key * base + (parent_feats[:, j] + 1)
            parent_keys = np.sort(key)
    width = max(f.shape[1] for f in feats_out)
    features = np.concatenate([np.pad(f, ((0, 0), (0, width - f.shape[1])), constant_values=-1) for f in feats_out])
    level_arr = np.concatenate([np.full(f.shape[0], f.shape[1]) for f in feats_out])
    cat = lambda i: None if stats_out[0][i] is None else np.concatenate([s[i] for s in stats_out])  # noqa: E731
    return features, level_arr, cat(0), cat(1), cat(2), cat(3), depth_reached


def _random_problem(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 7)), int(rng.integers(60, 3000))
    n_levels = {f"a{i}": int(k) for i, k in enumerate(rng.integers(1, 9, m))}
    codes = {a: rng.integers(0, k, n) for a, k in n_levels.items()}
    errors = (rng.random(n) < np.where(codes["a0"] == 0, 0.5, 0.1)).astype(float)
    losses = rng.gamma(2.0, 0.3, n) + errors
    return rng, codes, n_levels, errors, losses


@pytest.mark.parametrize("seed", range(40))
def test_chunked_search_equals_the_former_sparse_product_search(seed, monkeypatch):
    """Same candidates, in the same order, with the same sums, whatever the chunk size and table layout (dense
    tables, tables of present cells only, several passes over the rows)."""
    rng, codes, n_levels, errors, losses = _random_problem(seed)
    loss_mode = seed % 4 == 3
    measure = losses if loss_mode else errors
    sigma = int(rng.integers(1, 40))
    min_gap = float(rng.choice([-np.inf, 0.0, 0.05, 0.2]))
    depth = int(rng.integers(1, 5))
    kwargs = dict(max_depth=depth, losses=None if loss_mode else losses, need_squares=loss_mode)
    expected = former_search(codes, n_levels, measure, sigma, min_gap, **kwargs)
    monkeypatch.setattr(search_module, "_DENSE_CELLS", [1 << 22, 4, 30][seed % 3])
    monkeypatch.setattr(search_module, "_GROUP_CELLS", [1 << 23, 50][seed % 2])
    got = enumerate_slices(codes, n_levels, measure, sigma, min_gap, chunk_rows=[1 << 16, 37, 500][seed % 3],
                           **kwargs)
    np.testing.assert_array_equal(got.features, expected[0])
    np.testing.assert_array_equal(got.level, expected[1])
    np.testing.assert_array_equal(got.size, expected[2])
    if loss_mode:  # float sums in another order
        np.testing.assert_allclose(got.err_sum, expected[3], rtol=1e-12)
        np.testing.assert_allclose(got.sq_sum, expected[5], rtol=1e-12)
    else:
        np.testing.assert_array_equal(got.err_sum, expected[3])
        np.testing.assert_allclose(got.loss_sum, expected[4], rtol=1e-12)
    assert got.depth_reached == expected[6]


def test_search_memory_is_rows_times_attributes_plus_the_candidates():
    """Regression: depth 3 used to build a row x parent membership (about 2.2 KB a row); now the codes (one byte per
    attribute a row) and fixed-size chunks. Traced allocations of the search and of the whole finder."""
    n, levels = 300_000, (2, 3, 4, 5, 6, 8, 4, 3)
    rng = np.random.default_rng(0)
    codes = {f"a{i}": rng.integers(0, k, n).astype(np.uint8) for i, k in enumerate(levels)}
    planted = (codes["a2"] == 1) & (codes["a5"] == 3)
    errors = rng.random(n) < np.where(planted, 0.45, 0.08)
    fixed = 32 * 2**20  # chunk temporaries and candidate tables, independent of n
    tracemalloc.start()
    try:
        found = enumerate_slices(codes, dict(zip(codes, levels)), errors.astype(float), 30, 0.05, max_depth=3)
        search_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        slices = SliceFinder(max_depth=3, min_support=30).find(errors, codes)
        finder_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) > 4000 and found.depth_reached == 3
    assert slices[0].name == "a2=1 & a5=3"
    assert search_peak < 2 * n * len(levels) + fixed, search_peak / n
    # the finder also holds int64 codes from the binning (8 bytes per attribute a row) and the per-row outcomes
    assert finder_peak < 12 * n * len(levels) + fixed, finder_peak / n


# ------------------------------------------------------------------------------------------------ shards
def _shard(rng, n, k):
    return np.array_split(rng.permutation(n), k)


@pytest.mark.parametrize("seed", range(12))
def test_sharded_search_gives_the_slices_of_one_process(seed):
    """Random shardings (2-4 shards, rows shuffled), metadata of every kind and embeddings: each shard counts its
    rows and the counts are summed; every shard ends with the slices of one process on all rows, members and
    q-values included. With fit_rows below n, the fitting sample is chosen by id hash, the same in both."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(800, 4000))
    meta = {"a0": rng.integers(0, 4, n), "a1": rng.integers(0, 3, n), "x": rng.normal(size=n),
            "s": rng.choice(np.array(["p", "q", "r", None], dtype=object), n)}
    group = rng.integers(0, 5, n)
    emb = rng.normal(size=(5, 12))[group] * 3 + rng.normal(size=(n, 12))
    errors = rng.random(n) < np.where((meta["a0"] == 0) & (meta["x"] > 0), 0.5, 0.1)
    errors |= rng.random(n) < np.where(group == 2, 0.3, 0.0)
    losses = rng.gamma(2.0, 0.3, n) + errors
    kwargs = dict(max_depth=int(rng.integers(1, 4)), fit_rows=int(rng.choice([20_000, 500])))
    loss_mode = seed % 4 == 3
    target = None if loss_mode else errors
    one = SliceFinder(**kwargs).find(target, meta, losses=losses, embeddings=emb)
    assert one, "nothing found: the test would compare nothing"
    parts = _shard(rng, n, int(rng.integers(2, 5)))
    finders = [SliceFinder(**kwargs) for _ in parts]
    sharded = run_sharded([f.find_steps(None if target is None else target[p], {k: v[p] for k, v in meta.items()},
                                        losses=losses[p], embeddings=emb[p], ids=p) for f, p in zip(finders, parts)])

    def key(s):
        return s.name, s.size, round(s.errors, 9), s.indices.tolist(), round(s.q_value, 12), s.description

    for result, finder in zip(sharded, finders):
        assert [key(s) for s in result] == [key(s) for s in one]
        assert finder.binning_.to_dict() == finders[0].binning_.to_dict()


def test_fitting_sample_depends_on_ids_only():
    ids = np.arange(50_000) * 7 + 3
    whole = set(ids[_sample_rows(ids, ids.size, 2_000, seed=0)].tolist())
    split = np.array_split(np.random.default_rng(0).permutation(ids.size), 3)
    assert set().union(*(set(ids[p][_sample_rows(ids[p], ids.size, 2_000, 0)].tolist()) for p in split)) == whole
    assert 1_700 < len(whole) < 2_300
    assert _sample_rows(ids[:100], 100, 2_000, 0).tolist() == list(range(100))  # n <= fit_rows: every row


def test_membership_table_counts_equal_row_masks():
    rng = np.random.default_rng(3)
    n, k = 5000, 70  # more than 64 slices: patterns span two words
    masks = rng.random((n, k)) < rng.uniform(0.01, 0.6, k)
    x = rng.random(n)
    table = _MembershipTable.count(((lo, masks[lo:lo + 700]) for lo in range(0, n, 700)), x)
    for i, j in [(0, 1), (5, 69), (68, 2)]:
        a, b = masks[:, i], masks[:, j]
        assert table.jaccard(i, j) == pytest.approx((a & b).sum() / (a | b).sum(), abs=0)
        rows = a & ~b
        size, total, squares = table.stats(table.bits[:, i] & ~table.bits[:, j])
        assert (size, total) == (rows.sum(), pytest.approx(x[rows].sum(), rel=1e-12))
        assert squares == pytest.approx((x[rows] ** 2).sum(), rel=1e-12)


def test_shard_drivers():
    def steps(values):
        total = yield Sum({"s": np.array([float(sum(values))])})
        everyone = yield Gather(len(values))
        return float(total["s"][0]), everyone

    assert run_local(steps([1, 2])) == (3.0, [2])
    assert run_sharded([steps([1, 2]), steps([4])]) == [(7.0, [2, 1]), (7.0, [2, 1])]

    def diverging(ask_more):
        yield Sum({"s": np.zeros(1)})
        if ask_more:
            yield Gather(1)
        return 0

    with pytest.raises(RuntimeError, match="shards diverged"):
        run_sharded([diverging(True), diverging(False)])
