"""The lattice search against brute force, its bounds, the binning, the Slice record and argument checking."""

import itertools
import json

import numpy as np
import pytest

from lightning_lens.slices import (
    Binning,
    PCABasis,
    SliceFinder,
    apply_bins,
    enumerate_slices,
    find_slices,
    fit_bins,
    gap_upper_bound,
    slices_from_json,
    slices_to_json,
)


def _random_codes(seed, n=600, levels=(2, 3, 4, 3)):
    rng = np.random.default_rng(seed)
    codes = {f"a{i}": rng.integers(0, k, n) for i, k in enumerate(levels)}
    return codes, {f"a{i}": k for i, k in enumerate(levels)}, rng


@pytest.mark.parametrize("depth", [2, 3])
def test_enumeration_equals_brute_force_without_error_pruning(depth):
    codes, n_levels, rng = _random_codes(0)
    e = (rng.random(600) < 0.3).astype(float)
    sigma = 15
    c = enumerate_slices(codes, n_levels, e, sigma, min_gap=-np.inf, max_depth=depth)
    names = list(codes)
    offsets = np.cumsum([0] + [n_levels[a] for a in names])[:-1]

    def members(conj):
        m = np.ones(600, bool)
        for a, v in conj:
            m &= codes[a] == v
        return m

    # Brute force: every conjunction over distinct attributes whose every sub-conjunction has sigma..n-1 members.
    expected = {}
    for level in range(1, depth + 1):
        for attrs in itertools.combinations(range(len(names)), level):
            for values in itertools.product(*(range(n_levels[names[a]]) for a in attrs)):
                conj = [(names[a], v) for a, v in zip(attrs, values)]
                subsets_ok = all(
                    sigma <= members(sub).sum() < 600
                    for r in range(1, level) for sub in itertools.combinations(conj, r)
                )
                m = members(conj)
                if subsets_ok and sigma <= m.sum() < 600:
                    key = tuple(sorted(offsets[a] + v for a, v in zip(attrs, values)))
                    expected[key] = (m.sum(), e[m].sum())
    got = {tuple(int(f) for f in row if f >= 0): (s, err) for row, s, err in zip(c.features, c.size, c.err_sum)}
    assert set(got) == set(expected)
    for key, (s, err) in expected.items():
        assert got[key] == (s, err)
    assert c.depth_reached == depth


def test_gap_upper_bound_holds_for_every_child():
    codes, n_levels, rng = _random_codes(1, n=2000)
    e = (rng.random(2000) < np.where(codes["a1"] == 2, 0.6, 0.2)).astype(float)
    sigma = 20
    c = enumerate_slices(codes, n_levels, e, sigma, min_gap=-np.inf, max_depth=2)
    total, n = e.sum(), e.size
    level1 = {int(r[0]): (s, k) for r, s, k in zip(c.features, c.size, c.err_sum) if r[1] < 0}
    for row, s, k in zip(c.features, c.size, c.err_sum):
        if row[1] < 0:
            continue
        gap = k / s - (total - k) / (n - s)
        for parent in row[:2]:
            ps, pk = level1[int(parent)]
            assert gap <= gap_upper_bound(ps, pk, 1.0, total, n, sigma) + 1e-12


def test_error_pruning_only_removes_children_that_cannot_reach_min_gap():
    codes, n_levels, rng = _random_codes(2, n=3000, levels=(2, 3, 4, 5, 6))
    e = (rng.random(3000) < np.where((codes["a2"] == 1) & (codes["a4"] == 0), 0.7, 0.1)).astype(float)
    full = enumerate_slices(codes, n_levels, e, 30, min_gap=-np.inf, max_depth=3)
    pruned = enumerate_slices(codes, n_levels, e, 30, min_gap=0.2, max_depth=3)
    assert len(pruned) < len(full)
    keys_pruned = set(map(tuple, pruned.features.tolist()))
    total = e.sum()
    for row, s, k in zip(full.features.tolist(), full.size, full.err_sum):
        if tuple(row) not in keys_pruned:
            assert k / s - (total - k) / (3000 - s) < 0.2


