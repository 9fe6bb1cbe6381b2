"""Verdicts and the report of a model-randomization test.

**The verdict rule** (:class:`VerdictRule`). Adebayo et al. give no numeric threshold, and Binder et al. (CVPR 2023)
show that raw similarities can be gamed (noise "passes"), so a verdict is only given *relative to controls* computed
in the same run, for the same method and metric:

* the **floor** ``f``: the median similarity between the original maps of two *different* inputs (each example
  paired with the next one of another class), i.e. how alike two unrelated maps of this method already are;
* the **ceiling** ``c``: 1 for a deterministic method; for a stochastic one (a method with a ``seed`` attribute) the
  median similarity between its original maps and a re-run with another seed, i.e. how alike two maps of the *same*
  input and model are.

The statistic ``s`` is the similarity to the original maps (median over examples) averaged over the first
``stages`` fraction of the randomization stages (default: the first half: the upper half of the network in a
top-down cascade, where Guided Backprop is known to be invariant). With ``c - f >= min_gap`` the normalized score
``(s - f) / (c - f)`` decides: above ``fail_above`` -> ``fails`` (the maps barely change when the model does), below
``pass_below`` -> ``passes``, in between -> ``inconclusive``. When ``c - f < min_gap`` re-runs of the method differ as
much as unrelated maps do (a random map with fresh noise): the test cannot tell, so ``inconclusive``, unless
``s >= c + min_gap`` (maps that stay put under randomization although re-runs vary: ``fails``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from lightning_lens.sanity._common import median as _median
from lightning_lens.sanity.similarity import ALL_METRICS

__all__ = ["MapComparison", "MethodResult", "RandomizationReport", "Verdict", "VerdictRule"]

Outcome = Literal["passes", "fails", "inconclusive"]


def _nanmedian(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return t.float().nanmedian(dim=dim).values


def _f(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict (see the module docstring).

    Args:
        metric: the metric the verdict reads. Default ``"spearman_signed"``: Adebayo et al. found most of the
            sensitivity to the weights in the sign of the maps, while absolute maps keep the input's structure (a
            high floor: ``|gradient|`` maps of two different digits already correlate), which blurs the verdict.
            ``"spearman_abs"`` is Quantus' MPRT default.
        stages: fraction in ``(0, 1]`` of the randomization stages, from the first, whose similarities are averaged.
        fail_above: normalized score above which the method fails.
        pass_below: normalized score below which the method passes (``<= fail_above``).
        min_gap: the smallest ceiling - floor gap for which a normalized score is meaningful.

    Example:
        >>> VerdictRule(metric="spearman_signed", fail_above=0.4).fail_above
        0.4
    """

    metric: str = "spearman_signed"
    stages: float = 0.5
    fail_above: float = 0.5
    pass_below: float = 0.25
    min_gap: float = 0.1

    def __post_init__(self) -> None:
        if self.metric not in ALL_METRICS:
            raise ValueError(f"VerdictRule.metric must be one of {list(ALL_METRICS)}, got {self.metric!r}")
        if not 0 < self.stages <= 1:
            raise ValueError(f"VerdictRule.stages must be a fraction in (0, 1], got {self.stages!r}")
        if not self.pass_below <= self.fail_above:
            raise ValueError(
                f"VerdictRule.pass_below ({self.pass_below}) must not exceed fail_above ({self.fail_above})"
            )
        if not self.min_gap > 0:
            raise ValueError(f"VerdictRule.min_gap must be > 0, got {self.min_gap!r}")

    def num_stages(self, total: int) -> int:
        """How many stages (from the first) the verdict averages over."""
        return max(1, math.ceil(self.stages * total))

    def judge(self, method: str, similarity: dict[str, torch.Tensor], floor: dict[str, float],
              ceiling: dict[str, float]) -> "Verdict":
        """The verdict from ``{metric: (S, B)}`` similarities and per-metric controls (``inconclusive`` if the
        rule's metric was not computed for this method)."""
        if self.metric not in similarity:
            return Verdict(method, "inconclusive", self.metric, math.nan, math.nan, math.nan, math.nan,
                           f"{self.metric} does not apply to this method's maps", 0)
        return self.decide(method, similarity[self.metric], floor[self.metric], ceiling[self.metric])

    def decide(self, method: str, similarity: torch.Tensor, floor: float, ceiling: float) -> "Verdict":
        """The verdict for ``similarity`` ``(S, B)`` of ``method`` given its floor and ceiling for ``self.metric``."""
        k = self.num_stages(similarity.shape[0])
        per_stage = _nanmedian(similarity[:k], dim=1)
        stat = float(per_stage.nanmean()) if torch.isfinite(per_stage).any() else math.nan
        common = dict(method=method, metric=self.metric, similarity=stat, floor=floor, ceiling=ceiling,
                      stages_used=k)
        if math.isnan(stat):
            return Verdict(outcome="inconclusive", score=math.nan,
                           reason="no finite similarity (constant or non-finite maps)", **common)
        if math.isnan(floor):
            return Verdict(outcome="inconclusive", score=math.nan,
                           reason="no floor: the floor pairs different inputs, so at least 2 examples are needed",
                           **common)
        gap = ceiling - floor
        if not gap >= self.min_gap:
            if stat >= ceiling + self.min_gap:
                return Verdict(outcome="fails", score=math.nan, reason=(
                    f"the maps stayed alike ({_f(stat)}) although re-runs of the method differ"
                    f" (ceiling {_f(ceiling)})"), **common)
            return Verdict(outcome="inconclusive", score=math.nan, reason=(
                f"ceiling - floor = {_f(gap)} < {self.min_gap}: re-runs of the method differ about as much as maps"
                " of different inputs"), **common)
        score = (stat - floor) / gap
        if score > self.fail_above:
            outcome: Outcome = "fails"
            reason = f"normalized similarity {_f(score)} > {self.fail_above}: the maps barely changed"
        elif score < self.pass_below:
            outcome = "passes"
            reason = f"normalized similarity {_f(score)} < {self.pass_below}: the maps changed"
        else:
            outcome = "inconclusive"
            reason = f"normalized similarity {_f(score)} between {self.pass_below} and {self.fail_above}"
        return Verdict(outcome=outcome, score=score, reason=reason, **common)


