"""Pictures of a model-randomization sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

* :func:`cascade_grid`: the paper's Figure 2 as an image: rows are methods (one block per shown probe), columns the
  input, the original model's map and the map after each randomization stage.
* :func:`similarity_figure`: one panel per similarity metric, x the stages, one line per method (median over the
  probes, band: interquartile range), dashed: the method's floor.
* :func:`verdict_lines`: one line of text per method: its verdict and the number that decided it.
* :func:`verdict_table`: the verdict table with the deciding metric, the controls' expected verdicts and a legend.

Each takes a :class:`~lightning_lens.sanity.RandomizationReport` (only its ``stages``, ``metrics``, ``results`` and
``curve``/``num_stages`` are read) and draws nothing into global state: no pyplot, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lightning_lens.render.grid import image_grid
from lightning_lens.render.heatmap import heatmap, to_rgb_uint8
from lightning_lens.utils.checks import check_int, check_str_list, check_tensor

if TYPE_CHECKING:  # only for annotations: render does not depend on the sanity package
    from lightning_lens.sanity import RandomizationReport

__all__ = ["CONTROL_EXPECTATIONS", "VERDICT_COLUMNS", "cascade_grid", "short_layer_names", "similarity_chart",
           "similarity_figure",
           "verdict_lines", "verdict_table"]

#: The model-independent controls a check runs beside the methods, with the verdict each is expected to get and why.
CONTROL_EXPECTATIONS: dict[str, tuple[str, str]] = {
    "edge": ("fails", "an edge map ignores the model, so randomizing the model cannot change it"),
    "random": ("inconclusive", "a random map is noise: re-runs differ as much as maps of different inputs, so the"
                               " ceiling and floor are both about 0 (either may be the larger) and no normalized score"
                               " exists"),
}


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names shortened to their last two dotted components (``model.classifier.3`` -> ``classifier.3``),
    longer where that is needed to tell two layers apart; the full names stay in the report and its table.

    Example:
        >>> short_layer_names(["model.features.0", "model.classifier.3", "a.head.0", "b.head.0"])
        ['features.0', 'classifier.3', 'a.head.0', 'b.head.0']
    """
    parts = [str(n).split(".") for n in names]
    keep = [min(2, len(p)) for p in parts]
    while True:
        short = [".".join(p[len(p) - k :]) for p, k in zip(parts, keep)]
        clashes = {n for n in short if short.count(n) > 1}
        grow = [i for i, n in enumerate(short) if n in clashes and keep[i] < len(parts[i])]
        if not grow:
            return short
        for i in grow:
            keep[i] += 1


def _control_label(name: str) -> str:
    return f"{name} (control)" if name in CONTROL_EXPECTATIONS else name


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
            if r.name in CONTROL_EXPECTATIONS:
                labels.append(f"{r.name} (control) {tag} ({r.verdict.outcome}, expected"
                              f" {CONTROL_EXPECTATIONS[r.name][0]})")
            else:
                labels.append(f"{r.name} {tag} ({r.verdict.outcome})")
    return image_grid(cells, row_labels=labels, col_labels=["input", "original", *short_layer_names(report.stages)],
                      cell_size=cell_size)


class _SimilarityLine(NamedTuple):
    index: int  # the method's position in the report (its colour)
    label: str
    control: bool
    median: np.ndarray  # per stage, stage 0 = the ceiling
    low: np.ndarray  # interquartile band (stage 0: the ceiling)
    high: np.ndarray
    floor: float


def _plotted_metrics(report: "RandomizationReport", metrics: Optional[Sequence[str]]) -> list[str]:
    if metrics is not None:
        wanted = set(check_str_list(metrics, "metrics"))
        chosen = [m for m in report.metrics if m in wanted]
    else:
        chosen = list(report.metrics)
    if not chosen:
        raise ValueError(
            f"no similarity metric to plot: the report computed {list(report.metrics)}; pass some of them as metrics"
        )
    return chosen


def _similarity_lines(report: "RandomizationReport", metric: str) -> list[_SimilarityLine]:
    """What one panel shows, for both renderers: per method that computed ``metric``, its median curve, its
    interquartile band over the probes and its floor."""
    lines = []
    for index, (name, r) in enumerate(report.results.items()):
        if metric not in r.similarity:
            continue
        per_example = r.similarity[metric].float()
        ceiling = torch.tensor([float(r.ceiling[metric])])
        low = torch.cat([ceiling, per_example.nanquantile(0.25, dim=1)])
        high = torch.cat([ceiling, per_example.nanquantile(0.75, dim=1)])
        lines.append(_SimilarityLine(index, _control_label(name), name in CONTROL_EXPECTATIONS,
                                     report.curve(name, metric).numpy(), low.numpy(), high.numpy(),
                                     float(r.floor[metric])))
    return lines