def test_binning_levels_missing_unseen_and_frozen_codes():
    meta = {
        "city": np.array(["a", "b", None, "a", "c", "b", "a"], dtype=object),
        "age": np.array([10.0, 20.0, 30.0, np.nan, 50.0, 60.0, 70.0]),
        "flag": np.array([True, False, True, True, False, False, True]),
    }
    b = fit_bins(meta, n_bins=2, numeric=["age"])
    assert b.attributes["city"].values == ("a", "b", "c")
    codes = apply_bins(b, meta)
    assert codes["city"].tolist() == [0, 1, 4, 0, 2, 1, 0]  # None -> missing (code 4), after "other" (3)
    assert codes["age"][3] == b.attributes["age"].missing_code
    assert b.predicate_text("age", 0) == "age<40" and b.predicate_text("age", 1) == "age>=40"
    assert b.predicate_text("city", 3) == "city=other" and b.predicate_text("city", 4) == "city=missing"
    # Later data: an unseen city is "other", numbers beyond the range fall in the end bins, codes do not move.
    later = apply_bins(b, {"city": ["z", "c"], "age": [-5.0, 1e6], "flag": [False, True]})
    assert later["city"].tolist() == [3, 2] and later["age"].tolist() == [0, 1]
    assert later["flag"].tolist() == codes["flag"][[1, 0]].tolist()
    # JSON round trip keeps every code.
    b2 = Binning.from_dict(json.loads(json.dumps(b.to_dict())))
    for k in meta:
        np.testing.assert_array_equal(apply_bins(b2, meta)[k], codes[k])
    with pytest.raises(KeyError, match="lacks attributes"):
        apply_bins(b, {"city": ["a"]})


def test_binning_quantiles_and_top_categories():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 1000)
    b = Binning.fit({"x": x, "cat": rng.integers(0, 50, 1000).astype(str)}, n_bins=4, max_categories=5)
    counts = np.bincount(b.transform({"x": x, "cat": ["0"] * 1000})["x"], minlength=5)
    assert counts[:4].tolist() == [250, 250, 250, 250] and counts[4] == 0
    assert len(b.attributes["cat"].values) == 5  # 5 kept + other + missing
    assert b.attributes["cat"].n_levels == 7


def _planted(seed=0, n=4000):
    rng = np.random.default_rng(seed)
    meta = {"site": rng.choice(["north", "south", "east"], n), "age": rng.uniform(20, 80, n),
            "device": rng.integers(0, 4, n)}
    planted = (meta["site"] == "south") & (meta["device"] == 2)
    errors = rng.random(n) < np.where(planted, 0.55, 0.1)
    return meta, errors, planted


def test_slice_statistics_are_consistent_with_members():
    meta, errors, planted = _planted()
    losses = errors * 2.0 + 0.1
    s = find_slices(errors, meta, losses=losses)[0]
    assert s.name == "site=south & device=2"
    members = np.zeros(errors.size, bool)
    members[s.indices] = True
    np.testing.assert_array_equal(members, planted)
    assert s.size == planted.sum() and s.errors == errors[planted].sum()
    assert s.error_rate == pytest.approx(errors[planted].mean())
    assert s.rest_rate == pytest.approx(errors[~planted].mean())
    assert s.difference == pytest.approx(s.error_rate - s.rest_rate)
    assert s.ratio == pytest.approx(s.error_rate / s.rest_rate)
    assert s.mean_loss == pytest.approx(losses[planted].mean())
    assert s.ci_low < s.error_rate < s.ci_high and 0 < s.q_value <= 0.05 and s.p_value <= s.q_value
    assert [p.text for p in s.predicates] == ["site=south", "device=2"]
    assert s.mask(meta, fit_bins(meta)).sum() == s.size


def test_json_round_trip_and_ids():
    meta, errors, planted = _planted(1)
    ids = np.arange(errors.size) * 10 + 7
    slices = find_slices(errors, meta, ids=ids)
    assert set(slices[0].indices.tolist()) == set(ids[planted].tolist())
    back = slices_from_json(slices_to_json(slices))
    assert len(back) == len(slices)
    for a, b in zip(slices, back):
        assert a.name == b.name and a.predicates == b.predicates and a.score == b.score and a.q_value == b.q_value
        np.testing.assert_array_equal(a.indices, b.indices)
    # Non-finite values survive (a rest of the data without errors gives an infinite ratio).
    errors = np.zeros(400, bool)
    errors[:60] = True
    s = find_slices(errors, {"g": np.repeat([0, 1], [60, 340])})[0]
    assert s.ratio == float("inf") and slices_from_json(slices_to_json([s]))[0].ratio == float("inf")


