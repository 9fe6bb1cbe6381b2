"""Membership inference from losses and explanations: threshold attacks, exact ROC AUC and TPR at low FPR.

A threshold attack calls a sample a training member when one statistic of the model on it lies on the member side of
a threshold. The side is fixed in advance, never fitted to the data (an attack that picks its direction after seeing
the answers overstates the leak):

=====================  =======  =======================================================================================
statistic              members  why
=====================  =======  =======================================================================================
``loss``               lower    the model was fitted to them (Yeom et al. 2018, "Privacy Risk in Machine Learning")
``gradient_norm``      lower    the L2 norm of the explanation map of the label's score; a fitted point sits far from
                                the decision boundary, where the output is flatter (Shokri et al. 2021 argue so for
                                the gradient; they attack with its variance, below)
``gradient_variance``  lower    the variance over input features of the explanation map of the label's score (Shokri,
                                Strobel & Zick 2021, "On the Privacy Risks of Model Explanations", AIES: training
                                points have lower explanation variance; their threshold attack works on tabular data
                                and is near chance on some image data)
=====================  =======  =======================================================================================

An AUC below 0.5 therefore means the statistic leaks in the opposite direction on that model; it is reported as it
is. The explanation is the map of ``method`` (any registered method, default the plain input gradient) for the
sample's label, of the output ``score`` says (:data:`SCORES`; passed to the method as its ``output_fn``):

=====================  ================================================================================================
``score``              what is differentiated for the explanation statistics
=====================  ================================================================================================
``"probability"``      the softmax probability of the label, the output Shokri et al. explain (the default). Its
                       gradient ``p_y (grad z_y - sum_j p_j grad z_j)`` vanishes as ``p_y`` nears 1: the paper's
                       reason confidently fitted training points have lower explanation variance
``"log_probability"``  the log-softmax of the label: ``grad z_y - sum_j p_j grad z_j``
``"logit"``            the label's logit ``z_y``, the score the attribution methods explain elsewhere in this library
=====================  ================================================================================================

Notes:
    The directions above were fixed before measuring and are kept whatever the data say. Measured on an MLP
    (64-64-10, Adam, 500 full-batch steps) overfit on scikit-learn's digits, members against as many held-out digits,
    3 seeds: with ``score="logit"`` both gradient statistics came out *below* 0.5 (AUC 0.40-0.48 with 50 members,
    0.47-0.50 with 200): the members' logit gradients are, if anything, larger, the opposite of the documented
    direction. With ``"probability"`` (0.75-0.76 with 50 members, 0.65 with 200) and ``"log_probability"`` (0.78,
    0.65) they leak in the documented direction, about as much as the loss (0.77, 0.65): there the explanation
    carries the model's confidence. An explanation AUC far below 0.5 is a leak too (the attack's side is wrong for
    that model, not the model private).

**ROC AUC** is exact: the Mann-Whitney statistic with tied scores counted one half (average ranks), which is the
trapezoidal area under the ROC curve scikit-learn's ``roc_auc_score`` computes. **TPR at low FPR** follows Carlini
et al. 2022 ("Membership Inference Attacks From First Principles"): the ROC curve's points are the attack's distinct
thresholds (a sample is flagged when its statistic is on the member side of, or equal to, the threshold); the
reported value is the largest true-positive rate among points whose false-positive rate is at most ``fpr``, and
``threshold`` is that point's threshold in the statistic's units (``±inf``: no threshold flags anyone at that FPR).
NaN and infinite statistics are excluded (and counted) per statistic.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution.base import FunctionAttribution, OutputFn, forward_logits
from lightning_lens.attribution.registry import MethodSpec, _is_name_kwargs, resolve_method
from lightning_lens.sanity.similarity import _average_ranks
from lightning_lens.utils import preserve_modes
from lightning_lens.utils.checks import (
    check_choice,
    check_float,
    check_instance,
    check_int,
    check_optional,
    check_tensor,
)

__all__ = [
    "DIRECTIONS",
    "SCORES",
    "MembershipInferenceResult",
    "ScoreOutput",
    "ThresholdAttack",
    "attacks_from_statistics",
    "membership_inference",
    "membership_statistics",
    "roc_auc",
    "score_explainer",
    "threshold_attack",
    "tpr_at_fpr",
]

#: the side of the threshold members are on, per statistic, fixed in advance (see the module docstring).
DIRECTIONS: dict[str, str] = {"loss": "lower", "gradient_norm": "lower", "gradient_variance": "lower"}
_EXPLANATION_STATISTICS = ("gradient_norm", "gradient_variance")
#: what the explanation statistics differentiate (see the module docstring); the first is the default.
SCORES: tuple[str, ...] = ("probability", "log_probability", "logit")


def _check_scores(scores: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"scores and labels must be torch.Tensors, got {type(scores).__name__} and {type(labels).__name__}"
        )
    scores, labels = scores.detach().reshape(-1), labels.detach().reshape(-1)
    if len(scores) != len(labels):
        raise ValueError(f"scores ({len(scores)}) and labels ({len(labels)}) must have the same length")
    if not bool(torch.isfinite(scores.double()).all()):
        raise ValueError("scores holds NaN or infinite values; drop them first (membership_inference excludes them)")
    positive = labels.bool() if labels.dtype == torch.bool else labels == 1
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    return scores.double(), positive


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of ``scores`` (higher: more likely a member) for 0/1 ``labels``; ties count one half, so this
    equals scikit-learn's ``roc_auc_score``. NaN when one class is absent.

    Example:
        >>> roc_auc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.875
    """
    s, positive = _check_scores(scores, labels)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s.unsqueeze(0))[0]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _roc_points(s: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds) at every distinct score, from +inf (nobody flagged) down; flagged means score >= t."""
    order = torch.argsort(s, descending=True, stable=True)
    s_sorted, pos_sorted = s[order], positive[order].double()
    last = torch.ones(len(s), dtype=torch.bool, device=s.device)
    last[:-1] = s_sorted[1:] != s_sorted[:-1]  # the last row of every group of equal scores
    tp = torch.cumsum(pos_sorted, 0)[last]
    fp = torch.cumsum(1 - pos_sorted, 0)[last]
    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    n_pos, n_neg = float(pos_sorted.sum()), float((1 - pos_sorted).sum())
    tpr = torch.cat([zero, tp / n_pos])
    fpr = torch.cat([zero, fp / n_neg])
    thresholds = torch.cat([torch.full((1,), math.inf, dtype=torch.float64, device=s.device), s_sorted[last]])
    return fpr, tpr, thresholds


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float = 0.01) -> tuple[float, float]:
    """``(tpr, threshold)``: the largest true-positive rate of the ROC curve among its points with false-positive rate
    at most ``fpr``, and that point's threshold (members are flagged when ``score >= threshold``; ``inf`` flags none).

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
        >>> tpr_at_fpr(scores, torch.tensor([1, 1, 0, 1, 0]), fpr=0.0)
        (0.6666666666666666, 0.8)
    """
    s, positive = _check_scores(scores, labels)
    alpha = check_float(fpr, "fpr", minimum=0.0, maximum=1.0)
    if not bool(positive.any()) or bool(positive.all()):
        return math.nan, math.nan
    rates, tprs, thresholds = _roc_points(s, positive)
    allowed = rates <= alpha + 1e-12  # the FPRs are ratios of integers: guard 0.01 vs 1/100 computed in float
    best = int(torch.argmax(torch.where(allowed, tprs, torch.full_like(tprs, -1.0))))
    return float(tprs[best]), float(thresholds[best])


@dataclasses.dataclass(frozen=True)
class ThresholdAttack:
    """One statistic's threshold attack (see the module docstring)."""

    statistic: str
    direction: str  #: ``"lower"``: members have lower values (flagged when ``value <= threshold``), else ``"higher"``
    auc: float
    tpr_at_fpr: float
    fpr: float  #: the false-positive rate ``tpr_at_fpr`` is read at
    threshold: float  #: in the statistic's units
    n_members: int
    n_non_members: int
    excluded_members: int  #: NaN/inf values left out
    excluded_non_members: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def threshold_attack(
    member_values: torch.Tensor,
    non_member_values: torch.Tensor,
    statistic: str = "statistic",
    direction: str = "lower",
    fpr: float = 0.01,
) -> ThresholdAttack:
    """The threshold attack on one statistic's values for members and non-members (NaN/inf excluded and counted).

    Example:
        >>> attack = threshold_attack(torch.tensor([0.1, 0.2, float("nan")]), torch.tensor([0.3, 0.15]), "loss")
        >>> attack.auc, attack.excluded_members
        (0.75, 1)
    """
    check_choice(direction, "direction", ("lower", "higher"))
    members = torch.as_tensor(member_values).detach().reshape(-1).double().cpu()
    others = torch.as_tensor(non_member_values).detach().reshape(-1).double().cpu()
    keep_m, keep_n = torch.isfinite(members), torch.isfinite(others)
    members, others = members[keep_m], others[keep_n]
    sign = -1.0 if direction == "lower" else 1.0
    scores = torch.cat([members, others]) * sign
    labels = torch.cat([torch.ones(len(members)), torch.zeros(len(others))])
    if len(members) and len(others):
        auc = roc_auc(scores, labels)
        tpr, threshold = tpr_at_fpr(scores, labels, fpr)
        threshold *= sign
    else:
        auc = tpr = threshold = math.nan
    return ThresholdAttack(
        statistic, direction, auc, tpr, float(fpr), threshold, len(members), len(others),
        int((~keep_m).sum()), int((~keep_n).sum()),
    )


