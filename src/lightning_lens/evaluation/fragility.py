"""Fragility of explanations (Ghorbani, Abid & Zou, "Interpretation of Neural Networks is Fragile", AAAI 2019).

An iterative, L-infinity bounded attack looks for a perturbation ``x + d`` (``||d||_inf <= epsilon``, within the valid
input range) that keeps the predicted label and moves the explanation away from the original one. This is the
paper's *top-k attack*: it decreases the share of the (channel-summed, absolute) map that lies on the original top-k
features, ``D(x') = sum_{i in K} S_i(x') / sum_i S_i(x')``, by signed gradient steps ``x' <- x' - step * sign(dD/dx')``,
projected back onto the ball and the input range after every step. A step that changes an example's predicted label
is rejected for that example and retried at half the size. The perturbation with the lowest top-k intersection over
the steps is kept, as in the paper. The control is a random sign perturbation of the same size,
``x + epsilon * sign(u)``.

**Second derivatives.** ``dD/dx`` differentiates the explanation, and for a ReLU network the gradient is piecewise
constant (its derivative is zero almost everywhere), so the attack runs on a *surrogate*: a deep copy in which every
``nn.ReLU`` module is replaced by ``nn.Softplus(beta)`` (Ghorbani et al.; Dombrowski et al. 2019). ReLUs called as
functions (``F.relu``, ``torch.relu``) inside ``forward`` cannot be replaced: with those the attack's gradient may be
zero and the result says so (``zero_gradient_steps``). The scores are always measured with the method on the real
model (a private copy, never modified).

The attack differentiates the explanation itself: ``method`` is ``"gradient"`` or ``"gradient_x_input"`` (built in,
with ``create_graph=True``), or a function ``explain(model, inputs, target) -> maps`` that keeps the autograd graph
(it is called on the surrogate with inputs that require grad, and on the real model for the scores).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution.base import forward_logits
from lightning_lens.attribution.registry import canonical_name
from lightning_lens.utils import gradients_enabled, preserve_modes, resolve_target
from lightning_lens.utils.checks import check_float, check_int, check_tensor
from lightning_lens.utils.targets import Target

__all__ = ["FragilityResult", "explanation_fragility"]

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
_BUILT_IN = ("gradient", "gradient_x_input")


@dataclass
class FragilityResult:
    """Result of :func:`explanation_fragility`, per example and as means, with a verdict.

    Attributes:
        method: the method's name.
        epsilon: the L-infinity radius.
        top_k: how many features the top-k sets hold.
        topk_attack, topk_random: ``(B,)`` share of the original top-k features still in the top-k after the attack
            / after the random perturbation (1: unchanged).
        spearman_attack, spearman_random: ``(B,)`` Spearman rank correlation of the absolute maps.
        label_kept_attack, label_kept_random: ``(B,)`` whether the predicted label stayed (always true for the attack).
        linf: ``(B,)`` the L-infinity size of the attack's perturbation.
        accepted_steps: ``(B,)`` attack steps accepted per example (a rejected step would have changed the label).
        zero_gradient_steps: steps whose attack gradient was zero for every example (functional ReLUs?).
        perturbed: ``(B, ...)`` the attack's inputs.
        verdict: a :class:`~lightning_lens.sanity.report.Verdict`: ``"fails"`` (fragile) when the attack's mean top-k
            intersection is below ``fragile_below`` times the random control's, ``"passes"`` above ``robust_above``
            times it, else ``"inconclusive"``; its ``score`` is that ratio.
    """

    method: str
    epsilon: float
    top_k: int
    topk_attack: torch.Tensor
    topk_random: torch.Tensor
    spearman_attack: torch.Tensor
    spearman_random: torch.Tensor
    label_kept_attack: torch.Tensor
    label_kept_random: torch.Tensor
    linf: torch.Tensor
    accepted_steps: torch.Tensor
    zero_gradient_steps: int
    perturbed: torch.Tensor
    verdict: Any

    @property
    def verdicts(self) -> dict[str, Any]:
        """``{method: verdict}``, the shape of the other reports."""
        return {self.method: self.verdict}

    def means(self) -> dict[str, float]:
        """Mean of each per-example number (NaN entries left out)."""
        values = {"topk_attack": self.topk_attack, "topk_random": self.topk_random,
                  "spearman_attack": self.spearman_attack, "spearman_random": self.spearman_random,
                  "label_kept_attack": self.label_kept_attack.float(),
                  "label_kept_random": self.label_kept_random.float()}
        return {k: _nanmean(v) for k, v in values.items()}

    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: one row per perturbation (attack, random) with the mean scores."""
        m = self.means()
        columns = ["method", "perturbation", "epsilon", "top-k intersection", "spearman", "label kept", "verdict"]
        rows = [[self.method, "attack", self.epsilon, m["topk_attack"], m["spearman_attack"], m["label_kept_attack"],
                 self.verdict.outcome],
                [self.method, "random", self.epsilon, m["topk_random"], m["spearman_random"], m["label_kept_random"],
                 ""]]
        return columns, rows

    def summary(self) -> str:
        m = self.means()
        lines = [f"Explanation fragility (Ghorbani et al. 2019), {self.method}, epsilon {self.epsilon:g},"
                 f" top-{self.top_k}:",
                 f"  attack: top-k intersection {m['topk_attack']:.3f}, spearman {m['spearman_attack']:.3f}, label kept"
                 f" {m['label_kept_attack']:.2f}",
                 f"  random: top-k intersection {m['topk_random']:.3f}, spearman {m['spearman_random']:.3f}, label kept"
                 f" {m['label_kept_random']:.2f}",
                 f"  {self.verdict}"]
        if self.zero_gradient_steps:
            lines.append(f"  warning: the attack gradient was zero in {self.zero_gradient_steps} step(s); a model that"
                         " calls F.relu in forward keeps zero second derivatives (use nn.ReLU modules)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "epsilon": self.epsilon, "top_k": self.top_k, "means": self.means(),
                "zero_gradient_steps": self.zero_gradient_steps, "verdict": self.verdict.to_dict(),
                **{k: getattr(self, k).tolist() for k in ("topk_attack", "topk_random", "spearman_attack",
                                                           "spearman_random", "label_kept_attack", "label_kept_random",
                                                           "linf", "accepted_steps")}}