def test_loss_based_slices_with_welch():
    meta, _, planted = _planted(2)
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 0.3, planted.size) + planted * 0.8
    slices = find_slices(None, meta, losses=losses)
    assert slices[0].name == "site=south & device=2" and slices[0].measure == "loss"
    assert slices[0].error_rate == pytest.approx(losses[planted].mean())


def test_embedding_clusters_find_a_group_without_metadata_and_describe_it():
    rng = np.random.default_rng(0)
    n = 2000
    group = rng.integers(0, 6, n)
    emb = rng.normal(size=(6, 48))[group] * 4 + rng.normal(size=(n, 48))
    meta = {"colour": np.where(group == 4, "red", rng.choice(["red", "blue", "green"], n))}
    errors = rng.random(n) < np.where(group == 4, 0.5, 0.08)
    slices = find_slices(errors, meta, embeddings=emb, n_clusters=6)
    top = slices[0]
    assert top.kind == "embedding" and top.name.startswith(f"cluster {top.cluster} (colour=red 100%")
    inside = np.isin(top.indices, np.flatnonzero(group == 4)).mean()
    assert inside >= 0.95
    assert top.description[0]["text"] == "colour=red" and top.description[0]["lift"] > 2
    # The diluted metadata slice colour=red is explained away by the cluster.
    assert all(s.name != "colour=red" for s in slices)


def test_frozen_binning_and_pca_across_calls():
    meta, errors, _ = _planted(3)
    finder = SliceFinder()
    finder.find(errors, meta, embeddings=np.random.default_rng(0).normal(size=(errors.size, 8)))
    binning, pca = finder.binning_, finder.pca_
    shifted = dict(meta, age=meta["age"] + 30)  # a later epoch whose ages drifted
    finder.find(errors, shifted, embeddings=np.random.default_rng(1).normal(size=(errors.size, 8)))
    assert finder.binning_ is binning and finder.pca_ is pca
    restored = SliceFinder()
    restored.load_state_dict(json.loads(json.dumps(finder.state_dict())))
    np.testing.assert_array_equal(restored.binning_.transform(meta)["age"], binning.transform(meta)["age"])
    np.testing.assert_allclose(restored.pca_.components, pca.components)


def test_pca_basis_is_the_principal_subspace():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) @ np.diag([5.0, 2.0, 0.1]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    basis = PCABasis.fit(x, n_components=2)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(basis.components @ vt[:2].T), np.eye(2), atol=1e-8)
    assert basis.explained_variance_ratio.sum() > 0.99


def test_time_budget_degrades_to_level_one_and_skips_embeddings():
    meta, errors, _ = _planted(4)
    finder = SliceFinder(max_depth=3, time_budget=1e-9)
    finder.find(errors, meta, embeddings=np.zeros((errors.size, 4)) + np.arange(errors.size)[:, None] % 3)
    assert finder.last_report_["depth_reached"] == 1 and finder.last_report_["embedding_skipped"]


def test_bad_arguments_are_named():
    meta, errors, _ = _planted()
    with pytest.raises(ValueError, match="errors must be 0/1"):
        find_slices(errors * 0.5 + 0.2, meta)
    with pytest.raises(ValueError, match=r"metadata\['site'\] has 3 values"):
        find_slices(errors, {"site": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="nothing to slice on"):
        find_slices(errors, {})
    with pytest.raises(ValueError, match="pass errors"):
        find_slices(None, meta)
    with pytest.raises(ValueError, match="max_depth must be"):
        SliceFinder(max_depth=7)
    with pytest.raises(ValueError, match="correction must be"):
        SliceFinder(correction="holm")
    with pytest.raises(ValueError, match="embeddings have 3 rows"):
        find_slices(errors, meta, embeddings=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="test='welch' compares mean losses"):
        find_slices(errors, meta, test="welch")
    assert find_slices(np.zeros(errors.size), meta) == []  # no errors: nothing to find, no crash
