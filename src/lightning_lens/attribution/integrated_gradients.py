"""Integrated Gradients (Sundararajan, Taly and Yan, 2017)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union, overload

import numpy as np
import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, example_slices, resolve_batch_size
from lightning_lens.attribution._inputs import Inputs, ModelInputs
from lightning_lens.attribution.base import (
    Attribution,
    OutputFn,
    Target,
    WithDelta,
    check_inputs,
    gradients,
    target_scores,
)
from lightning_lens.attribution.layer import LayerSpec, layer_hook, layer_output
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_bool, check_choice, check_int
from lightning_lens.utils.targets import per_example_target

Rule = Literal["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
Baseline = Union[float, torch.Tensor, None, tuple, list, Mapping]


def _materialized(inputs: ModelInputs) -> ModelInputs:
    """``inputs`` with every leaf a contiguous tensor (baselines are broadcast views; the model may reshape with
    ``view`` or write into its inputs)."""
    return inputs.with_leaves([t.contiguous() for t in inputs.leaves])


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

    With ``layer=`` the attributions are with respect to that module's output, as Captum's
    ``LayerIntegratedGradients``: the model runs on the actual inputs while the layer's output is replaced by
    ``L(x') + a (L(x) - L(x'))``, with the baseline ``x'`` given in input space (token ids 0 by default) and mapped
    through the model; the result is ``(L(x) - L(x')) * integral``, shaped like the layer's output.

    Args:
        model: the classifier.
        n_steps: gradient evaluations along the path (default 50).
        method: the integration rule: ``"gausslegendre"`` (default, as Captum; exact for polynomials of degree
            ``< 2 n_steps``), ``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"`` or ``"riemann_middle"``.
        baseline: ``x'``: ``None`` or a float for a constant baseline (default 0), or a tensor broadcastable to the
            inputs (one example's shape or the whole batch's). For tuple or dict inputs, a float (every baselined
            tensor) or a tuple/dict mirroring them (a ``None`` entry keeps the input's values, a missing key takes the
            default). By default the floating-point tensors are zero and the integer ones keep their values; with
            ``layer=`` every input tensor is zero (ids 0, masks too; ``forward_kwargs`` are never baselined).
        batch_size: most rows per forward pass; ``None`` picks whole steps of the batch within a budget of ``2**17``
            input elements per pass. Results do not depend on it beyond float rounding.
        layer: a module of the model or its dotted name (see above).
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see :class:`Gradient`).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> attr, delta = IntegratedGradients(model).attribute(x, target=0, return_convergence_delta=True)
        >>> torch.allclose(attr, x * model.weight[0], atol=1e-6), bool(delta.abs().max() < 1e-5)
        (True, True)
    """

    name = "integrated_gradients"
    supports_structured = True
    supports_layer = True

    def __init__(
        self,
        model: nn.Module,
        n_steps: int = 50,
        method: Rule = "gausslegendre",
        baseline: Baseline = None,
        batch_size: Optional[int] = None,
        *,
        layer: Optional[LayerSpec] = None,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self._set_layer(layer)
        integration_points(n_steps, method)  # validates both
        self.n_steps = n_steps
        self.method = method
        self.baseline = self._check_baseline_type(baseline)
        self.batch_size = check_batch_size(batch_size)

    @staticmethod
    def _check_baseline_type(baseline: Baseline) -> Baseline:
        allowed = (int, float, torch.Tensor, tuple, list, Mapping)
        if isinstance(baseline, bool) or (baseline is not None and not isinstance(baseline, allowed)):
            raise TypeError(
                f"baseline must be None, a float, a tensor, or a tuple/dict mirroring the inputs, got"
                f" {type(baseline).__name__}"
            )
        return baseline

    @staticmethod
    def _baseline_for(baseline: Baseline, x: torch.Tensor) -> torch.Tensor:
        """The baseline as a tensor of ``x``'s shape: a broadcast view (read-only, no copy of the batch's size)."""
        if baseline is None:
            return torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
        if not isinstance(baseline, torch.Tensor):
            if not isinstance(baseline, (int, float)) or isinstance(baseline, bool):
                raise TypeError(f"a baseline entry must be None, a float or a tensor, got {type(baseline).__name__}")
            value = float(baseline) if x.is_floating_point() else int(baseline)
            return torch.full((), value, dtype=x.dtype, device=x.device).expand(x.shape)
        if x.is_floating_point() and not baseline.is_floating_point():
            raise TypeError(f"baseline must be a floating-point tensor, got dtype {baseline.dtype}")
        try:
            return torch.broadcast_to(baseline.detach().to(device=x.device, dtype=x.dtype), x.shape)
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
    def attribute(self, inputs: Inputs, target: Target = ..., *, abs: bool = ...,
                  forward_kwargs: Optional[dict[str, Any]] = ...,
                  baseline: Baseline = ..., n_steps: Optional[int] = ..., method: Optional[Rule] = ...,
                  batch_size: Optional[int] = ..., return_convergence_delta: Literal[False] = ...) -> Any: ...

    @overload
    def attribute(self, inputs: Inputs, target: Target = ..., *, abs: bool = ...,
                  forward_kwargs: Optional[dict[str, Any]] = ...,
                  baseline: Baseline = ..., n_steps: Optional[int] = ..., method: Optional[Rule] = ...,
                  batch_size: Optional[int] = ..., return_convergence_delta: Literal[True]
                  ) -> tuple[Any, torch.Tensor]: ...

    def attribute(  # type: ignore[override]
        self,
        inputs: Inputs,
        target: Target = None,
        *,
        abs: bool = False,
        forward_kwargs: Optional[dict[str, Any]] = None,
        baseline: Baseline = None,
        n_steps: Optional[int] = None,
        method: Optional[Rule] = None,
        batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
    ) -> Any:
        """Integrated-Gradients attributions shaped like ``inputs``; keyword options override the constructor's.

        Args:
            inputs: a floating-point batch ``(B, ...)``, or a tuple or dict of tensors (see
                :meth:`Attribution.attribute <lightning_lens.attribution.base.Attribution.attribute>`).
            target: an int, ``B`` class indices, or ``None`` for the classes predicted on ``inputs``.
            abs: return absolute values (then completeness no longer holds, so no delta can be returned).
            forward_kwargs: more keyword arguments for the model, never attributed nor baselined.
            baseline, n_steps, method, batch_size: as in the constructor.
            return_convergence_delta: also return, per example, ``sum(attributions) - (S_c(x) - S_c(x'))`` (with
                ``layer=``, ``S_c(x')`` is the score with the layer's output replaced by its baseline value).
        """
        if abs is True and return_convergence_delta is True:
            raise ValueError("return_convergence_delta=True needs signed attributions: drop abs=True")
        return super().attribute(
            inputs, target, abs=abs, forward_kwargs=forward_kwargs, baseline=baseline, n_steps=n_steps,
            method=method, batch_size=batch_size, return_convergence_delta=return_convergence_delta,
        )

    def _attribute(  # type: ignore[override]
        self,
        inputs: ModelInputs,
        target: Target,
        *,
        n_steps: int,
        method: str,
        baseline: Baseline,
        batch_size: Optional[int],
        return_convergence_delta: bool,
    ) -> Any:
        alphas, weights = integration_points(n_steps, method)
        batch = inputs.batch_size
        ref_inputs = inputs.with_leaves(self._baselines(baseline, inputs))  # broadcast views: no whole-batch copy
        rows = resolve_batch_size(batch_size, batch, self._elements_per_row(inputs) if batch_size is None else 1)
        given = None if target is None else per_example_target(target, batch, inputs.leaves[0].device)
        # Slice by slice of the examples (the whole batch when a block holds whole path points of it): the slice's
        # start and end points, x - x', target scores and path blocks, so that nothing but the result grows with the
        # batch (issue 19). Within a slice the path points are visited in order, as for the whole batch.
        results: Optional[list[torch.Tensor]] = None
        deltas = []
        for b0, b1 in example_slices(batch, rows):
            part, ref_part = inputs.rows(b0, b1), ref_inputs.rows(b0, b1)  # the model gets ref_part materialized
            logits: Optional[torch.Tensor] = None
            with torch.no_grad():
                if self._layer is None:
                    xs, refs = part.attributed, ref_part.attributed
                    if return_convergence_delta or target is None:
                        logits = self.logits(part.cloned())
                else:  # the path runs between the layer's outputs on the baseline and on the input (Captum's LayerIG)
                    parts: list[torch.Tensor] = []
                    xs = [layer_output(lambda: parts.append(self.logits(part.cloned())), *self._layer)]
                    refs = [layer_output(lambda: self.logits(_materialized(ref_part).cloned()), *self._layer)]
                    logits = parts[0]
            if logits is not None:
                resolved = resolve_target(None if given is None else given[b0:b1], logits)
            else:  # no forward needed here: the first path block checks the classes against the model's output
                resolved = given[b0:b1]  # type: ignore[index]
            if results is None:
                results = [torch.zeros((batch, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in xs]
            totals = [r[b0:b1] for r in results]
            # a slice of a split batch runs one path point per block (as the whole batch's slices always have)
            self._integrate(part, xs, refs, resolved, alphas, weights, rows if rows >= batch else b1 - b0, totals)
            if return_convergence_delta:
                assert logits is not None
                with torch.no_grad():
                    if self._layer is None:
                        ref_logits = self.logits(_materialized(ref_part).cloned())
                    else:  # the path's start: the input with the layer's output replaced by its baseline value
                        ref_logits = self._with_layer_value(part, refs[0])
                    deltas.append(sum(t.reshape(b1 - b0, -1).sum(dim=1) for t in totals)
                                  - (target_scores(logits, resolved) - target_scores(ref_logits, resolved)))
            del xs, refs, totals
        assert results is not None
        result = results if self._layer is None else results[0]
        if not return_convergence_delta:
            return result
        return WithDelta(result, deltas[0] if len(deltas) == 1 else torch.cat(deltas))

    def _with_layer_value(self, inputs: ModelInputs, value: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` with the layer's output replaced by ``value``."""
        assert self._layer is not None
        with layer_hook(*self._layer, value, differentiable=False):
            return self.logits(inputs.cloned())

    def _baselines(self, baseline: Baseline, inputs: ModelInputs) -> list[torch.Tensor]:
        """The baseline of every leaf of ``inputs``. By default the attributed (floating-point) leaves are zero and
        the others keep their values; with ``layer=`` every leaf is zero by default (token id 0)."""
        zeroed = [a or self._layer is not None for a in inputs.is_attributed]
        keep = object()  # this leaf keeps the input's values
        if baseline is None or isinstance(baseline, (int, float)):
            entries: list[Any] = [baseline if z else keep for z in zeroed]
        elif isinstance(baseline, torch.Tensor):
            if inputs.structure != "tensor":
                raise TypeError(
                    "baseline: a single tensor is a baseline for a single tensor of inputs; for tuple or dict inputs"
                    " pass a tuple or dict mirroring them (None entries keep the input's values)"
                )
            entries = [baseline]
        else:  # a structure mirroring the inputs: None keeps the input's values, a missing key takes the default
            entries = [
                (None if z else keep) if e is ... else keep if e is None else e
                for e, z in zip(inputs.unpack(baseline, "baseline"), zeroed)
            ]
        out = []
        for key, leaf, entry in zip(inputs.keys, inputs.leaves, entries):
            if entry is keep:
                out.append(leaf)
                continue
            try:
                out.append(self._baseline_for(entry, leaf))
            except (TypeError, ValueError) as err:
                raise type(err)(f"baseline[{key!r}]: {err}" if inputs.structure != "tensor" else str(err)) from None
        return out

    def _integrate(
        self,
        inputs: ModelInputs,
        xs: list[torch.Tensor],
        refs: list[torch.Tensor],
        target: torch.Tensor,
        alphas: list[float],
        weights: list[float],
        rows: int,
        totals: list[torch.Tensor],
    ) -> None:
        """Add ``(x - x') * sum_s w_s dS/dx(x' + a_s (x - x'))`` into ``totals`` for the examples of ``inputs`` (one
        slice), ``rows // width`` path points per block (``rows >= width``)."""
        width = inputs.batch_size
        diffs = [x - r for x, r in zip(xs, refs)]
        all_alphas = torch.tensor(alphas, dtype=xs[0].dtype, device=xs[0].device)
        all_weights = torch.tensor(weights, dtype=xs[0].dtype, device=xs[0].device)
        repeated: dict[int, torch.Tensor] = {}  # the block's target rows, built once per number of path points
        for blk in blocks(len(alphas), width, rows):
            k = blk.s1 - blk.s0
            # the k path points of the slice in one op per tensor: ref + alpha * (x - ref)
            paths = [
                torch.addcmul(r, all_alphas[blk.s0 : blk.s1].view(-1, 1, *([1] * (r.dim() - 1))), d).view(
                    k * width, *r.shape[1:])
                for r, d in zip(refs, diffs)
            ]
            if k not in repeated:
                repeated[k] = target.repeat(k)
            if self._layer is None:
                grads = gradients(self.model, inputs.repeat(k, attributed=paths), repeated[k],
                                  output_fn=self.output_fn, owned=True).grads
            else:
                grads = [gradients(self.model, inputs.repeat(k), repeated[k], output_fn=self.output_fn,
                                   layer=self._layer, layer_value=paths[0]).grads]
            del paths
            for total, g in zip(totals, grads):
                if k == 1:
                    total.add_(g, alpha=weights[blk.s0])
                else:  # the weighted sum over the block's path points, one matrix-vector product
                    total.add_((all_weights[blk.s0 : blk.s1] @ g.reshape(k, -1)).view(width, *g.shape[1:]))
            del grads
        for total, d in zip(totals, diffs):
            total.mul_(d)

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
        if self._layer is not None:
            raise ValueError("convergence_delta takes input attributions; for layer= use"
                             " attribute(..., return_convergence_delta=True)")
        inputs = check_inputs(inputs)
        if not isinstance(attributions, torch.Tensor) or attributions.shape != inputs.shape:
            raise ValueError(
                f"attributions must be a tensor of the inputs' shape {tuple(inputs.shape)}, got"
                f" {tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions)}"
            )
        base = self.baseline if baseline is None else self._check_baseline_type(baseline)
        with self.explaining(), torch.no_grad():
            batch = ModelInputs.from_user(inputs)
            logits = self.logits(batch.cloned())
            resolved = resolve_target(target, logits)
            ref_logits = self.logits(_materialized(batch.with_leaves(self._baselines(base, batch))))
            sums = attributions.detach().to(batch.leaves[0]).reshape(batch.batch_size, -1).sum(dim=1)
            return sums - (target_scores(logits, resolved) - target_scores(ref_logits, resolved))
