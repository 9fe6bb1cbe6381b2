"""Console summaries: a few lines of text per callback, logged at the end of fit.

Pure functions of what the callbacks keep (reports, metric dicts); no Lightning. Every callback's ``summary()``
builds its text here, and :class:`~lightning_lens.callbacks._base.LensCallback` logs it once on rank zero. The same
explanations (what a verdict means, what the controls are expected to show) are used by the HTML run report.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional

# one number format and one table of control expectations for the logged tables, the figures, the console and the
# report (re-exported here: ``lightning_lens.report.format_number`` is ``lightning_lens.loggers.format_number``)
from lightning_lens.loggers.sinks import format_number
from lightning_lens.render.sanity import CONTROL_EXPECTATIONS

__all__ = [
    "CONTROL_EXPECTED",
    "epochs_text",
    "format_number",
    "knn_summary",
    "saliency_summary",
    "sanity_rule_text",
    "sanity_summary",
    "text_table",
    "tracin_summary",
    "verdict_meaning",
]

#: the verdict each model-independent control of the randomization check is expected to get, and why: the one table
#: (:data:`lightning_lens.render.CONTROL_EXPECTATIONS`) the figures use too, under the report's name
CONTROL_EXPECTED: dict[str, tuple[str, str]] = CONTROL_EXPECTATIONS

_MEANING = {
    "passes": "the maps changed when the weights were randomized: they depend on what the model learned",
    "fails": "the maps barely changed when the weights were randomized: they do not reflect what the model learned",
    "inconclusive": "the test cannot tell (the score lies between the thresholds, or the controls leave no room)",
}


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """A plain-text table with left-aligned columns (numbers with 3 significant digits) for the console.

    Example:
        >>> print(text_table(["method", "score"], [["gradient", 0.01234], ["edge", 1.0]]))
          method    score
          gradient  0.0123
          edge      1
    """
    cells = [[str(c) for c in columns]] + [[format_number(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def epochs_text(epochs: Sequence[int]) -> str:
    """Epochs as short ranges.

    Example:
        >>> epochs_text([0, 1, 2, 5, 7, 8])
        '0-2, 5, 7-8'
    """
    out: list[str] = []
    for e in sorted(set(int(e) for e in epochs)):
        if out and out[-1][1] == e - 1:
            out[-1] = (out[-1][0], e)
        else:
            out.append((e, e))  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def verdict_meaning(outcome: str) -> str:
    """What a verdict of the randomization check means, in words.

    Example:
        >>> verdict_meaning("passes").startswith("the maps changed")
        True
    """
    return _MEANING.get(outcome, outcome)


def sanity_rule_text(metric: str, stages_used: int, num_stages: int, pass_below: float, fail_above: float) -> str:
    """One sentence: which metric decides a verdict and how.

    Example:
        >>> sanity_rule_text("spearman_signed", 3, 5, 0.25, 0.5)[:60]
        'deciding metric: spearman_signed, the median similarity of e'
    """
    return (
        f"deciding metric: {metric}, the median similarity of each map to the original model's map, averaged over the"
        f" first {stages_used} of {num_stages} randomization stages and normalized between the floor (maps of two"
        f" different inputs) and the ceiling (re-runs on the same input); passes below {pass_below:g}, fails above"
        f" {fail_above:g}"
    )


def _sanity_rows(verdicts: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, v in verdicts.items():
        expected = CONTROL_EXPECTED.get(name)
        label = f"{name} (control)" if expected else name
        note = ""
        if expected:
            note = "as expected for a control" if v["outcome"] == expected[0] else f"expected {expected[0]}"
        rows.append([label, v["outcome"], v["similarity"], v["floor"], v["ceiling"], v["score"], note])
    return rows


def sanity_summary(report: Any, title: str = "RandomizationSanityCheck verdicts") -> str:
    """The verdict table of a :class:`~lightning_lens.sanity.RandomizationReport` (or its ``to_dict()``): the rule
    with its deciding metric, then one row per method with the numbers behind its verdict; controls are marked and
    compared with their expected verdicts.

    Example:
        >>> from lightning_lens.sanity import cascading_randomization
        >>> from lightning_lens.testing import SmallCNN
        >>> import torch
        >>> report = cascading_randomization(SmallCNN(width=2), torch.rand(4, 1, 32, 32), methods=["gradient"])
        >>> lines = sanity_summary(report).splitlines()
        >>> lines[0]
        'RandomizationSanityCheck verdicts (cascading randomization, 6 stages; deciding metric spearman_signed):'
        >>> [line.split()[0] for line in lines[-3:]], "as expected for a control" in lines[-2]
        (['gradient', 'edge', 'random'], True)
    """
    d = report if isinstance(report, Mapping) else report.to_dict(include_per_example=False)
    rule = d["rule"]
    num_stages = len(d["stages"])
    verdicts = {name: m["verdict"] for name, m in d["methods"].items()}
    used = max((int(v.get("stages_used") or 0) for v in verdicts.values()), default=0)
    if not used:
        used = max(1, math.ceil(float(rule["stages"]) * max(1, num_stages)))
    rule_text = sanity_rule_text(rule["metric"], used, num_stages, rule["pass_below"], rule["fail_above"])
    head = (f"{title} ({d['mode']} randomization, {num_stages} stages; deciding metric {rule['metric']}):\n"
            + textwrap.fill(rule_text, width=116, initial_indent="  ", subsequent_indent="  "))
    table = text_table(["method", "verdict", rule["metric"], "floor", "ceiling", "normalized", ""],
                       _sanity_rows(verdicts))
    return head + "\n" + table


def knn_summary(metrics: Mapping[str, float], epoch: Optional[int] = None, title: str = "NeighborGallery") -> str:
    """The headline numbers of the kNN head's evaluation.

    Example:
        >>> knn_summary({"accuracy": 0.91, "linear_probe_accuracy": 0.9, "mean_credibility": 0.8123}, epoch=3)
        'NeighborGallery (epoch 3): kNN accuracy 0.91, linear probe accuracy 0.9, mean credibility 0.812'
    """
    names = {"accuracy": "kNN accuracy", "linear_probe_accuracy": "linear probe accuracy",
             "neighbor_label_agreement": "neighbour label agreement", "mean_credibility": "mean credibility",
             "probe_mean_credibility": "probe mean credibility", "eval_samples": "evaluated samples"}
    parts = [f"{label} {format_number(metrics[key])}" for key, label in names.items() if key in metrics]
    when = f" (epoch {epoch})" if epoch is not None else ""
    return f"{title}{when}: " + (", ".join(parts) if parts else "no evaluation")


def tracin_summary(when: str, scored: int, planned: int, checkpoints: int, ranked_ids: Sequence[int],
                   disagreement: Optional[float] = None, top: int = 5) -> str:
    """TracIn's scoring run: how much was scored and the most self-influential training ids (likely label errors).

    Example:
        >>> for part in tracin_summary("end of fit", 100, 100, 3, [7, 3, 9, 1, 4, 2]).split("; "):
        ...     print(part)
        TracInCallback (end of fit): 100 of 100 training examples scored over 3 snapshots
        top self-influence ids [7, 3, 9, 1, 4]
    """
    text = (f"TracInCallback ({when}): {scored} of {planned} training examples scored over {checkpoints} snapshots;"
            f" top self-influence ids {list(ranked_ids)[:top]}")
    if disagreement is not None and math.isfinite(disagreement):
        text += f" ({disagreement:.0%} of the top ids are predicted differently from their label)"
    return text


def saliency_summary(
    epochs: Sequence[int],
    methods: Sequence[str],
    scalars: Mapping[str, float],
    method_epochs: Optional[Mapping[str, Sequence[int]]] = None,
) -> str:
    """Which epochs got maps, for which methods, and the last epoch's quality metrics (``quality/...`` scalars; a
    mask metric is shown beside its ``_chance`` level). With ``method_epochs`` (method -> the epochs it logged; under
    a budget methods take turns) methods are grouped by their epochs; a method that never ran is said so.

    Example:
        >>> saliency_summary([0, 3], ["gradient"], {"quality/gradient/relevance_mass/square": 0.41,
        ...                                        "quality/gradient/relevance_mass/square_chance": 0.04}).split("; ")
        ... # doctest: +NORMALIZE_WHITESPACE
        ['SaliencyMapCallback: maps of gradient logged at epochs 0, 3',
         'quality at the last: gradient relevance_mass/square 0.41 (chance 0.04)']
        >>> saliency_summary([0, 7], ["gradient", "smoothgrad", "gradcam"], {},
        ...                  method_epochs={"gradient": [0, 7], "smoothgrad": [7], "gradcam": [7]})
        'SaliencyMapCallback: maps of gradient logged at epochs 0, 7; smoothgrad, gradcam logged at epochs 7'
    """
    if method_epochs is None:
        groups = {tuple(epochs): list(methods)}
    else:
        groups = {}
        for method in methods:
            groups.setdefault(tuple(method_epochs.get(method, ())), []).append(method)
    parts = [f"{', '.join(names) or 'no method'} logged at epochs {epochs_text(list(ep)) or '-'}" if ep else
             f"{', '.join(names)} not logged (deferred by the budget every time)" for ep, names in groups.items()]
    text = "SaliencyMapCallback: maps of " + "; ".join(parts)
    quality = []
    for key, value in scalars.items():
        if not key.startswith("quality/") or key.endswith("_chance"):
            continue
        _, method, metric = key.split("/", 2)
        item = f"{method} {metric} {format_number(value)}"
        chance = scalars.get(key + "_chance")
        if chance is not None:
            item += f" (chance {format_number(chance)})"
        quality.append(item)
    if quality:
        text += "; quality at the last: " + ", ".join(quality)
    return text
