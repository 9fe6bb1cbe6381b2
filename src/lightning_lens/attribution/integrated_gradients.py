"""Integrated Gradients (Sundararajan, Taly and Yan, 2017)."""

from __future__ import annotations

import functools
from typing import Literal, Optional, Union, overload

import numpy as np
import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, logits_in_blocks, resolve_batch_size
from lightning_lens.attribution.base import (
    Attribution,
    Target,
    check_inputs,
    forward_logits,
    input_gradients,
    target_scores,
)
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_bool, check_choice, check_int
from lightning_lens.utils.targets import per_example_target

Rule = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
Baseline = Union[float, torch.Tensor, None]


@functools.lru_cache(maxsize=32)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gauss-Legendre nodes and weights on [-1, 1] by Golub-Welsch (eigen-decomposition of the Jacobi matrix).

    numpy's ``leggauss`` takes seconds for a few hundred points; this is milliseconds and agrees to ~1e-15.
    """
    from scipy.linalg import eigh_tridiagonal  # imported on first use: scipy.linalg is slow to import

    k = np.arange(1, n)
    nodes, vectors = eigh_tridiagonal(np.zeros(n), k / np.sqrt(4.0 * k * k - 1.0))
    return tuple(nodes.tolist()), tuple((2.0 * vectors[0] ** 2).tolist())


def integration_points(n_steps: int, method: str) -> tuple[list[float], list[float]]:
    """Points ``alpha`` in [0, 1] and weights of the rule approximating the integral over [0, 1] with ``n_steps``.

    Example:
        >>> integration_points(2, "riemann_trapezoid")
        ([0.0, 1.0], [0.5, 0.5])
    """
    check_choice(method, "method", RULES)
    check_int(n_steps, "n_steps", minimum=1)
    if method == "gausslegendre":
        nodes, weights = _gauss_legendre(n_steps)
        return [(a + 1) / 2 for a in nodes], [w / 2 for w in weights]
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("n_steps must be >= 2 for method='riemann_trapezoid' (it evaluates both end points)")
        alphas = np.linspace(0.0, 1.0, n_steps)
        weights = np.full(n_steps, 1.0 / (n_steps - 1))
        weights[[0, -1]] /= 2
        return alphas.tolist(), weights.tolist()
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return ((np.arange(n_steps) + offset) / n_steps).tolist(), [1.0 / n_steps] * n_steps


class IntegratedGradients(Attribution):
    """Integrated Gradients: ``(x - x') * integral_0^1 dS_c/dx(x' + a (x - x')) da``.

    Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks", ICML 2017. The path integral is
    approximated by ``n_steps`` gradient evaluations with the chosen rule; the attributions of an example sum to
    ``S_c(x) - S_c(x')`` up to that approximation (completeness), which :meth:`convergence_delta` measures.
    The target class is resolved once, on the actual input.

    Args:
        model: the classifier.
        n_steps: gradient evaluations along the path (default 50).
        method: the integration rule: ``"gausslegendre"`` (default, as Captum; exact for polynomials of degree
            ``< 2 n_steps``), ``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"`` or ``"riemann_middle"``.
        baseline: ``x'``: ``None`` or a float for a constant baseline (default 0), or a tensor broadcastable to the
            inputs (one example's shape or the whole batch's).
        batch_size: most rows per forward pass; ``None`` picks whole steps of the batch within a budget of ``2**16``
            input elements per pass. Results do not depend on it beyond float rounding.
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> attr, delta = IntegratedGradients(model).attribute(x, target=0, return_convergence_delta=True)
        >>> torch.allclose(attr, x * model.weight[0], atol=1e-6), bool(delta.abs().max() < 1e-5)
        (True, True)
    """

    name = "integrated_gradients"

    def __init__(
        self,
        model: nn.Module,
        n_steps: int = 50,
        method: Rule = "gausslegendre",
        baseline: Baseline = None,
        batch_size: Optional[int] = None,
        *,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode)
        integration_points(n_steps, method)  # validates both
        self.n_steps = n_steps
        self.method = method
        self.baseline = self._check_baseline_type(baseline)
        self.batch_size = check_batch_size(batch_size)

    @staticmethod
    def _check_baseline_type(baseline: Baseline) -> Baseline:
        if isinstance(baseline, bool) or (baseline is not None and not isinstance(baseline, (int, float, torch.Tensor))):
            raise TypeError(f"baseline must be None, a float or a tensor, got {type(baseline).__name__}")
        return baseline

    @staticmethod
    def _baseline_for(baseline: Baseline, x: torch.Tensor) -> torch.Tensor:
        """The baseline as a tensor of ``x``'s shape."""
        if baseline is None:
            return torch.zeros_like(x)
        if not isinstance(baseline, torch.Tensor):
            return torch.full_like(x, float(baseline))
        if not baseline.is_floating_point():
            raise TypeError(f"baseline must be a floating-point tensor, got dtype {baseline.dtype}")
        try:
            return torch.broadcast_to(baseline.detach().to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape {tuple(x.shape)};"
                " pass one example's shape or the batch's shape"
            ) from None

    call_options = ("n_steps", "method", "baseline", "batch_size", "return_convergence_delta")
    #: a per-call option only (the constructor has none): also return the completeness error
    return_convergence_delta: bool = False

    def _check_option(self, key: str, value: object) -> object:
        if key == "n_steps":
            return check_int(value, "n_steps", minimum=1)
        if key == "method":
            return check_choice(value, "method", RULES)
        if key == "baseline":
            return self._check_baseline_type(value)  # type: ignore[arg-type]
        if key == "batch_size":
            return check_batch_size(value)  # type: ignore[arg-type]
        return check_bool(value, "return_convergence_delta")

    @overload
    def attribute(self, inputs: torch.Tensor, target: Target = ..., *, abs: bool = ...,
                  baseline: Baseline = ..., n_steps: Optional[int] = ..., method: Optional[Rule] = ...,
                  batch_size: Optional[int] = ..., return_convergence_delta: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def attribute(self, inputs: torch.Tensor, target: Target = ..., *, abs: bool = ...,
                  baseline: Baseline = ..., n_steps: Optional[int] = ..., method: Optional[Rule] = ...,
                  batch_size: Optional[int] = ..., return_convergence_delta: Literal[True]
                  ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        baseline: Baseline = None,
        n_steps: Optional[int] = None,
        method: Optional[Rule] = None,
        batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Integrated-Gradients attributions shaped like ``inputs``; keyword options override the constructor's.

        Args:
            inputs: a floating-point batch ``(B, ...)``.
            target: an int, ``B`` class indices, or ``None`` for the classes predicted on ``inputs``.
            abs: return absolute values (then completeness no longer holds, so no delta can be returned).
            baseline, n_steps, method, batch_size: as in the constructor.
            return_convergence_delta: also return, per example, ``sum(attributions) - (S_c(x) - S_c(x'))``.
        """
        if abs is True and return_convergence_delta is True:
            raise ValueError("return_convergence_delta=True needs signed attributions: drop abs=True")
        return super().attribute(
            inputs, target, abs=abs, baseline=baseline, n_steps=n_steps, method=method, batch_size=batch_size,
            return_convergence_delta=return_convergence_delta,
        )

    def _attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target,
        *,
        n_steps: int,
        method: str,
        baseline: Baseline,
        batch_size: Optional[int],
        return_convergence_delta: bool,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        alphas, weights = integration_points(n_steps, method)
        x = inputs.detach()
        ref = self._baseline_for(baseline, x)
        if return_convergence_delta or target is None:
            with torch.no_grad():
                logits = logits_in_blocks(self.model, x, resolve_batch_size(batch_size, x.shape[0], x[0].numel()))
                resolved = resolve_target(target, logits)
        else:  # no forward needed here: the first path block checks the classes against the model's output
            resolved = per_example_target(target, x.shape[0], x.device)
        attr = self._integrate(x, ref, resolved, alphas, weights, batch_size)
        if not return_convergence_delta:
            return attr
        with torch.no_grad():
            delta = self._delta(attr, target_scores(logits, resolved), ref, resolved)
        return attr, delta

    def _integrate(
        self,
        x: torch.Tensor,
        ref: torch.Tensor,
        target: torch.Tensor,
        alphas: list[float],
        weights: list[float],
        batch_size: Optional[int],
    ) -> torch.Tensor:
        batch, shape = x.shape[0], x.shape[1:]
        diff = x - ref
        total = torch.zeros_like(x)
        rows = resolve_batch_size(batch_size, batch, x[0].numel())
        all_alphas = torch.tensor(alphas, dtype=x.dtype, device=x.device).view(-1, 1, *([1] * len(shape)))
        all_weights = torch.tensor(weights, dtype=x.dtype, device=x.device)
        repeated: dict[tuple[int, int, int], torch.Tensor] = {}  # the block's target rows, built once per shape
        for blk in blocks(len(alphas), batch, rows):
            k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
            # the k path points of the block's examples in one op: ref + alpha * (x - ref)
            path = torch.addcmul(ref[blk.b0 : blk.b1], all_alphas[blk.s0 : blk.s1], diff[blk.b0 : blk.b1])
            key = (blk.b0, blk.b1, k)
            if key not in repeated:
                repeated[key] = target[blk.b0 : blk.b1].repeat(k)
            grads, _, _ = input_gradients(self.model, path.view(k * width, *shape), repeated[key], owned=True)
            part = total[blk.b0 : blk.b1]
            if k == 1:
                part.add_(grads, alpha=weights[blk.s0])
            else:  # the weighted sum over the block's path points, one matrix-vector product
                part.add_((all_weights[blk.s0 : blk.s1] @ grads.view(k, -1)).view(width, *shape))
        return total.mul_(diff)

    def _delta(
        self, attr: torch.Tensor, input_scores: torch.Tensor, ref: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        ref_scores = target_scores(forward_logits(self.model, ref), target)
        return attr.reshape(attr.shape[0], -1).sum(dim=1) - (input_scores - ref_scores)

    def convergence_delta(
        self,
        attributions: torch.Tensor,
        inputs: torch.Tensor,
        target: Target = None,
        baseline: Baseline = None,
    ) -> torch.Tensor:
        """Completeness error per example: ``sum(attributions) - (S_c(inputs) - S_c(baseline))``, shape ``(B,)``.

        Args:
            attributions: signed attributions of ``inputs`` (from :meth:`attribute`).
            inputs: the explained batch.
            target: the target used for the attributions (``None`` = predicted classes).
            baseline: the baseline used (default: the constructor's).
        """
        inputs = check_inputs(inputs)
        if not isinstance(attributions, torch.Tensor) or attributions.shape != inputs.shape:
            raise ValueError(
                f"attributions must be a tensor of the inputs' shape {tuple(inputs.shape)}, got"
                f" {tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions)}"
            )
        base = self.baseline if baseline is None else self._check_baseline_type(baseline)
        with self.explaining(), torch.no_grad():
            x = inputs.detach().clone()
            logits = forward_logits(self.model, x)
            resolved = resolve_target(target, logits)
            return self._delta(attributions.detach().to(x), target_scores(logits, resolved),
                               self._baseline_for(base, x), resolved)
