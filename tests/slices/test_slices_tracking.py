"""Following slices across epochs (SliceTracker) and the reservoir of examples, without a Trainer."""

import json

import numpy as np
import pytest
import torch

from lightning_lens.slices import Reservoir, SliceFinder, SliceTracker, tracking_name


def planted(seed, n=3000, shift=0.0, second=False):
    """Metadata with a planted ``site=b & age=2`` slice (and ``site=c & age=0`` if ``second``); ``shift`` moves the
    numeric ``score`` distribution."""
    rng = np.random.default_rng(seed)
    meta = {"site": rng.choice(["a", "b", "c"], n), "age": rng.integers(0, 3, n), "score": rng.normal(shift, 1, n)}
    group = (meta["site"] == "b") & (meta["age"] == 2)
    rate = np.where(group, 0.5, 0.08)
    if second:
        rate = np.where((meta["site"] == "c") & (meta["age"] == 0), 0.4, rate)
    errors = rng.random(n) < rate
    return meta, errors, group


def test_metadata_slices_keep_their_name_and_are_remeasured_with_the_frozen_binning():
    meta, errors, group = planted(0)
    finder = SliceFinder(freeze=True)
    tracker = SliceTracker()
    slices = finder.find(errors, meta, ids=np.arange(errors.size) + 1000)
    names = tracker.add(slices, epoch=3)
    assert names[0] == "site=b&age=2" and tracker.first_seen("site=b&age=2") == 3

    # a later epoch: other samples, other ids, a shifted numeric attribute; the binning stays the one of epoch 3
    meta2, errors2, group2 = planted(1, n=2000, shift=5.0)
    edges = finder.binning_.to_dict()
    accuracies = tracker.accuracies(~errors2, np.arange(2000), meta2, finder.binning_)
    assert accuracies["site=b&age=2"] == (~errors2)[group2].mean()
    for name in names[1:]:  # every other followed slice, recomputed from its predicates by hand
        spec = tracker.tracked[name]
        mask = np.ones(2000, dtype=bool)
        for p in spec["predicates"]:
            mask &= finder.binning_.attributes[p["attribute"]].codes(meta2[p["attribute"]]) == p["code"]
        assert accuracies[name] == (~errors2)[mask].mean()
    assert finder.binning_.to_dict() == edges
    assert tracker.add(finder.find(errors, meta), epoch=4)[0] == "site=b&age=2"
    assert tracker.first_seen("site=b&age=2") == 3  # first seen stays


def test_embedding_clusters_are_followed_by_member_ids():
    rng = np.random.default_rng(0)
    n = 1200
    emb = rng.normal(size=(n, 8))
    emb[:200] += 6.0  # one tight, separate cluster
    errors = rng.random(n) < np.where(np.arange(n) < 200, 0.6, 0.05)
    ids = np.arange(n) * 3
    slices = SliceFinder(n_clusters=4, min_support=50).find(errors, None, embeddings=emb, ids=ids)
    assert slices and slices[0].kind == "embedding"
    tracker = SliceTracker()
    (name,) = tracker.add(slices[:1], epoch=2)
    assert name == f"cluster{slices[0].cluster}@epoch2"
    correct = rng.random(n) < 0.7  # another epoch's outcomes for the same ids, in another order
    order = rng.permutation(n)
    members = np.isin(ids, slices[0].indices)
    assert tracker.accuracies(correct[order], ids[order], {}, None)[name] == correct[members].mean()


def test_tracking_is_capped_and_round_trips_through_json():
    meta, errors, _ = planted(0, second=True)
    finder = SliceFinder()
    slices = finder.find(errors, meta)
    assert len(slices) >= 2
    tracker = SliceTracker(max_tracked=1)
    names = tracker.add(slices, epoch=0)
    assert list(tracker.tracked) == names[:1]  # only the first is followed; all are named
    restored = SliceTracker(max_tracked=1)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.tracked == tracker.tracked
    assert restored.accuracies(~errors, np.arange(errors.size), meta, finder.binning_) == tracker.accuracies(
        ~errors, np.arange(errors.size), meta, finder.binning_)
    with pytest.raises(ValueError, match="max_tracked must be >= 0"):
        SliceTracker(max_tracked=-1)


def test_a_followed_slice_without_its_attribute_is_not_measured():
    meta, errors, _ = planted(0)
    finder = SliceFinder()
    tracker = SliceTracker()
    tracker.add(finder.find(errors, meta), epoch=0)
    without_site = {k: v for k, v in meta.items() if k != "site"}
    assert "site=b&age=2" not in tracker.accuracies(~errors, np.arange(errors.size), without_site, finder.binning_)
    assert tracker.accuracies(~errors, np.arange(errors.size), meta, None) == {}


def test_tracking_names_are_metric_safe():
    meta, errors, _ = planted(0)
    for s in SliceFinder().find(errors, meta):
        name = tracking_name(s, 0)
        assert " " not in name and "/" not in name and name


# -------------------------------------------------------------------------------------------------------- reservoir
def test_reservoir_keeps_everything_until_full_then_the_capacity():
    r = Reservoir(capacity=5, seed=0)
    for i in range(4):
        r.offer(i, i * 10)
    assert r.keys() == [0, 1, 2, 3] and r.as_dict() == {0: 0, 1: 10, 2: 20, 3: 30}
    for i in range(4, 50):
        r.offer(i, i * 10)
    assert len(r) == 5 and r.seen == 50
    assert all(v == k * 10 for k, v in r.as_dict().items())
    r.reset()
    assert len(r) == 0 and r.seen == 0
    assert len(Reservoir(capacity=0)) == 0


def test_reservoir_sample_is_uniform():
    """Algorithm R: after n offers each item is held with probability k / n (here 4 / 20 = 0.2)."""
    k, n, trials = 4, 20, 4000
    held = np.zeros(n)
    for seed in range(trials):
        r = Reservoir(capacity=k, seed=seed)
        for i in range(n):
            r.offer(i, None)
        held[r.keys()] += 1
    freq = held / trials
    # binomial standard error sqrt(0.2 * 0.8 / 4000) = 0.0063; 5 sigma
    assert np.all(np.abs(freq - k / n) < 0.032), freq
    assert held.sum() == k * trials


def test_reservoir_leaves_the_global_random_state_alone():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    r = Reservoir(capacity=2, seed=3)
    for i in range(100):
        r.offer(i, i)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])
    again = Reservoir(capacity=2, seed=3)
    for i in range(100):
        again.offer(i, i)
    assert again.keys() == r.keys()  # same seed, same sample
