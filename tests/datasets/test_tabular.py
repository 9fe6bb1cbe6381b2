"""LeakyTabular: scikit-learn's bundled tables, standardised on the training split, with a leaky last column."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine

from lightning_lens.datasets import LeakyTabular


@pytest.mark.parametrize("table, loader", [("breast_cancer", load_breast_cancer), ("wine", load_wine)])
def test_splits_partition_the_table_and_features_are_its_values_standardised(table, loader):
    splits = LeakyTabular.splits(seed=2, table=table)
    data = loader()
    rows = np.concatenate([ds.source_indices for ds in splits.values()])
    assert sorted(rows.tolist()) == list(range(len(data.target)))
    train = splits["train"]
    raw = data.data[train.source_indices]
    expected = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    np.testing.assert_allclose(train.features[:, :-1].numpy(), expected, atol=1e-4)
    for ds in splits.values():
        assert np.array_equal(ds.labels.numpy(), data.target[ds.source_indices])
    assert train.feature_names[-1] == "leak" and len(train.feature_names) == train.num_features
    assert train.num_classes == len(np.unique(data.target))


def test_the_leak_is_the_label_in_training_and_shuffled_at_validation():
    splits = LeakyTabular.splits(seed=0)
    train, val = splits["train"], splits["val"]
    corr = np.corrcoef(train.features[:, -1].numpy(), train.labels.numpy())[0, 1]
    assert corr > 0.97
    assert train.metadata["leak_consistent"].mean() == 1.0  # noise 0.1: the rounded leak is the label
    val_corr = np.corrcoef(val.features[:, -1].numpy(), val.labels.numpy())[0, 1]
    assert abs(val_corr) < 0.3
    consistent = LeakyTabular("val", seed=0, eval_leak_mode="consistent")
    assert np.allclose(np.sort(consistent.features[:, -1].numpy()), np.sort(val.features[:, -1].numpy()))
    assert consistent.metadata["leak_consistent"].mean() == 1.0
    assert np.array_equal(consistent.features[:, :-1].numpy(), val.features[:, :-1].numpy())


def test_items_and_slice_metadata():
    ds = LeakyTabular("val", seed=0)
    item = ds[3]
    assert item["features"].shape == (31,) and item["label"] == int(ds.labels[3]) and item["index"] == 3
    assert set(ds.metadata) == {"mean_radius_bin", "mean_texture_bin", "leak_consistent"}
    assert set(np.unique(ds.metadata["mean_radius_bin"]).tolist()) <= {0, 1, 2}
    assert item["mean_radius_bin"] == int(ds.metadata["mean_radius_bin"][3])


def test_deterministic():
    a, b = LeakyTabular("train", seed=4), LeakyTabular("train", seed=4)
    assert np.array_equal(a.features.numpy(), b.features.numpy())
    assert not np.array_equal(a.source_indices, LeakyTabular("train", seed=5).source_indices)


@pytest.mark.parametrize("kwargs, match", [
    ({"table": "iris"}, "table must be one of"),
    ({"leak_noise": 0.0}, "leak_noise"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
    ({"eval_leak_mode": "random"}, "eval_leak_mode"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeakyTabular(**kwargs)