def _y_range(metric: str) -> tuple[float, float]:
    return (-1.05 if metric == "spearman_signed" else -0.3, 1.05)


_SIMILARITY_TITLE = "similarity to the original maps per randomization stage\n(lower = the maps changed with the model)"
_SIMILARITY_KEYS = ("dashed: floor (maps of two\nunrelated inputs)", "band: interquartile range\nover the probes",
                    "stage 'original': ceiling\n(re-run of the method)")


def similarity_chart(report: "RandomizationReport", metrics: Optional[Sequence[str]] = None) -> np.ndarray:
    """:func:`similarity_figure`'s picture as a uint8 ``(H, W, 3)`` image, rasterized directly
    (:class:`~lightning_lens.render.chart.LineChart`, a few milliseconds instead of ~0.1 s for a Figure): what
    :class:`~lightning_lens.callbacks.RandomizationSanityCheck` logs. Same panels, lines, bands, dashed floors,
    stage names (upright, reading upwards) and legend under the plot.

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(2, 1, 32, 32), methods="gradient")
        >>> image = similarity_chart(report, ["spearman_signed"])
        >>> image.dtype, image.shape[1]
        (dtype('uint8'), 520)
    """
    return _similarity_line_chart(report, metrics).draw()


def _similarity_line_chart(report: "RandomizationReport", metrics: Optional[Sequence[str]]) -> Any:
    from lightning_lens.render.chart import _GRAY, TAB10, ChartPanel, ChartSeries, LineChart

    panels = []
    for metric in _plotted_metrics(report, metrics):
        series = [
            ChartSeries(line.label, line.median.tolist(), TAB10[line.index % 10], marker="s" if line.control else "o",
                        width=1.3 if line.control else 2.0, band=(line.low.tolist(), line.high.tolist()),
                        reference=line.floor)
            for line in _similarity_lines(report, metric)
        ]
        panels.append(ChartPanel(metric, _y_range(metric), series))
    legend = [(_control_label(name), TAB10[i % 10], "line") for i, name in enumerate(report.results)]
    legend += [(_SIMILARITY_KEYS[0], _GRAY, "dashed"), (_SIMILARITY_KEYS[1], _GRAY, "band"),
               (_SIMILARITY_KEYS[2], _GRAY, "marker")]
    return LineChart(panels, ["original", *short_layer_names(report.stages)], title=_SIMILARITY_TITLE.split("\n"),
                     x_title="randomized up to layer (stage)", legend=legend)