def _nanmean(t: torch.Tensor) -> float:
    t = t.double()
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def softplus_surrogate(model: nn.Module, beta: float) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``; and their count.

    Example:
        >>> net, n = softplus_surrogate(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), beta=10.0)
        >>> type(net[1]).__name__, n
        ('Softplus', 1)
    """
    surrogate = copy.deepcopy(model)
    count = 0
    for name, module in list(surrogate.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Softplus(beta=beta))
                count += 1
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate, count


def _aggregate(maps: torch.Tensor) -> torch.Tensor:
    """``(B, F)`` feature scores: ``sum_c |a_c|`` for ``(B, C, *spatial)`` maps, ``|a|`` otherwise."""
    maps = maps.abs()
    if maps.dim() >= 4:
        maps = maps.sum(dim=1)
    return maps.flatten(1)


def _differentiable_maps(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, maps)``: the ``"gradient"`` or ``"gradient_x_input"`` maps of the target scores with the graph kept,
    so the maps can be differentiated again (w.r.t. the input or the model's weights)."""
    leaf = x if x.requires_grad else x.detach().requires_grad_(True)
    logits = forward_logits(model, leaf)
    score = logits.gather(1, target.view(-1, 1)).sum()
    grad = torch.autograd.grad(score, leaf, create_graph=True)[0]
    return logits, grad * leaf if name == "gradient_x_input" else grad


