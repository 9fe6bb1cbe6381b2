"""What TracIn scores are shown as: precision at k of a ranking, and labelled galleries of training examples."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from lightning_lens.utils.checks import check_int, check_optional

__all__ = ["influence_gallery", "precision_at_k", "rank_by_self_influence", "self_influence_gallery", "top_influence"]

Denormalize = Optional[Callable[[torch.Tensor], torch.Tensor]]


def precision_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: Optional[int] = None) -> float:
    """Share of the ``k`` highest ``scores`` that are ``relevant`` (default ``k``: the number of relevant examples,
    so that 1.0 means the relevant examples are ranked exactly first). Chance level is ``relevant.mean()``.

    Example:
        >>> precision_at_k(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([True, False, False, True]))
        0.5
    """
    scores = torch.as_tensor(scores).reshape(-1)
    relevant = torch.as_tensor(relevant).reshape(-1).bool()
    if scores.shape != relevant.shape:
        raise ValueError(f"scores and relevant must have the same length, got {scores.numel()} and {relevant.numel()}")
    k = check_optional(check_int, k, "k", minimum=1)
    if k is None:
        k = int(relevant.sum())
        if k == 0:
            raise ValueError("relevant marks no example: pass k= or at least one relevant example")
    k = min(k, int(scores.numel()))
    top = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return float(relevant[top].float().mean())


def rank_by_self_influence(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(positions of the finite scores, highest first; how many scores were NaN/inf and left out)``.

    Example:
        >>> rank_by_self_influence(torch.tensor([0.2, float("nan"), 0.9, 0.5]))
        (tensor([2, 3, 0]), 1)
    """
    scores = torch.as_tensor(scores).reshape(-1)
    finite = torch.isfinite(scores)
    kept = torch.nonzero(finite).reshape(-1)
    order = torch.argsort(scores[kept].double(), descending=True, stable=True)
    return kept[order], int((~finite).sum())


def top_influence(influence: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns, scores)``, each ``(n_test, min(k, n_train))``: the ``k`` highest (``largest``) or lowest influence
    scores of every row; NaN/inf entries never rank (their column is -1 if a row has fewer finite scores than k).

    Example:
        >>> top_influence(torch.tensor([[0.1, -0.4, float("nan"), 0.3]]), k=2)
        (tensor([[3, 0]]), tensor([[0.3000, 0.1000]]))
    """
    k = min(check_int(k, "k", minimum=1), int(influence.shape[1]))
    finite = torch.isfinite(influence)
    fill = float("-inf") if largest else float("inf")
    values, columns = torch.where(finite, influence, torch.full_like(influence, fill)).topk(k, dim=1, largest=largest)
    found = torch.isfinite(values)
    return torch.where(found, columns, torch.full_like(columns, -1)), values


def self_influence_gallery(
    inputs: Sequence[torch.Tensor],
    ids: Sequence[int],
    labels: Sequence[int],
    predictions: Sequence[int],
    scores: Sequence[float],
    denormalize: Denormalize = None,
    cell_size: int = 64,
) -> np.ndarray:
    """One row per training example, most self-influential first, titled with its id, label, the model's prediction
    and its self-influence (a label that disagrees with the prediction is a candidate label error).

    Example:
        >>> self_influence_gallery([torch.zeros(1, 4, 4)], [7], [3], [8], [0.5]).dtype
        dtype('uint8')
    """
    from lightning_lens.render import image_grid, to_rgb_uint8

    if not len(inputs):
        raise ValueError("self_influence_gallery needs at least one example")
    rows, row_labels = [], []
    for rank, (x, i, y, p, s) in enumerate(zip(inputs, ids, labels, predictions, scores)):
        rows.append([to_rgb_uint8(x, denormalize=denormalize)])
        flag = " (!)" if int(y) != int(p) else ""
        row_labels.append(f"{rank + 1}. #{int(i)} label {int(y)} pred {int(p)}{flag} self-inf {float(s):.3g}")
    return image_grid(rows, row_labels=row_labels, col_labels=["training example"], cell_size=cell_size)


def influence_gallery(
    test_inputs: torch.Tensor,
    test_labels: Optional[Sequence[int]],
    test_predictions: Sequence[int],
    train_inputs: Sequence[Sequence[torch.Tensor]],
    train_ids: torch.Tensor,
    train_labels: torch.Tensor,
    scores: torch.Tensor,
    kind: str = "proponents",
    denormalize: Denormalize = None,
    cell_size: int = 64,
) -> np.ndarray:
    """One row per test example: the example, then its ``k`` proponents (or opponents), the row titled with the
    example's label and prediction and each training example's ``#id:label(score)``.

    Args:
        train_inputs: per test example, the inputs of its ``k`` training examples.
        train_ids, train_labels, scores: ``(n_test, k)``.

    Example:
        >>> img = torch.zeros(1, 4, 4)
        >>> influence_gallery(img[None], [1], [1], [[img, img]], torch.tensor([[3, 9]]), torch.tensor([[1, 1]]),
        ...                   torch.tensor([[0.5, 0.2]])).dtype
        dtype('uint8')
    """
    from lightning_lens.render import image_grid, to_rgb_uint8

    rows, row_labels = [], []
    for i in range(int(test_inputs.shape[0])):
        cells = [to_rgb_uint8(test_inputs[i], denormalize=denormalize)]
        cells += [to_rgb_uint8(x, denormalize=denormalize) for x in train_inputs[i]]
        rows.append(cells)
        names = " ".join(
            f"#{int(train_ids[i, j])}:{int(train_labels[i, j])}({float(scores[i, j]):+.2g})"
            for j in range(len(train_inputs[i]))
        )
        label = "" if test_labels is None else f"label {int(test_labels[i])} "
        row_labels.append(f"{label}pred {int(test_predictions[i])} | {names}")
    width = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    rows = [r + [blank] * (width - len(r)) for r in rows]
    singular = kind[:-1] if kind.endswith("s") else kind
    col_labels = ["probe"] + [f"{singular} {j + 1}" for j in range(width - 1)]
    return image_grid(rows, row_labels=row_labels, col_labels=col_labels, cell_size=cell_size)
