"""The kNN evaluation without a Trainer: exact metrics on a toy memory, the head left untouched, non-finite rows
excluded, the linear probe equal to scikit-learn's, and the gallery image's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from lightning_lens.interpretable_models import KNNHead
from lightning_lens.interpretable_models.knn_evaluation import (
    evaluate_knn,
    knn_linear_probe,
    linear_probe_accuracy,
    neighbor_gallery_image,
)


def toy_head() -> KNNHead:
    """Four memory entries on the axes: classes 0 (e0, e1) and 1 (e2, e3); k=2, credibility over 2 neighbours."""
    head = KNNHead(4, 2, k=2, memory_size=4, credibility_k=2)
    head.write(torch.eye(4), torch.tensor([0, 0, 1, 1]), torch.arange(4))
    return head


def toy_queries():
    # between e0 and e1 (both class 0) or e2 and e3 (class 1); the last one carries the wrong label
    q = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.9], [0.0, 0.0, 0.9, 1.0]])
    q = q.repeat(3, 1)
    labels = torch.tensor([0, 0, 1, 1]).repeat(3)
    labels[-1] = 0
    return q, labels


def test_metrics_are_exact_on_a_toy_memory():
    head = toy_head()
    q, labels = toy_queries()
    result = evaluate_knn(head, q, labels, calibration_fraction=0.5, seed=0)
    assert result.calibration_rows.numel() == 6 and result.test_rows.numel() == 6
    assert sorted(torch.cat([result.calibration_rows, result.test_rows]).tolist()) == list(range(12))
    wrong_in_test = 11 in result.test_rows.tolist()
    # every query's 2 neighbours carry the class it is predicted as; only the mislabelled one disagrees with its label
    expected_accuracy = 1.0 - (1 / 6 if wrong_in_test else 0.0)
    assert result.metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert result.metrics["neighbor_label_agreement"] == 1.0
    assert result.metrics["neighbor_true_label_agreement"] == pytest.approx(expected_accuracy)
    # nonconformity of a calibration row: neighbours not carrying its label (0, or 2 for the mislabelled one)
    expected_scores = sorted(2.0 if r == 11 else 0.0 for r in result.calibration_rows.tolist())
    assert result.calibration_scores.tolist() == expected_scores
    # credibility of the predicted class (nonconformity 0): every calibration score is >= 0, so p = 1
    assert result.metrics["mean_credibility"] == 1.0
    assert result.metrics["eval_samples"] == 12.0 and result.excluded_nonfinite == 0
    assert result.metrics["memory/filled_fraction"] == 1.0


def test_evaluation_leaves_the_head_untouched_and_restores_its_mode():
    head = toy_head().train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    evaluate_knn(head, *toy_queries())
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no calibration_scores, no step
    assert head.training and head.calibration_scores.numel() == 0


def test_nonfinite_rows_are_excluded_and_counted():
    head = toy_head()
    q, labels = toy_queries()
    dirty = torch.cat([q[:4], torch.full((2, 4), float("nan")), q[4:], torch.tensor([[float("inf"), 0, 0, 0]])])
    dirty_labels = torch.cat([labels[:4], torch.tensor([0, 1]), labels[4:], torch.tensor([1])])
    result = evaluate_knn(head, dirty, dirty_labels)
    assert result.excluded_nonfinite == 3 and result.metrics["eval_samples"] == 12.0
    kept = torch.cat([result.calibration_rows, result.test_rows])
    assert torch.isfinite(dirty[kept]).all() and kept.numel() == 12
    assert all(np.isfinite(v) for v in result.metrics.values())


def test_split_is_reproducible_and_private():
    head = toy_head()
    q, labels = toy_queries()
    state = torch.get_rng_state()
    a, b = evaluate_knn(head, q, labels, seed=3), evaluate_knn(head, q, labels, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.test_rows, b.test_rows) and a.metrics == b.metrics


def test_argument_errors():
    head = toy_head()
    q, labels = toy_queries()
    with pytest.raises(ValueError, match="calibration_fraction must be < 1.0"):
        evaluate_knn(head, q, labels, calibration_fraction=1.0)
    with pytest.raises(TypeError, match="head must be a KNNHead"):
        evaluate_knn(torch.nn.Linear(4, 2), q, labels)
    with pytest.raises(ValueError, match="one label each"):
        evaluate_knn(head, q, labels[:3])
    with pytest.raises(ValueError, match="at least 2 finite embeddings"):
        evaluate_knn(head, torch.full((3, 4), float("nan")), labels[:3])
    with pytest.raises(RuntimeError, match="memory is empty"):
        evaluate_knn(KNNHead(4, 2, k=2, memory_size=4), q, labels)


def test_linear_probe_equals_scikit_learn(knn_digits):
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(64, 16, generator=gen)
    train_x, test_x = knn_digits.x[knn_digits.train] @ proj, knn_digits.x[knn_digits.test] @ proj
    train_y, test_y = knn_digits.y[knn_digits.train], knn_digits.y[knn_digits.test]
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(F.normalize(train_x, dim=1).numpy(), train_y.numpy())
    expected = float((clf.predict(F.normalize(test_x, dim=1).numpy()) == test_y.numpy()).mean())
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == expected
    head = KNNHead(16, 10, k=5, memory_size=len(train_y) + 10)  # 10 empty rows, which the probe ignores
    head.write(train_x, train_y, torch.arange(len(train_y)))
    nan_row = torch.full((1, 16), float("nan"))
    assert knn_linear_probe(head, torch.cat([test_x, nan_row]), torch.cat([test_y, torch.tensor([0])])) == expected


def test_gallery_image_rows_and_columns():
    head = toy_head()
    images = torch.linspace(0, 1, 4 * 3 * 3).reshape(4, 1, 3, 3)  # the training inputs behind the memory rows
    nb = head.explain(torch.eye(4)[[0, 3]], k=3)
    asked = []

    def neighbor_input(i):
        asked.append(i)
        return images[i]

    grid = neighbor_gallery_image(images[[0, 3]], nb, torch.tensor([0, 1]), neighbor_input,
                                  targets=torch.tensor([0, 1]))
    assert sorted(asked) == sorted(nb.indices[nb.indices >= 0].tolist()) and len(asked) == 6
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    # 4 columns (probe + 3 neighbours): wider than tall for 2 rows of equal cells
    assert grid.shape[1] > grid.shape[0]