def _built_in(name: str) -> ExplainFn:
    def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _differentiable_maps(model, x, target, name)[1]

    explain.__name__ = name
    return explain


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def explanation_fragility(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target = None,
    method: Union[str, ExplainFn] = "gradient",
    epsilon: float = 8 / 255,
    *,
    n_steps: int = 20,
    top_k: Union[int, float] = 0.1,
    step_size: Optional[float] = None,
    beta: float = 10.0,
    input_range: Optional[tuple[float, float]] = None,
    fragile_below: float = 0.75,
    robust_above: float = 0.9,
    seed: int = 0,
) -> FragilityResult:
    """Attack ``method``'s explanations of ``inputs`` within an L-infinity ball and compare with random noise.

    Cost: ``n_steps`` double-backward passes on the surrogate plus ``n_steps + 2`` explanations and forwards on the
    model (the best step is picked by the real top-k intersection), for the whole batch at once.

    Args:
        model: a classifier returning ``(batch, classes)`` logits; never modified (both copies are private).
        inputs: ``(B, ...)`` inputs.
        target: the class explained (int, ``B`` labels, ``None``: the prediction). The *predicted* label must stay.
        method: ``"gradient"``, ``"gradient_x_input"`` or an explain function keeping the graph (module docstring).
        epsilon: the L-infinity radius, in input units.
        n_steps: attack iterations.
        top_k: the size of the top-k set: a count, or a fraction in ``(0, 1)`` of the features (pixels of an image,
            summed over channels).
        step_size: the signed step (default ``2.5 * epsilon / n_steps``, as in PGD).
        beta: the softplus sharpness of the surrogate (larger: closer to ReLU, less smooth).
        input_range: ``(low, high)`` the valid inputs; default: the min and max of ``inputs``.
        fragile_below, robust_above: the verdict's thresholds on the ratio of mean top-k intersections.
        seed: seed of the private generator of the random control.

    Returns:
        A :class:`FragilityResult`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> result = explanation_fragility(net, torch.rand(4, 8), epsilon=0.05, n_steps=5, top_k=2)
        >>> bool(result.label_kept_attack.all()), result.topk_attack.shape
        (True, torch.Size([4]))
    """
    from lightning_lens.sanity.report import Verdict
    from lightning_lens.sanity.similarity import spearman

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    x0 = check_tensor(inputs, "inputs").detach()
    epsilon = check_float(epsilon, "epsilon", minimum=0.0, open_min=True)
    check_int(n_steps, "n_steps", minimum=1)
    step = (2.5 * epsilon / n_steps) if step_size is None else check_float(step_size, "step_size", minimum=0.0,
                                                                              open_min=True)
    beta = check_float(beta, "beta", minimum=0.0, open_min=True)
    check_int(seed, "seed")
    if isinstance(method, str):
        name = canonical_name(method)
        if name not in _BUILT_IN:
            raise ValueError(f"method must be one of {list(_BUILT_IN)} or an explain function (model, inputs, target)"
                             f" -> maps that keeps the autograd graph, got {method!r}")
        explain = _built_in(name)
    elif callable(method):
        explain, name = method, getattr(method, "__name__", "explain")
    else:
        raise TypeError(f"method must be a name or an explain function, got {type(method).__name__}")
    if input_range is None:
        low, high = float(x0.min()), float(x0.max())
    else:
        if not (isinstance(input_range, (tuple, list)) and len(input_range) == 2):
            raise TypeError(f"input_range must be a (low, high) pair or None, got {input_range!r}")
        low, high = float(input_range[0]), float(input_range[1])
        if not low < high:
            raise ValueError(f"input_range must have low < high, got {input_range!r}")

    real = copy.deepcopy(model)
    for p in real.parameters():
        p.requires_grad_(False)
    surrogate, _ = softplus_surrogate(model, beta)
    device = next(real.parameters()).device if next(real.parameters(), None) is not None else x0.device
    x0 = x0.to(device)
    if x0.is_inference():
        x0 = x0.clone()

    with torch.inference_mode(False), gradients_enabled(), preserve_modes(real, mode=False), \
            preserve_modes(surrogate, mode=False):
        x0 = x0.clone()
        with torch.no_grad():
            logits = forward_logits(real, x0)
        label = logits.argmax(dim=1)
        targets = resolve_target(target, logits)

        def real_scores(x: torch.Tensor) -> torch.Tensor:
            return _aggregate(explain(real, x.detach().clone(), targets).detach())

        original = real_scores(x0)
        features = original.shape[1]
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k <= 0:
            raise ValueError(f"top_k must be a positive count or a fraction in (0, 1), got {top_k!r}")
        k = min(features, max(1, round(top_k * features)) if isinstance(top_k, float) and top_k < 1 else int(top_k))
        mask = _topk_mask(original, k)

        def intersection(scores: torch.Tensor) -> torch.Tensor:
            return (_topk_mask(scores, k) & mask).sum(dim=1).double() / k

        x = x0.clone()
        best = x0.clone()
        best_topk = torch.ones(x0.shape[0], dtype=torch.float64, device=device)
        accepted = torch.zeros(x0.shape[0], dtype=torch.long)
        zero_steps = 0
        steps = torch.full((x0.shape[0],), step, dtype=x0.dtype, device=device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        for _ in range(n_steps):
            leaf = x.detach().requires_grad_(True)
            saliency = _aggregate(explain(surrogate, leaf, targets))
            objective = (saliency * mask).sum(dim=1) / saliency.sum(dim=1).clamp_min(1e-12)
            grad = torch.autograd.grad(objective.sum(), leaf, allow_unused=True)[0] \
                if objective.requires_grad else None  # an explanation that does not depend on the input
            if grad is None or not bool(grad.abs().amax() > 0):
                zero_steps += 1
                continue
            with torch.no_grad():
                candidate = x - steps.view(shape) * grad.sign()
                candidate = torch.minimum(torch.maximum(candidate, x0 - epsilon), x0 + epsilon).clamp(low, high)
                kept = forward_logits(real, candidate).argmax(dim=1) == label
                x = torch.where(kept.view(shape), candidate, x)
                # a rejected step is retried at half the size (else the same gradient is rejected again forever)
                steps = torch.where(kept, steps, steps / 2)
            accepted += kept.cpu().long()
            current = intersection(real_scores(x))
            better = current < best_topk
            best = torch.where(better.view(shape), x, best)
            best_topk = torch.where(better, current, best_topk)

        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, x0.shape, generator=generator).to(device=device, dtype=x0.dtype) * 2 - 1
        noisy = (x0 + epsilon * signs).clamp(low, high)
        with torch.no_grad():
            label_attack = forward_logits(real, best).argmax(dim=1) == label
            label_random = forward_logits(real, noisy).argmax(dim=1) == label
        attacked_scores, random_scores = real_scores(best), real_scores(noisy)

    topk_attack, topk_random = intersection(attacked_scores).float().cpu(), intersection(random_scores).float().cpu()
    spearman_attack = spearman(original, attacked_scores).float().cpu()
    spearman_random = spearman(original, random_scores).float().cpu()
    mean_attack, mean_random = _nanmean(topk_attack), _nanmean(topk_random)
    ratio = mean_attack / mean_random if mean_random > 0 else math.nan
    metric = "topk_attack/topk_random"
    if math.isnan(ratio):
        verdict = Verdict(name, "inconclusive", metric, mean_attack, math.nan, mean_random, ratio,
                          "the random perturbation already removed every top-k feature", 1)
    elif ratio < fragile_below:
        verdict = Verdict(name, "fails", metric, mean_attack, math.nan, mean_random, ratio,
                          f"the attack kept {mean_attack:.3f} of the top-{k} features, random noise of the same size"
                          f" {mean_random:.3f}: fragile", 1)
    elif ratio > robust_above:
        verdict = Verdict(name, "passes", metric, mean_attack, math.nan, mean_random, ratio,
                          f"the attack kept {mean_attack:.3f} of the top-{k} features, about as many as random noise"
                          f" ({mean_random:.3f})", 1)
    else:
        verdict = Verdict(name, "inconclusive", metric, mean_attack, math.nan, mean_random, ratio,
                          f"the attack kept {mean_attack:.3f} of the top-{k} features, random noise {mean_random:.3f}",
                          1)
    return FragilityResult(
        method=name, epsilon=epsilon, top_k=k, topk_attack=topk_attack, topk_random=topk_random,
        spearman_attack=spearman_attack, spearman_random=spearman_random, label_kept_attack=label_attack.cpu(),
        label_kept_random=label_random.cpu(), linf=(best - x0).flatten(1).abs().amax(dim=1).float().cpu(),
        accepted_steps=accepted, zero_gradient_steps=zero_steps, perturbed=best.detach().cpu(), verdict=verdict,
    )