@dataclass(frozen=True)
class Verdict:
    """A method's verdict with the numbers behind it.

    Attributes:
        method: the method's name.
        outcome: ``"passes"``, ``"fails"`` or ``"inconclusive"``.
        metric: the metric the verdict read.
        similarity: the statistic (median over examples, averaged over ``stages_used`` stages).
        floor, ceiling: the controls (see :class:`VerdictRule`).
        score: ``(similarity - floor) / (ceiling - floor)`` (``nan`` when not defined).
        reason: one sentence.
        stages_used: how many stages the statistic averages.
    """

    method: str
    outcome: Outcome
    metric: str
    similarity: float
    floor: float
    ceiling: float
    score: float
    reason: str
    stages_used: int

    def __str__(self) -> str:
        stages = f" over the first {self.stages_used} stages" if self.stages_used > 1 else ""
        return (f"{self.method} {self.outcome}: {self.metric} {_f(self.similarity)}{stages} (floor {_f(self.floor)},"
                f" ceiling {_f(self.ceiling)}, normalized {_f(self.score)}): {self.reason}")

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass
class MapComparison:
    """Per-method similarity of the original maps with one other set of maps of the same inputs (maps of another
    class, of a random-label model), with its controls and verdicts: the common part of
    :class:`~lightning_lens.sanity.RandomLogitResult` and :class:`~lightning_lens.sanity.DataRandomizationReport`.

    Attributes:
        similarity: ``{method: {metric: (B,)}}`` similarity of the two sets of maps.
        floor, ceiling: ``{method: {metric: float}}`` controls (see :class:`VerdictRule`).
        verdicts: ``{method: Verdict}``.
    """

    similarity: dict[str, dict[str, torch.Tensor]]
    floor: dict[str, dict[str, float]]
    ceiling: dict[str, dict[str, float]]
    verdicts: dict[str, Verdict]

    def _method_lines(self) -> list[str]:
        """One summary entry per method: its verdict, then each metric's median and floor."""
        lines = []
        for name, d in self.similarity.items():
            scores = ", ".join(f"{m} {_f(_median(v))} (floor {_f(self.floor[name][m])})" for m, v in d.items())
            lines.append(f"  {self.verdicts[name]}\n    {scores}")
        return lines

    def _comparison_dict(self) -> dict[str, Any]:
        return {
            "similarity": {n: {m: v.tolist() for m, v in d.items()} for n, d in self.similarity.items()},
            "floor": self.floor, "ceiling": self.ceiling,
            "verdicts": {n: v.to_dict() for n, v in self.verdicts.items()},
        }


