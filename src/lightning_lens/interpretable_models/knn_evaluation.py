"""How well a :class:`~lightning_lens.interpretable_models.KNNHead` does on held-out embeddings, and the gallery image.

Pure PyTorch (scikit-learn for the linear probe, the renderer for the image): the ``NeighborGallery`` callback only
collects validation embeddings, calls these and logs what they return. Nothing here writes into the head: DkNN
calibration scores (Papernot & McDaniel 2018) are returned, not stored, so monitoring never changes a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lightning_lens.interpretable_models.knn import KNNHead, Neighbors
from lightning_lens.utils.checks import check_fraction, check_instance, check_int
from lightning_lens.utils.modules import preserve_modes

__all__ = ["KNNEvaluation", "evaluate_knn", "knn_linear_probe", "linear_probe_accuracy", "neighbor_gallery_image"]


@dataclass
class KNNEvaluation:
    """What :func:`evaluate_knn` found.

    Attributes:
        metrics: ``accuracy`` (the head's vote), ``neighbor_label_agreement`` (share of the k neighbours carrying the
            predicted class), ``neighbor_true_label_agreement`` (carrying the true class), ``mean_credibility``,
            ``eval_samples`` (finite rows used), ``memory/*`` (:meth:`KNNHead.memory_summary`).
        calibration_scores: sorted DkNN nonconformity scores of the calibration rows (pass them to
            :meth:`KNNHead.explain`).
        calibration_rows, test_rows: rows of the given embeddings used to calibrate and to evaluate.
        excluded_nonfinite: rows left out because their embedding held NaN or inf.
    """

    metrics: dict[str, float]
    calibration_scores: torch.Tensor
    calibration_rows: torch.Tensor
    test_rows: torch.Tensor
    excluded_nonfinite: int = 0


def _calibration_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(max(int(n * fraction), 1), n - 1)
    return order[:cut], order[cut:]


@torch.no_grad()
def evaluate_knn(
    head: KNNHead,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    calibration_fraction: float = 0.5,
    seed: int = 0,
) -> KNNEvaluation:
    """Accuracy, neighbour agreement and credibility of ``head`` on held-out ``embeddings`` (N, D) with ``labels``.

    A random ``calibration_fraction`` of the finite rows (drawn with a private generator seeded by ``seed``) calibrates
    the credibility; the metrics are measured on the other rows. The head is used in eval mode and left unchanged.

    Example:
        >>> head = KNNHead(2, 2, k=1, memory_size=2, credibility_k=1)
        >>> head.write(torch.eye(2), torch.tensor([0, 1]), torch.arange(2))
        >>> result = evaluate_knn(head, torch.eye(2).repeat(4, 1), torch.tensor([0, 1]).repeat(4))
        >>> result.metrics["accuracy"], result.metrics["neighbor_true_label_agreement"], result.metrics["eval_samples"]
        (1.0, 1.0, 8.0)
    """
    check_instance(head, "head", KNNHead)
    check_fraction(calibration_fraction, "calibration_fraction", allow_one=False)
    check_int(seed, "seed")
    labels = torch.as_tensor(labels, device=embeddings.device).long().reshape(-1)
    if embeddings.dim() != 2 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings must be (N, D) with one label each, got {tuple(embeddings.shape)} and {labels.shape[0]} labels"
        )
    finite = torch.isfinite(embeddings).all(dim=1)
    excluded = int((~finite).sum())
    rows = torch.nonzero(finite).squeeze(1).cpu()
    if rows.numel() < 2:
        raise ValueError(f"evaluate_knn needs at least 2 finite embeddings, got {rows.numel()} (of {len(labels)})")
    cal, test = _calibration_split(rows.numel(), calibration_fraction, seed)
    cal, test = rows[cal], rows[test]
    with preserve_modes(head, mode=False):
        scores = head.calibration_scores_for(embeddings[cal], labels[cal])
        nb = head.explain(embeddings[test], calibration_scores=scores)
        pred = head.vote(embeddings[test], nb.positions).argmax(1)
    truth = labels[test]
    found = nb.labels >= 0
    n_found = found.sum().clamp_min(1)
    metrics = {
        "accuracy": float((pred == truth).float().mean()),
        "neighbor_label_agreement": float(((nb.labels == pred[:, None]) & found).sum() / n_found),
        "neighbor_true_label_agreement": float(((nb.labels == truth[:, None]) & found).sum() / n_found),
        "mean_credibility": float(nb.credibility.mean()) if nb.credibility is not None else float("nan"),
        "eval_samples": float(rows.numel()),
    }
    metrics.update({f"memory/{k}": v for k, v in head.memory_summary().items()})
    return KNNEvaluation(metrics, scores, cal, test, excluded)


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    C: float = 10.0,
    max_iter: int = 2000,
) -> float:
    """Accuracy on ``test_x`` of a logistic regression (scikit-learn, inverse regularisation ``C``) fit on
    ``train_x``; both L2-normalised, as the kNN head sees them. The linear-probe baseline for a kNN head: a head whose
    accuracy falls far below it is retrieving worse than the embedding allows.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> linear_probe_accuracy(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 0, 1, 1]))
        1.0
    """
    from sklearn.linear_model import LogisticRegression

    def prep(t: torch.Tensor) -> np.ndarray:
        return F.normalize(t.detach().float(), dim=1).cpu().numpy()

    clf = LogisticRegression(max_iter=max_iter, C=C)
    clf.fit(prep(train_x), torch.as_tensor(train_y).cpu().numpy())
    return float((clf.predict(prep(test_x)) == torch.as_tensor(test_y).cpu().numpy()).mean())


def knn_linear_probe(head: KNNHead, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`linear_probe_accuracy` fit on the head's memory (its filled rows) and tested on ``embeddings`` (finite
    rows only).

    Example:
        >>> head = KNNHead(2, 2, k=1, memory_size=4)
        >>> head.write(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]),
        ...            torch.arange(4))
        >>> knn_linear_probe(head, torch.tensor([[1.0, 0.2], [0.2, 1.0]]), torch.tensor([0, 1]))
        1.0
    """
    filled = head.filled
    finite = torch.isfinite(embeddings).all(dim=1)
    labels = torch.as_tensor(labels, device=embeddings.device)
    memory_x, memory_y = head.memory_keys[filled], head.memory_labels[filled]
    return linear_probe_accuracy(memory_x, memory_y, embeddings[finite], labels[finite])


def neighbor_gallery_image(
    probe_inputs: torch.Tensor,
    neighbors: Neighbors,
    predictions: torch.Tensor,
    neighbor_input: Callable[[int], torch.Tensor],
    targets: Optional[torch.Tensor] = None,
    denormalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    title: Optional[str] = None,
) -> np.ndarray:
    """One row per probe: the probe, then its neighbours (``neighbor_input(dataset_index)`` gives a neighbour's
    input). The row is titled with label, prediction and credibility (in red with a red frame around the probe when
    the prediction is wrong); under each neighbour its class and cosine similarity, ``class 3 (0.91)``. ``title`` is a
    line above the grid (e.g. with the epoch).

    Example:
        >>> head = KNNHead(4, 2, k=2, memory_size=4)
        >>> head.write(torch.eye(4), torch.tensor([0, 0, 1, 1]), torch.arange(4))
        >>> images = torch.rand(4, 1, 2, 2)  # the training inputs, whose embeddings are torch.eye(4)
        >>> nb = head.explain(torch.eye(4)[:2])
        >>> neighbor_gallery_image(images[:2], nb, torch.tensor([0, 0]), lambda i: images[i]).dtype
        dtype('uint8')
    """
    from lightning_lens.render import MISTAKE_COLOR, image_grid, to_rgb_uint8

    rows, row_labels, captions, frames, colors = [], [], [], [], []
    for i in range(probe_inputs.shape[0]):
        cells = [to_rgb_uint8(probe_inputs[i], denormalize=denormalize)]
        names: list[Optional[str]] = [None]
        for j in range(neighbors.indices.shape[1]):
            idx = int(neighbors.indices[i, j])
            if idx < 0:
                continue
            cells.append(to_rgb_uint8(neighbor_input(idx), denormalize=denormalize))
            names.append(f"class {int(neighbors.labels[i, j])} ({float(neighbors.similarities[i, j]):.2f})")
        wrong = targets is not None and int(targets[i]) != int(predictions[i])
        true = "" if targets is None else f"y={int(targets[i])} "
        cred = "" if neighbors.credibility is None else f" cred={float(neighbors.credibility[i]):.2f}"
        row_labels.append(f"{true}pred={int(predictions[i])}{cred}" + (" WRONG" if wrong else ""))
        colors.append(MISTAKE_COLOR if wrong else None)
        frames.append([MISTAKE_COLOR if wrong else None])
        rows.append(cells)
        captions.append(names)
    width = max(len(r) for r in rows)
    blank = np.zeros_like(rows[0][0])
    rows = [r + [blank] * (width - len(r)) for r in rows]
    col_labels = ["probe"] + [f"neighbour {j + 1}" for j in range(width - 1)]
    return image_grid(rows, row_labels=row_labels, col_labels=col_labels, cell_captions=captions,
                      row_label_colors=colors, cell_frames=frames, title=title)
