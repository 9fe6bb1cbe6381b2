"""Data-randomization test: permuted labels and the trained twin, without touching the user's module or RNG."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import Subset

from lightning_lens.datasets import SpuriousDigits
from lightning_lens.sanity import PermutedLabels, data_randomization_test
from lightning_lens.testing import LitClassifier, SmallCNN


def test_permuted_labels_keep_class_counts_for_tuples_and_dicts():
    tuples = [(torch.full((2,), float(i)), i % 3) for i in range(30)]
    permuted = PermutedLabels(tuples, seed=1)
    labels = [permuted[i][1] for i in range(30)]
    assert Counter(labels) == Counter(i % 3 for i in range(30))  # a permutation: the marginals are exact
    assert labels != [i % 3 for i in range(30)]
    assert all(torch.equal(permuted[i][0], tuples[i][0]) for i in range(30))  # inputs untouched
    assert PermutedLabels(tuples, seed=1).permutation.tolist() == permuted.permutation.tolist()

    dicts = [{"image": torch.zeros(1), "label": torch.tensor(i % 4), "index": i} for i in range(12)]
    permuted_dicts = PermutedLabels(dicts, labels=[i % 4 for i in range(12)], seed=0)
    item = permuted_dicts[5]
    assert item["index"] == 5 and item["label"].dtype == torch.int64
    assert Counter(int(permuted_dicts[i]["label"]) for i in range(12)) == Counter(i % 4 for i in range(12))
    with pytest.raises(KeyError, match="label_key"):
        PermutedLabels([{"x": 1}])
    with pytest.raises(ValueError, match="3 entries"):
        PermutedLabels(tuples, labels=[0, 1, 2])


def test_data_randomization_trains_a_twin_and_leaves_the_module_alone(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lit = LitClassifier(model=SmallCNN(width=4), lr=5e-3)
    train = Subset(SpuriousDigits("train", seed=0), range(128))
    val = SpuriousDigits("val", seed=0)
    probes = torch.stack([val[i]["image"] for i in range(6)])
    labels = torch.tensor([val[i]["label"] for i in range(6)])
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    rng = torch.get_rng_state()
    report = data_randomization_test(
        lit, train, probes, labels, ["gradient"], max_epochs=2, batch_size=32,
        trainer_kwargs={"accelerator": "cpu", "default_root_dir": str(tmp_path)},
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in lit.state_dict().items())
    assert report.epochs == 2 and 0.0 <= report.train_accuracy <= 1.0 and 0.0 <= report.probe_accuracy <= 1.0
    assert report.similarity["gradient"]["spearman_signed"].shape == (6,)
    assert report.maps["gradient"].shape == (2, 6, 32, 32)
    assert report.verdicts["gradient"].outcome in ("passes", "fails", "inconclusive")
    # the twin really is another model
    assert any(not torch.equal(a, b) for a, b in zip(report.model.parameters(), lit.parameters()))
    assert "Data randomization test" in report.summary()
    json.dumps(report.to_dict())
    with pytest.raises(TypeError, match="LightningModule"):
        data_randomization_test(SmallCNN(width=4), train, probes, labels)