@dataclass
class MethodResult:
    """Everything measured for one method.

    Attributes:
        name: the method's label.
        metrics: the metrics computed (those that apply to its maps).
        similarity: ``{metric: (S, B)}`` similarity of each stage's maps with the original maps, per example.
        floor: ``{metric: float}`` (see :class:`VerdictRule`).
        ceiling: ``{metric: float}``.
        stochastic: whether the ceiling came from a re-run with another seed.
        maps: ``(S + 1, B, *spatial)`` normalized absolute maps (stage 0 = original), or ``None``.
        signed_maps: ``(S + 1, B, *spatial)`` normalized signed maps, or ``None``.
        verdict: the verdict.
    """

    name: str
    metrics: tuple[str, ...]
    similarity: dict[str, torch.Tensor]
    floor: dict[str, float]
    ceiling: dict[str, float]
    stochastic: bool
    maps: Optional[torch.Tensor]
    signed_maps: Optional[torch.Tensor]
    verdict: Verdict


@dataclass
class RandomizationReport:
    """Result of :func:`~lightning_lens.sanity.cascading_randomization` / ``independent_randomization``.

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        order: ``"top_down"`` or ``"bottom_up"``.
        stages: the layer randomized at each stage (stage ``s`` = ``stages[s - 1]``; stage 0 is the original model).
        stage_parameters: the parameter names re-drawn at each stage.
        fallback_parameters: parameters re-drawn with the fallback rule (no ``reset_parameters`` covered them).
        skipped_modules: modules with parameters that never ran in the forward pass (not randomized).
        batchnorm: the BatchNorm policy used.
        target_mode: ``"fixed"`` or ``"randomized_prediction"``.
        targets: ``(S + 1, B)`` class explained at each stage.
        predictions: ``(S + 1, B)`` the predicted class at each stage with ``target="randomized_prediction"``;
            otherwise ``(1, B)``, the original model's (a forward pass per stage would cost a third of a gradient).
        seed: seed of the private generator.
        rule: the verdict rule.
        results: ``{method: MethodResult}`` in the order the methods were given.

    Example:
        >>> report = cascading_randomization(model, x, y, ["gradient", "guided_backprop"])  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """

    mode: str
    order: str
    stages: list[str]
    stage_parameters: list[list[str]]
    fallback_parameters: list[str]
    skipped_modules: list[str]
    batchnorm: str
    target_mode: str
    targets: torch.Tensor
    predictions: torch.Tensor
    seed: int
    rule: VerdictRule
    results: dict[str, MethodResult] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------------- access
    @property
    def methods(self) -> list[str]:
        return list(self.results)

    @property
    def num_stages(self) -> int:
        """Number of randomized stages ``S`` (the original model is stage 0)."""
        return len(self.stages)

    @property
    def metrics(self) -> list[str]:
        """Every metric computed for at least one method, in display order."""
        seen = {m for r in self.results.values() for m in r.metrics}
        return [m for m in ALL_METRICS if m in seen]

    @property
    def verdicts(self) -> dict[str, Verdict]:
        return {name: r.verdict for name, r in self.results.items()}

    def _result(self, method: str) -> MethodResult:
        if method not in self.results:
            raise KeyError(f"method {method!r} is not in the report; methods: {self.methods}")
        return self.results[method]

    def curve(self, method: str, metric: str) -> torch.Tensor:
        """``(S + 1,)`` median similarity over examples at each stage; stage 0 is the method's ceiling."""
        r = self._result(method)
        if metric not in r.similarity:
            raise KeyError(f"metric {metric!r} was not computed for {method!r}; computed: {list(r.metrics)}")
        return torch.cat([torch.tensor([r.ceiling[metric]]), _nanmedian(r.similarity[metric], dim=1)])

    def final(self, method: str, metric: str) -> float:
        """Median similarity over examples at the last stage (full randomization in a cascade)."""
        return float(self.curve(method, metric)[-1])

    # ---------------------------------------------------------------------------------------------------- display
    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: one row per method with its verdict, the numbers behind it and every metric at the
        last stage."""
        metrics = self.metrics
        columns = ["method", "verdict", "metric", "similarity", "floor", "ceiling", "normalized"]
        columns += [f"final {m}" for m in metrics]
        rows = []
        for name, r in self.results.items():
            v = r.verdict
            row: list[Any] = [name, v.outcome, v.metric, v.similarity, v.floor, v.ceiling, v.score]
            row += [self.final(name, m) if m in r.similarity else math.nan for m in metrics]
            rows.append(row)
        return columns, rows

    def summary(self) -> str:
        """A readable multi-line summary: setup, one verdict line per method, and each method's curve."""
        lines = [
            f"{self.mode.capitalize()} model randomization ({self.order.replace('_', '-')}, {self.num_stages} stages,"
            f" batchnorm={self.batchnorm!r}, target={self.target_mode}, {self.targets.shape[1]} examples, seed"
            f" {self.seed})",
            f"Verdict rule: {self.rule.metric} over the first {self.rule.num_stages(max(1, self.num_stages))}"
            f" stage(s); fails above {self.rule.fail_above}, passes below {self.rule.pass_below} (normalized between"
            " floor and ceiling)",
        ]
        lines += [f"  {v}" for v in self.verdicts.values()]
        stage_names = ["original"] + self.stages
        lines.append("Median similarity to the original maps per stage (" + " > ".join(stage_names) + "):")
        for name, r in self.results.items():
            for m in r.metrics:
                values = " ".join(_f(float(v)) for v in self.curve(name, m))
                lines.append(f"  {name:<20s} {m:<16s} {values}   floor {_f(r.floor[m])}")
        if self.fallback_parameters:
            lines.append("Re-drawn with the fallback N(0, rms^2) rule: " + ", ".join(self.fallback_parameters))
        if self.skipped_modules:
            lines.append("Never ran, not randomized: " + ", ".join(self.skipped_modules))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self, include_per_example: bool = True) -> dict[str, Any]:
        """A JSON-serializable dict (no maps; per-example similarities unless ``include_per_example=False``)."""
        out: dict[str, Any] = {
            "mode": self.mode, "order": self.order, "stages": list(self.stages),
            "stage_parameters": [list(p) for p in self.stage_parameters],
            "fallback_parameters": list(self.fallback_parameters), "skipped_modules": list(self.skipped_modules),
            "batchnorm": self.batchnorm, "target_mode": self.target_mode, "seed": self.seed,
            "targets": self.targets.tolist(), "predictions": self.predictions.tolist(),
            "rule": {k: getattr(self.rule, k) for k in self.rule.__dataclass_fields__},
            "methods": {},
        }
        for name, r in self.results.items():
            entry: dict[str, Any] = {
                "verdict": r.verdict.to_dict(), "stochastic": r.stochastic, "metrics": list(r.metrics),
                "floor": {m: _jsonable(v) for m, v in r.floor.items()},
                "ceiling": {m: _jsonable(v) for m, v in r.ceiling.items()},
                "curve": {m: [_jsonable(float(v)) for v in self.curve(name, m)] for m in r.metrics},
            }
            if include_per_example:
                entry["similarity"] = {m: [[_jsonable(float(v)) for v in row] for row in t]
                                       for m, t in r.similarity.items()}
            out["methods"][name] = entry
        json.dumps(out)  # fail here, not in a logger, if something is not serializable
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v
