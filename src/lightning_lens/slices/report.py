"""Reporting slices: the table rows, a one-line console summary, and a grid of a slice's examples."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from lightning_lens.slices.slice import Slice
from lightning_lens.utils.checks import check_int

__all__ = ["TABLE_COLUMNS", "TABLE_LEGEND", "labelled_image_rows", "slice_table_rows", "summarize_slices"]

#: columns of :func:`slice_table_rows`: every column but "slice" and "kind" holds numbers (None where blank), so
#: W&B sorts them; the error's 95% interval is two columns
TABLE_COLUMNS = ["rank", "slice", "kind", "n", "share", "accuracy", "error", "CI low", "CI high", "rest error", "ratio",
                 "q", "score", "first seen"]

#: what the columns of :data:`TABLE_COLUMNS` mean (logged as the line under the table)
TABLE_LEGEND = (
    "n: samples in the slice; share: n / samples analysed; accuracy and error: in the slice; CI low, CI high: the"
    " error's 95% Wilson interval; rest error: the error rate outside the slice; ratio: error / rest error; q: the"
    " slice's p-value (one-sided exact test, error above the rest) adjusted for every slice tested (FDR), small ="
    " unlikely to be chance; score: the search's ranking score (SliceLine: high error and large size); first seen:"
    " the epoch the slice was first reported."
)


def _number(x: Optional[float], digits: int) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def slice_table_rows(
    slices: Sequence[Slice],
    *,
    n_samples: int,
    accuracy: float,
    alpha: float,
    min_gap: float,
    names: Optional[Sequence[str]] = None,
    first_seen: Optional[Mapping[str, int]] = None,
    epoch: int = 0,
    max_rows: int = 10,
    excluded: int = 0,
) -> list[list[Any]]:
    """Rows under :data:`TABLE_COLUMNS`: the top ``max_rows`` slices, a "none found" row when there is none, and a
    row counting the samples left out (NaN/inf) when there are any. Numbers stay numbers (rounded to 4 decimals; a
    ratio against an error-free rest is ``inf``); cells that do not apply are None.

    Args:
        slices: reported slices, best first.
        n_samples: samples analysed (excluded ones not counted).
        accuracy: overall accuracy on them.
        alpha, min_gap: the search's thresholds (named in the "none found" row).
        names: tracking names of the slices; ``first_seen[name]`` is the epoch a slice was first reported.
        epoch: the current epoch (the "first seen" of slices not in ``first_seen``).
        excluded: samples left out of the analysis.

    Example:
        >>> rows = slice_table_rows([], n_samples=100, accuracy=0.9, alpha=0.05, min_gap=0.05, excluded=2)
        >>> rows[1][2:5]  # kind, n, share
        ['excluded', 2, 0.0196]
    """
    max_rows = check_int(max_rows, "max_rows", minimum=1)
    names = list(names) if names is not None else [s.name for s in slices]
    first_seen = dict(first_seen or {})
    rows: list[list[Any]] = []
    blank: list[Any] = [None] * (len(TABLE_COLUMNS) - 6)
    for rank, (s, key) in enumerate(zip(slices[:max_rows], names)):
        rows.append([
            rank + 1, s.name, s.kind, s.size, _number(s.fraction, 4), _number(s.accuracy, 4),
            _number(s.error_rate, 4), _number(s.ci_low, 4), _number(s.ci_high, 4), _number(s.rest_rate, 4),
            round(s.ratio, 3) if math.isfinite(s.ratio) else math.inf, float(s.q_value), _number(s.score, 4),
            first_seen.get(key, epoch),
        ])
    if not rows:
        none = f"no slice with q <= {alpha:g} and gap >= {min_gap:g}"
        rows.append([None, none, "", int(n_samples), 1.0, _number(float(accuracy), 4), *blank])
    if excluded:
        total = int(n_samples) + int(excluded)
        rows.append([None, "excluded: non-finite inputs, logits, loss or embedding, or a label outside the classes",
                     "excluded", int(excluded), _number(excluded / total, 4), None, *blank])
    return rows


def summarize_slices(
    slices: Sequence[Slice], n_samples: int, accuracy: float, excluded: int = 0, max_items: int = 3
) -> str:
    """One line for the console: the data, then the top slices with their size and accuracy.

    Example:
        >>> summarize_slices([], n_samples=1000, accuracy=0.9123, excluded=1)
        '1000 samples, accuracy 0.912 (1 excluded: NaN/inf or invalid label); no significant slice'
    """
    max_items = check_int(max_items, "max_items", minimum=1)
    head = f"{int(n_samples)} samples, accuracy {float(accuracy):.3f}"
    if excluded:
        head += f" ({int(excluded)} excluded: NaN/inf or invalid label)"
    if not slices:
        return head + "; no significant slice"
    items = [f"{s.name} (n={s.size}, accuracy {s.accuracy:.3f})" for s in slices[:max_items]]
    more = f", +{len(slices) - max_items} more" if len(slices) > max_items else ""
    return f"{head}; {len(slices)} slice{'s' if len(slices) != 1 else ''}: " + "; ".join(items) + more


def labelled_image_rows(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    per_row: int = 8,
    cell_size: int = 96,
    title: Optional[str] = None,
) -> np.ndarray:
    """uint8 (H, W, 3) images, each under its label, ``per_row`` to a row, as one uint8 image; ``title`` (e.g. the
    slice the examples come from) is a line of text above them.

    Example:
        >>> grid = labelled_image_rows([np.zeros((4, 4, 3), np.uint8)] * 3, ["a", "b", "c"], per_row=2, cell_size=16)
        >>> grid.dtype, grid.ndim
        (dtype('uint8'), 3)
    """
    from lightning_lens.render import image_grid

    if len(images) != len(labels) or not images:
        raise ValueError(f"need one label per image and at least one image, got {len(images)} and {len(labels)}")
    per_row = check_int(per_row, "per_row", minimum=1)
    rows = [image_grid([list(images[i : i + per_row])], col_labels=list(labels[i : i + per_row]), cell_size=cell_size,
                       title=title if i == 0 else None)
            for i in range(0, len(images), per_row)]
    width = max(r.shape[1] for r in rows)
    return np.concatenate(
        [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    )