def similarity_figure(report: "RandomizationReport", metrics: Optional[Sequence[str]] = None) -> Figure:
    """One panel per metric, stacked over a shared x axis (the stages, named once at the bottom, layer names
    shortened by :func:`short_layer_names`), and a legend under the plot that names the methods (controls marked)
    and explains the dashed floors, the bands and stage 0 (the ceiling). In each panel: the median
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
    metrics = _plotted_metrics(report, metrics)
    ticks = ["original", *short_layer_names(report.stages)]
    n_entries = len(report.results) + 3  # the methods, then what the dashed lines, bands and stage 0 are (a guess of
    # the legend's height, corrected once it is measured)
    # inches: narrow enough that a TensorBoard card (about 350 px wide) shrinks it little: 5.2 wide, panels of 2.2,
    # a bottom margin for the 30-degree stage names (9 pt: ~0.07 in/char), and the legend in two columns under the
    # plot (never over the curves)
    panel, top, width = 2.2, 0.55, 5.2
    axis = 0.45 + 0.5 * 0.07 * max(len(t) for t in ticks)
    legend_h = 0.3 * math.ceil(n_entries / 2) + 0.15
    height = panel * len(metrics) + top + axis + legend_h
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True, squeeze=True))
    fig.subplots_adjust(left=0.14, right=0.97, top=1 - top / height, bottom=(axis + legend_h) / height, hspace=0.12)
    x = np.arange(report.num_stages + 1)
    for ax, metric in zip(axes, metrics):
        for line in _similarity_lines(report, metric):
            color = f"C{line.index % 10}"
            ax.plot(x, line.median, marker="s" if line.control else "o", ms=4, color=color, label=line.label,
                    linewidth=1.0 if line.control else 1.6)
            ax.fill_between(x, line.low, line.high, color=color, alpha=0.15, linewidth=0)
            if math.isfinite(line.floor):
                ax.axhline(line.floor, color=color, linestyle="--", linewidth=0.9)
        ax.set_ylabel(metric, fontsize=10)
        ax.set_ylim(*_y_range(metric))
        ax.tick_params(labelsize=9.5)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(ticks, rotation=30, ha="right", fontsize=9.5)
    axes[-1].set_xlabel("randomized up to layer (stage)", fontsize=10)
    lines: dict[str, Any] = {}  # one legend entry per method, also for methods only some panels show
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            lines.setdefault(label, handle)
    # proxies that explain the line styles: what the dashed lines and the bands are
    lines[_SIMILARITY_KEYS[0]] = Line2D([], [], color="0.4", linestyle="--", linewidth=0.9)
    lines[_SIMILARITY_KEYS[1]] = Patch(color="0.4", alpha=0.15, linewidth=0)
    lines[_SIMILARITY_KEYS[2]] = Line2D([], [], color="0.4", marker="o", ms=4,
                                                                         linestyle="none")
    legend = fig.legend(list(lines.values()), list(lines), fontsize=9.5, loc="lower left", ncol=2,
                        bbox_to_anchor=(0.01, 0.0), frameon=False, columnspacing=1.0, handlelength=1.8)
    # the legend's measured height (no full draw) sets the bottom margin: the figure grows to fit it exactly
    measured = legend.get_window_extent(renderer=fig.canvas.get_renderer()).height / fig.dpi + 0.1
    height = panel * len(metrics) + top + axis + measured
    fig.set_size_inches(width, height)
    fig.subplots_adjust(top=1 - top / height, bottom=(axis + measured) / height)
    fig.suptitle(_SIMILARITY_TITLE,
                 fontsize=10.5, x=0.02, ha="left", y=1 - 0.04 / height, va="top")
    return fig


def _number(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def verdict_lines(report: "RandomizationReport") -> list[str]:
    """One line per method: the verdict and the numbers that decided it (the rule's metric, its normalized score
    between floor and ceiling); a control says it is one and which verdict it is expected to get.

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), methods="edge")
        >>> verdict_lines(report)[0].startswith("edge (control, expected: fails): fails (spearman_signed ")
        True
    """
    lines = []
    for name, r in report.results.items():
        v = r.verdict
        label = f"{name} (control, expected: {CONTROL_EXPECTATIONS[name][0]})" if name in CONTROL_EXPECTATIONS else name
        lines.append(
            f"{label}: {v.outcome} ({v.metric} {_number(v.similarity)}, floor {_number(v.floor)}, ceiling"
            f" {_number(v.ceiling)}, normalized {_number(v.score)})"
        )
    return lines


def _value(x: float) -> Optional[float]:
    """A table number: None (a blank cell, null in W&B) where it is not defined."""
    return None if x is None or not math.isfinite(x) else float(x)


VERDICT_COLUMNS = ["method", "verdict", "expected", "decided by", "similarity", "floor", "ceiling", "normalized"]


def verdict_table(report: "RandomizationReport") -> tuple[list[str], list[list[Any]], str]:
    """``(columns, rows, legend)`` of the verdict table: per method its verdict, the verdict a control is expected
    to get (blank for the methods under test), the metric that decided and its numbers. The legend explains the
    columns, the controls, and says why each method got its verdict (the rule's reason: kept out of the table, whose
    narrow columns TensorBoard would otherwise break mid-word).

    Numbers stay numbers (W&B sorts them); an undefined one (the normalized score when ceiling - floor is too small)
    is None, a blank cell. The per-metric curves are in the similarity figure and the report's JSON, not here, so
    the table stays narrow enough for a TensorBoard card.

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), methods="gradient")
        >>> columns, rows, legend = verdict_table(report)
        >>> [row[:3] for row in rows if row[0] != "gradient"]
        [['edge', 'fails', 'fails (control)'], ['random', 'inconclusive', 'inconclusive (control)']]
    """
    rows = []
    for name, r in report.results.items():
        v = r.verdict
        expected = f"{CONTROL_EXPECTATIONS[name][0]} (control)" if name in CONTROL_EXPECTATIONS else ""
        rows.append([name, v.outcome, expected, v.metric, _value(v.similarity), _value(v.floor), _value(v.ceiling),
                     _value(v.score)])
    rule = report.rule
    used = rule.num_stages(max(1, report.num_stages))
    legend = (
        f"similarity: median over the probes of {rule.metric} between each stage's maps and the original maps,"
        f" averaged over the first {used} stage(s). floor: the same between the maps of two unrelated inputs;"
        " ceiling: between two runs of the method on the same input (1 for deterministic methods). normalized ="
        f" (similarity - floor) / (ceiling - floor): above {rule.fail_above:g} fails (the maps ignore the model),"
        f" below {rule.pass_below:g} passes, blank when ceiling - floor < {rule.min_gap:g} (the test cannot tell)."
        " Controls: " + "; ".join(f"{n} is expected to {e[0].rstrip('s') if e[0] == 'fails' else 'be ' + e[0]}"
                                    f" ({e[1]})" for n, e in CONTROL_EXPECTATIONS.items()) + ". Why: "
        + "; ".join(f"{name}: {r.verdict.reason}" for name, r in report.results.items()) + "."
    )
    return list(VERDICT_COLUMNS), rows, legend


# ------------------------------------------------------------------ tests of explanations (input invariance, fragility,
# ROAR): reports with a ``verdicts`` dict of :class:`~lightning_lens.sanity.Verdict` and their own numbers
__all__ += ["comparison_verdict_lines", "fragility_figure", "invariance_figure", "roar_figure"]


def comparison_verdict_lines(report: Any) -> list[str]:
    """One line per method of any report with a ``verdicts`` dict (input invariance, fragility, ROAR, random logit,
    data randomization): the verdict, the number that decided it and the reason.

    Example:
        >>> from lightning_lens.sanity import input_invariance
        >>> from lightning_lens.testing import SmallCNN
        >>> report = input_invariance(SmallCNN(width=2), torch.rand(2, 1, 32, 32), methods="gradient")
        >>> comparison_verdict_lines(report)[0].startswith("gradient: passes (relative_difference ")
        True
    """
    return [f"{name}: {v.outcome} ({v.metric} {_number(v.score)}): {v.reason}" for name, v in report.verdicts.items()]


def _small_figure(width: float = 5.0, height: float = 2.8) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return fig, ax


def invariance_figure(report: Any) -> Figure:
    """Input invariance: the relative difference of each method's maps (model vs shifted twin) per example, on a log
    scale, with the tolerance dashed; methods below it pass.

    Example:
        >>> from lightning_lens.sanity import input_invariance
        >>> from lightning_lens.testing import SmallCNN
        >>> report = input_invariance(SmallCNN(width=2), torch.rand(2, 1, 32, 32), methods=["gradient",
        ...                           "gradient_x_input"])
        >>> invariance_figure(report).axes[0].get_yscale()
        'log'
    """
    fig, ax = _small_figure()
    names = list(report.differences)
    floor = 1e-12
    for i, name in enumerate(names):
        values = report.differences[name].double().clamp_min(floor).numpy()
        color = {"passes": "C2", "fails": "C3"}.get(report.verdicts[name].outcome, "C7")
        ax.scatter(np.full(values.shape, i, dtype=float), values, s=12, color=color, alpha=0.7)
    ax.axhline(max(report.tolerance, floor), color="k", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([f"{n}\n({report.verdicts[n].outcome})" for n in names], fontsize=7)
    ax.set_ylabel("max |a - a'| / max |a|", fontsize=8)
    ax.set_title("input invariance: maps of the model vs its shifted twin (dashed: tolerance)", fontsize=8)
    fig.tight_layout()
    return fig


def fragility_figure(result: Any) -> Figure:
    """Fragility: per example, the top-k intersection after the attack and after random noise of the same size
    (joined by a line), with the means as bars.

    Example:
        >>> from lightning_lens.evaluation import explanation_fragility
        >>> net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> result = explanation_fragility(net, torch.rand(3, 6), epsilon=0.1, n_steps=2, top_k=2)
        >>> [t.get_text() for t in fragility_figure(result).axes[0].get_xticklabels()]
        ['attack', 'random']
    """
    fig, ax = _small_figure(4.0, 2.8)
    attack, random = result.topk_attack.double().numpy(), result.topk_random.double().numpy()
    means = result.means()
    ax.bar([0, 1], [means["topk_attack"], means["topk_random"]], color=["C3", "C7"], alpha=0.35, width=0.6)
    for a, r in zip(attack, random):
        ax.plot([0, 1], [a, r], color="k", alpha=0.25, linewidth=0.8, marker="o", ms=3)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["attack", "random"])
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"top-{result.top_k} intersection", fontsize=8)
    ax.set_title(f"{result.method}: fragility at epsilon {result.epsilon:g} ({result.verdict.outcome})", fontsize=8)
    fig.tight_layout()
    return fig


def roar_figure(report: Any) -> Figure:
    """ROAR: test accuracy of the retrained model against the removed fraction, one line per method, the random
    control dashed.

    Example:
        >>> from lightning_lens.evaluation import ROARReport
        >>> report = ROARReport([0.0, 0.5], {"gradient": torch.tensor([0.9, 0.5]), "random": torch.tensor([0.9, 0.8])},
        ...                     {}, 0.02, 1, 3)
        >>> [line.get_label() for line in roar_figure(report).axes[0].get_lines()]
        ['gradient', 'random']
    """
    fig, ax = _small_figure()
    x = np.asarray(report.fractions, dtype=float)
    for index, (name, acc) in enumerate(report.accuracy.items()):
        control = name == "random"
        ax.plot(x, acc.double().numpy(), marker="o", ms=3, label=name,
                color="k" if control else f"C{index % 10}", linestyle="--" if control else "-")
    ax.set_xlabel("fraction of features removed (top-t by the method)", fontsize=8)
    ax.set_ylabel("test accuracy after retraining", fontsize=8)
    ax.set_title("ROAR: steeper than random = the method found informative features", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
