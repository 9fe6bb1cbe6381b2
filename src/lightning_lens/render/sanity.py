"""Pictures of a model-randomization sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

* :func:`cascade_grid`: the paper's Figure 2 as an image: rows are methods (one block per shown probe), columns the
  input, the original model's map and the map after each randomization stage.
* :func:`similarity_figure`: one panel per similarity metric, x the stages, one line per method (median over the
  probes, band: interquartile range), dashed: the method's floor.
* :func:`verdict_lines`: one line of text per method: its verdict and the number that decided it.

Each takes a :class:`~lightning_lens.sanity.RandomizationReport` (only its ``stages``, ``metrics``, ``results`` and
``curve``/``num_stages`` are read) and draws nothing into global state: no pyplot, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_lens.render.grid import image_grid
from lightning_lens.render.heatmap import heatmap, to_rgb_uint8
from lightning_lens.utils.checks import check_int, check_str_list, check_tensor

if TYPE_CHECKING:  # only for annotations: render does not depend on the sanity package
    from lightning_lens.sanity import RandomizationReport

__all__ = ["cascade_grid", "similarity_figure", "verdict_lines"]


def _image_results(report: "RandomizationReport") -> list[Any]:
    """The methods whose report kept 2-D maps per example: ``maps`` of shape ``(S + 1, B, H, W)``."""
    return [r for r in report.results.values() if r.maps is not None and r.maps.dim() == 4]


def cascade_grid(
    report: "RandomizationReport",
    inputs: torch.Tensor,
    num_probes: int = 2,
    probe_labels: Optional[Sequence[str]] = None,
    cell_size: int = 48,
    denormalize: Any = None,
) -> Optional[np.ndarray]:
    """The cascade as one labelled uint8 ``(H, W, 3)`` image, or None when no method has image maps.

    For each of the first ``num_probes`` examples, one row per method with 2-D maps: the input, then the normalized
    absolute map of the original model (stage 0) and of every randomization stage, each drawn on the same scale
    (``vmax=1``), so a map that fades or turns to noise shows it. Rows are labelled ``"<method> <probe> (<verdict>)"``.

    Args:
        report: a report run with ``keep_maps=True``.
        inputs: the ``(B, C, H, W)`` inputs the report explains, in the report's example order (other channel counts
            than 1 and 3 are shown as their channel mean).
        num_probes: how many examples to show (at most ``B``).
        probe_labels: one label per shown example (default ``"probe <i>"``), e.g. ``"#412"`` for a dataset index.
        cell_size: pixel height of one cell.
        denormalize: undoes the input normalization for display (see :func:`~lightning_lens.render.to_rgb_uint8`).

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> x = torch.rand(2, 1, 32, 32)
        >>> report = cascading_randomization(SmallCNN(width=2), x, methods="gradient", controls=False)
        >>> cascade_grid(report, x, num_probes=1).dtype
        dtype('uint8')
    """
    check_int(num_probes, "num_probes", minimum=1)
    check_int(cell_size, "cell_size", minimum=8)
    results = _image_results(report)
    if not results:
        return None  # maps of 1-D inputs (tabular, tokens): the curves and the table say everything
    check_tensor(inputs, "inputs", floating=False, min_dim=4)
    if inputs.dim() != 4:
        return None
    batch = int(results[0].maps.shape[1])
    if inputs.shape[0] != batch:
        raise ValueError(f"inputs holds {inputs.shape[0]} examples but the report explains {batch}")
    shown = min(num_probes, batch)
    if probe_labels is not None and len(probe_labels) < shown:
        raise ValueError(f"probe_labels has {len(probe_labels)} entries for {shown} shown probes")
    cells: list[list[np.ndarray]] = []
    labels: list[str] = []
    for i in range(shown):
        pixels = inputs[i].detach().float().cpu()
        if pixels.shape[0] not in (1, 3, 4):
            pixels = pixels.mean(dim=0, keepdim=True)  # neither grey nor RGB: show the channel mean
        image = to_rgb_uint8(pixels, denormalize=denormalize)
        tag = str(probe_labels[i]) if probe_labels is not None else f"probe {i}"
        for r in results:
            stages = r.maps.shape[0]
            cells.append([image] + [heatmap(r.maps[s, i], signed=False, vmax=1.0) for s in range(stages)])
            labels.append(f"{r.name} {tag} ({r.verdict.outcome})")
    return image_grid(cells, row_labels=labels, col_labels=["input", "original", *report.stages], cell_size=cell_size)


def similarity_figure(report: "RandomizationReport", metrics: Optional[Sequence[str]] = None) -> Figure:
    """One panel per metric, stacked over a shared x axis (the stages, named once at the bottom): the median
    similarity to the original maps at each stage (stage 0: the method's ceiling), one line per method, its
    interquartile range over the examples as a band, and its floor dashed.

    The layout is fixed (no constrained layout: it would double the drawing time of a check at the end of fit); the
    bottom margin grows with the longest stage name. Drawing costs about 0.04 s per panel.

    Args:
        report: the report to plot.
        metrics: the metrics to show, in the report's order (default: every metric the report computed); names the
            report did not compute are left out.

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(2, 1, 32, 32), methods="gradient")
        >>> [ax.get_ylabel() for ax in similarity_figure(report).axes][:2]
        ['spearman_abs', 'spearman_signed']
    """
    if metrics is not None:
        wanted = set(check_str_list(metrics, "metrics"))
        metrics = [m for m in report.metrics if m in wanted]
    else:
        metrics = list(report.metrics)
    if not metrics:
        raise ValueError(
            f"no similarity metric to plot: the report computed {list(report.metrics)}; pass some of them as metrics"
        )
    ticks = ["original", *report.stages]
    # inches: panels of 1.5, a top margin, and a bottom margin for the 30-degree stage names (7 pt: ~0.055 in/char)
    panel, top = 1.5, 0.3
    bottom = 0.3 + 0.5 * 0.055 * max(len(t) for t in ticks)
    height = panel * len(metrics) + top + bottom
    fig = Figure(figsize=(6.4, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True, squeeze=True))
    fig.subplots_adjust(left=0.12, right=0.98, top=1 - top / height, bottom=bottom / height, hspace=0.08)
    x = np.arange(report.num_stages + 1)
    for ax, metric in zip(axes, metrics):
        for index, (name, r) in enumerate(report.results.items()):
            if metric not in r.similarity:
                continue
            color = f"C{index % 10}"
            ax.plot(x, report.curve(name, metric).numpy(), marker="o", ms=3, color=color, label=name)
            per_example = r.similarity[metric].float()
            ceiling = torch.tensor([float(r.ceiling[metric])])
            low = torch.cat([ceiling, per_example.nanquantile(0.25, dim=1)])
            high = torch.cat([ceiling, per_example.nanquantile(0.75, dim=1)])
            ax.fill_between(x, low.numpy(), high.numpy(), color=color, alpha=0.15, linewidth=0)
            if math.isfinite(r.floor[metric]):
                ax.axhline(r.floor[metric], color=color, linestyle="--", linewidth=0.8)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_ylim(-1.05 if metric == "spearman_signed" else -0.3, 1.05)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(ticks, rotation=30, ha="right", fontsize=7)
    axes[0].set_title("similarity to the original maps per randomization stage (dashed: floor)", fontsize=8)
    lines: dict[str, Any] = {}  # one legend entry per method, also for methods only some panels show
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            lines.setdefault(label, handle)
    axes[0].legend(list(lines.values()), list(lines), fontsize=7, loc="best")
    return fig


def _number(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def verdict_lines(report: "RandomizationReport") -> list[str]:
    """One line per method: the verdict and the numbers that decided it (the rule's metric, its normalized score
    between floor and ceiling).

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), methods="edge")
        >>> verdict_lines(report)[0].startswith("edge: fails (spearman_signed ")
        True
    """
    lines = []
    for name, r in report.results.items():
        v = r.verdict
        lines.append(
            f"{name}: {v.outcome} ({v.metric} {_number(v.similarity)}, floor {_number(v.floor)}, ceiling"
            f" {_number(v.ceiling)}, normalized {_number(v.score)})"
        )
    return lines
