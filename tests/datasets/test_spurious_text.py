"""SpuriousText: labels from content, the planted shortcut token at exact rates in training and randomized at
validation, deterministic from the seed, items and metadata consistent with the token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_lens.datasets import SpuriousText
from lightning_lens.datasets.spurious_text import _NEGATIVE, _POSITIVE


def _majority(words: list[str]) -> int:
    pos = sum(w in _POSITIVE for w in words)
    neg = sum(w in _NEGATIVE for w in words)
    assert pos != neg
    return int(pos > neg)


@pytest.fixture(scope="module")
def splits() -> dict[str, SpuriousText]:
    return {"train": SpuriousText("train", seed=3, size=600), "val": SpuriousText("val", seed=3, size=600)}


def test_labels_are_the_majority_sentiment_of_the_words(splits):
    for ds in splits.values():
        for i in range(len(ds)):
            assert _majority(ds.decode(ds.input_ids[i]).split()) == int(ds.labels[i])


def test_training_shortcut_gives_the_label_away_at_an_exact_rate_per_class(splits):
    ds = splits["train"]
    cls, y = ds.metadata["shortcut_class"], ds.labels.numpy()
    for c in (0, 1):
        members = y == c
        assert (cls[members] >= 0).sum() == round(0.9 * members.sum())
    present = cls >= 0
    assert np.array_equal(cls[present], y[present])  # in training the token always matches the label
    assert ds.metadata["shortcut_consistent"][present].all()


def test_validation_shortcut_is_uninformative(splits):
    ds = splits["val"]
    cls, y = ds.metadata["shortcut_class"], ds.labels.numpy()
    present = cls >= 0
    assert present.mean() == pytest.approx(0.5, abs=0.01)
    agreement = (cls[present] == y[present]).mean()
    assert 0.4 < agreement < 0.6  # a coin flip, not the label


@pytest.mark.parametrize("mode, agree", [("consistent", 1.0), ("conflicting", 0.0)])
def test_eval_modes(mode, agree):
    ds = SpuriousText("test", seed=1, size=200, eval_shortcut_mode=mode, eval_shortcut_fraction=1.0)
    cls = ds.metadata["shortcut_class"]
    assert (cls >= 0).all()
    assert (cls == ds.labels.numpy()).mean() == agree
    assert (SpuriousText("test", size=50, eval_shortcut_mode="absent").metadata["shortcut_present"] == 0).all()


def test_shortcut_position_points_at_the_shortcut_token(splits):
    for ds in splits.values():
        pos, cls = ds.metadata["shortcut_position"], ds.metadata["shortcut_class"]
        for i in range(len(ds)):
            ids = ds.input_ids[i].tolist()
            shortcut_at = [j for j, t in enumerate(ids) if t in ds.shortcut_ids]
            if cls[i] < 0:
                assert shortcut_at == [] and pos[i] == -1
            else:
                assert shortcut_at == [pos[i]] and ids[pos[i]] == ds.shortcut_ids[cls[i]]


def test_items_ids_mask_and_metadata():
    ds = SpuriousText("val", seed=0, size=64)
    item = ds[5]
    ids, mask = item["input_ids"], item["attention_mask"]
    assert ids.dtype == torch.long and ids[0] == ds.cls_id
    assert torch.equal(mask, (ids != ds.pad_id).long())
    n = int(mask.sum())
    assert n == item["n_tokens"] and (ids[n:] == ds.pad_id).all() and (ids[:n] != ds.pad_id).all()
    assert item["length_bin"] == item["n_clauses"] - 1
    assert ds.convert_ids_to_tokens(ids[:1]) == ["[CLS]"]
    assert ds.vocabulary[ds.pad_id] == "[PAD]" and len(set(ds.vocabulary)) == len(ds.vocabulary)


def test_deterministic_from_the_seed_and_the_shortcut_never_moves_the_sentences():
    a, b = SpuriousText("train", seed=7, size=100), SpuriousText("train", seed=7, size=100)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, SpuriousText("train", seed=8, size=100).input_ids)
    clean = SpuriousText("train", seed=7, size=100, train_shortcut_fraction=0.0)
    def strip(ds):
        return [[t for t in row.tolist() if t not in (*ds.shortcut_ids, ds.pad_id)] for row in ds.input_ids]

    assert strip(a) == strip(clean) and torch.equal(a.labels, clean.labels)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"split": "dev"}, ValueError, "split must be one of"),
    ({"train_shortcut_fraction": 1.5}, ValueError, "train_shortcut_fraction"),
    ({"max_length": 10}, ValueError, "max_length must be >= 21"),
    ({"size": 0}, ValueError, "size must be >= 1"),
    ({"eval_shortcut_mode": "sometimes"}, ValueError, "eval_shortcut_mode"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpuriousText(**kwargs)