@dataclasses.dataclass
class MembershipInferenceResult:
    """What :func:`membership_inference` found: one :class:`ThresholdAttack` per statistic, and the values."""

    attacks: dict[str, ThresholdAttack]
    member_statistics: dict[str, torch.Tensor]
    non_member_statistics: dict[str, torch.Tensor]
    method: str
    score: str = "probability"  #: what the explanation statistics differentiate (:data:`SCORES`)

    def auc(self, statistic: str) -> float:
        return self.attacks[statistic].auc

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: one row per statistic (for :func:`lightning_lens.loggers.log_table`)."""
        columns = ["statistic", "direction", "auc", "tpr_at_fpr", "fpr", "threshold", "n_members", "n_non_members",
                   "excluded"]
        rows = [
            [a.statistic, a.direction, a.auc, a.tpr_at_fpr, a.fpr, a.threshold, a.n_members, a.n_non_members,
             a.excluded_members + a.excluded_non_members]
            for a in self.attacks.values()
        ]
        return columns, rows


def _check_statistics(statistics: Any) -> tuple[str, ...]:
    if isinstance(statistics, str):
        raise TypeError(f"statistics must be a list of names, got {statistics!r}; did you mean [{statistics!r}]?")
    if not isinstance(statistics, Sequence) or not statistics:
        raise ValueError(f"statistics must be a non-empty list drawn from {sorted(DIRECTIONS)}, got {statistics!r}")
    for name in statistics:
        check_choice(name, "statistics", tuple(DIRECTIONS))
    if len(set(statistics)) != len(statistics):
        raise ValueError(f"statistics lists a name twice: {list(statistics)}")
    return tuple(statistics)


def membership_statistics(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    statistics: Sequence[str] = ("loss", "gradient_norm", "gradient_variance"),
    method: MethodSpec = "gradient",
    batch_size: Optional[int] = None,
    score: str = "probability",
) -> dict[str, torch.Tensor]:
    """Per-sample statistics ``{name: (B,) float64 CPU}`` of ``model`` on labelled samples (see the module docstring).

    The loss is the cross-entropy of the logits under ``torch.no_grad`` in eval mode; the explanation statistics come
    from ``method``'s map of the label's ``score`` (:data:`SCORES`, default the softmax probability; the method's
    template sets eval mode, asks autograd for input gradients only and restores every mode). Nothing of the model
    changes.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> stats = membership_statistics(model, torch.ones(4, 3), torch.tensor([0, 1, 0, 1]), ["gradient_norm"],
        ...                               score="logit")
        >>> bool(torch.allclose(stats["gradient_norm"][0], model.weight[0].norm().double()))
        True
    """
    names = _check_statistics(statistics)
    x = check_tensor(inputs, "inputs")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a (B,) tensor of class indices, got {type(targets).__name__}")
    y = targets.reshape(-1).long()
    if len(y) != len(x):
        raise ValueError(f"inputs ({len(x)}) and targets ({len(y)}) must have the same length")
    size = check_optional(check_int, batch_size, "batch_size", minimum=1) or len(x)
    check_choice(check_instance(score, "score", str), "score", SCORES)
    explainer = score_explainer(method, model, score) if any(n in _EXPLANATION_STATISTICS for n in names) else None
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(x), size):
        xb, yb = x[start : start + size], y[start : start + size].to(x.device)
        if "loss" in names:
            with torch.no_grad(), preserve_modes(model, mode=False):
                logits = forward_logits(model, xb)
                out["loss"].append(F.cross_entropy(logits.double(), yb, reduction="none").cpu())
        if explainer is not None:
            maps = explainer.attribute(xb, target=yb).detach().reshape(len(xb), -1).double()
            if "gradient_norm" in names:
                out["gradient_norm"].append(maps.norm(dim=1).cpu())
            if "gradient_variance" in names:
                out["gradient_variance"].append(maps.var(dim=1, correction=0).cpu())
    return {n: torch.cat(v) for n, v in out.items()}


class ScoreOutput:
    """An ``output_fn`` that turns a model's logits into the ``score`` of :data:`SCORES` (``"probability"``: softmax,
    ``"log_probability"``: log-softmax over the classes), after the method's own ``output_fn`` if it had one.

    Example:
        >>> ScoreOutput("probability")(torch.tensor([[0.0, 0.0]]))
        tensor([[0.5000, 0.5000]])
    """

    def __init__(self, score: str, inner: Optional[OutputFn] = None) -> None:
        self.score = check_choice(check_instance(score, "score", str), "score", SCORES)
        self.inner = inner

    def __call__(self, out: Any) -> torch.Tensor:
        if self.inner is not None:
            out = self.inner(out)
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif isinstance(out, Mapping) and "logits" in out:
            out = out["logits"]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
            raise ValueError(
                f"score={self.score!r} needs (batch, classes) logits with two or more classes, got"
                f" {getattr(out, 'shape', type(out).__name__)}; pass score='logit' for a model with one output"
            )
        if self.score == "logit":
            return out
        return torch.softmax(out, dim=1) if self.score == "probability" else torch.log_softmax(out, dim=1)

    def __repr__(self) -> str:
        return f"ScoreOutput({self.score!r})"


def score_explainer(method: MethodSpec, model: nn.Module, score: str = "probability") -> Any:
    """``method`` resolved for ``model`` so that it explains ``score`` of the label (:data:`SCORES`) rather than the
    logit: a name or ``(name, kwargs)`` gets ``output_fn=`` (composed with the pair's own ``output_fn``); a ready
    method object is shallow-copied with that ``output_fn`` (the caller's object is left as it is).

    Raises:
        ValueError: ``score`` is no name of :data:`SCORES`, or an explain function (it calls the model itself, so no
            ``output_fn`` reaches it) with a score other than ``"logit"``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> score_explainer("gradient", model, "log_probability").output_fn
        ScoreOutput('log_probability')
    """
    check_choice(check_instance(score, "score", str), "score", SCORES)
    if score == "logit":
        return resolve_method(method, model)
    if isinstance(method, str):
        return resolve_method(method, model, output_fn=ScoreOutput(score))
    if _is_name_kwargs(method):
        name, kwargs = method
        return resolve_method((name, {**kwargs, "output_fn": ScoreOutput(score, kwargs.get("output_fn"))}), model)
    explainer = resolve_method(method, model)
    if isinstance(explainer, FunctionAttribution) or not hasattr(explainer, "output_fn"):
        raise ValueError(
            f"score={score!r} is applied through the method's output_fn, but {explainer!r} calls the model itself;"
            " pass score='logit' or a method name"
        )
    explainer = copy.copy(explainer)
    explainer.output_fn = ScoreOutput(score, explainer.output_fn)
    return explainer


def _pair(value: Any, argument: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{argument} must be an (inputs, targets) pair of tensors, got {type(value).__name__}")
    return value[0], value[1]


def membership_inference(
    model: nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    statistics: Sequence[str] = ("loss", "gradient_norm", "gradient_variance"),
    method: MethodSpec = "gradient",
    batch_size: Optional[int] = None,
    fpr: float = 0.01,
    score: str = "probability",
) -> MembershipInferenceResult:
    """Threshold membership-inference attacks on ``model``: training samples ``members`` against held-out
    ``non_members``, each an ``(inputs, labels)`` pair; one attack per statistic (directions in :data:`DIRECTIONS`).

    Args:
        model: returns ``(batch, classes)`` logits.
        members, non_members: ``(inputs, labels)`` of known members and non-members.
        statistics: ``"loss"``, ``"gradient_norm"``, ``"gradient_variance"`` (see the module docstring).
        method: the explanation behind the gradient statistics: any spec :func:`resolve_method` takes.
        batch_size: samples per forward (default: all at once).
        fpr: the false-positive rate the true-positive rate is read at.
        score: what the explanation statistics differentiate: ``"probability"`` (the label's softmax probability,
            as Shokri et al. 2021; the default), ``"log_probability"`` or ``"logit"`` (see the module docstring).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
        >>> y = torch.tensor([0, 1] * 4)
        >>> result = membership_inference(model, (x[:4], y[:4]), (x[4:], y[4:]), ["loss"])
        >>> 0.0 <= result.auc("loss") <= 1.0
        True
    """
    names = _check_statistics(statistics)
    fpr = check_float(fpr, "fpr", minimum=0.0, maximum=1.0)
    score = check_choice(check_instance(score, "score", str), "score", SCORES)
    (xm, ym), (xn, yn) = _pair(members, "members"), _pair(non_members, "non_members")
    stats_m = membership_statistics(model, xm, ym, names, method, batch_size, score)
    stats_n = membership_statistics(model, xn, yn, names, method, batch_size, score)
    attacks = {n: threshold_attack(stats_m[n], stats_n[n], n, DIRECTIONS[n], fpr) for n in names}
    label = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
    return MembershipInferenceResult(attacks, stats_m, stats_n, str(label), score)


def attacks_from_statistics(
    member_statistics: Mapping[str, torch.Tensor],
    non_member_statistics: Mapping[str, torch.Tensor],
    fpr: float = 0.01,
) -> dict[str, ThresholdAttack]:
    """:func:`threshold_attack` for every statistic present in both mappings (the callback's gathered values).

    Example:
        >>> attacks_from_statistics({"loss": torch.tensor([0.1])}, {"loss": torch.tensor([0.9])})["loss"].auc
        1.0
    """
    return {
        n: threshold_attack(member_statistics[n], non_member_statistics[n], n, DIRECTIONS.get(n, "lower"), fpr)
        for n in member_statistics
        if n in non_member_statistics
    }

