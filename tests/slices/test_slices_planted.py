"""Planted-slice recovery in the style of dcbench (Eyuboglu et al. 2022): synthetic predictions, known slices.

Scores follow dcbench's ``synthesize_preds``: Beta(s, 1 - s) for positives and Beta(1 - s', s') for negatives, with
sensitivity = specificity = 0.8 outside the planted slice and 0.5 inside; predictions threshold the score at 0.5.
dcbench ranks examples by slice membership and reports precision@10 of the ground-truth slice; with hard metadata
slices we also check the stronger precision over all of the top slice's members.
"""

import numpy as np
import pytest

from lightning_lens.slices import find_slices

CARDINALITIES = {"a0": 2, "a1": 3, "a2": 4, "a3": 5, "a4": 6, "a5": 3}


def synthesize(seed, n=5000, planted_attrs=2):
    rng = np.random.default_rng(seed)
    meta = {k: rng.integers(0, c, n) for k, c in CARDINALITIES.items()}
    meta["score_x"] = rng.normal(size=n)  # a numeric attribute, quantile-binned
    planted = np.zeros(n, dtype=bool)
    name = None
    if planted_attrs:
        attrs = sorted(rng.choice(list(CARDINALITIES)[:5], planted_attrs, replace=False))
        values = {a: int(rng.integers(0, CARDINALITIES[a])) for a in attrs}
        planted = np.all([meta[a] == v for a, v in values.items()], axis=0)
        name = " & ".join(f"{a}={v}" for a, v in values.items())
    target = rng.integers(0, 2, n)
    sens = np.where(planted, 0.5, 0.8)
    spec = np.where(planted, 0.5, 0.8)
    score = np.where(target == 1, rng.beta(sens, 1 - sens), rng.beta(1 - spec, spec))
    errors = (score > 0.5) != (target == 1)
    loss = -np.log(np.clip(np.where(target == 1, score, 1 - score), 1e-7, 1))
    return meta, errors, loss, planted, name


def precision_at_k(slice_members, loss, planted, k=10):
    """dcbench's precision@k with a hard slice: members first (most confident mistakes first), top k in the truth."""
    membership = np.zeros(planted.size)
    membership[slice_members] = 1.0
    order = np.lexsort((-loss, -membership))
    return planted[order[:k]].mean()


@pytest.mark.parametrize("seed", range(8))
def test_planted_two_way_slice_ranks_first(seed):
    meta, errors, loss, planted, name = synthesize(seed)
    slices = find_slices(errors, meta, losses=loss)
    assert slices, "the planted slice was not found"
    top = slices[0]
    assert top.name == name
    precision = planted[top.indices].mean()
    assert precision >= 0.9
    assert precision_at_k(top.indices, loss, planted) >= 0.9
    assert planted[top.indices].sum() / planted.sum() >= 0.9  # recall


def test_planted_three_way_slice_needs_depth_three():
    rng_seed = 11
    meta, errors, loss, planted, name = synthesize(rng_seed, n=10_000, planted_attrs=3)
    top3 = find_slices(errors, meta, max_depth=3)[0]
    assert top3.name == name and planted[top3.indices].mean() >= 0.9
    top2 = find_slices(errors, meta, max_depth=2)[0]
    assert top2.level == 2 and set(top2.name.split(" & ")) < set(name.split(" & "))  # the best it can do: a parent


def test_nothing_planted_nothing_reported_in_95_percent_of_50_seeds():
    reported = []
    for seed in range(50):
        meta, errors, loss, _, _ = synthesize(1000 + seed, planted_attrs=0)
        if find_slices(errors, meta, losses=loss):
            reported.append(seed)
    assert len(reported) <= 2, f"slices reported under the null for seeds {reported}"
