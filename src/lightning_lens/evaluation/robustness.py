"""Robustness of explanations: max-sensitivity (Yeh et al. 2019, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS).

``SENS_max(x) = max_{||d||_inf <= r} ||e(x + d) - e(x)|| / ||e(x)||``, estimated, as Captum's ``sensitivity_max``
and Quantus's ``MaxSensitivity`` do, by the largest change over a bounded number of uniform samples in the
L-infinity ball of radius ``r``. Low is robust; above 1 the explanation changes by more than its own size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lightning_lens.attribution.base import OutputFn
from lightning_lens.attribution.registry import MethodSpec, resolve_method
from lightning_lens.evaluation._common import model_device, resolve_targets
from lightning_lens.utils import gradients_enabled, preserve_modes
from lightning_lens.utils.checks import check_choice, check_differentiable_inputs, check_int, check_tensor
from lightning_lens.utils.targets import Target

__all__ = ["SensitivityResult", "max_sensitivity"]

#: What :func:`max_sensitivity` explains with: any :data:`~lightning_lens.attribution.MethodSpec` (a method object, a
#: registry name, a method class, or an explain function ``(model, inputs, target) -> maps``).
Explainer = MethodSpec
NORMS = ("fro", "inf")


@dataclass(frozen=True)
class SensitivityResult:
    """Per-example max-sensitivity.

    Attributes:
        scores: ``(B,)`` the largest (relative, if ``normalized``) change of the explanation over the samples; NaN
            where excluded.
        valid: ``(B,)`` bool, examples that were scored.
        n_zero_maps: examples excluded because their explanation is all zero (relative change undefined).
        radius: the L-infinity radius of the perturbations.
        n_samples: perturbations per example.
        norm: ``"fro"`` or ``"inf"``.
        normalized: whether changes are divided by the norm of the unperturbed explanation.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    n_zero_maps: int
    radius: float
    n_samples: int
    norm: str
    normalized: bool

    @property
    def value(self) -> float:
        """Mean over the scored examples (NaN when none)."""
        return float(self.scores[self.valid].mean()) if bool(self.valid.any()) else math.nan

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _explain_fn(explainer: Explainer, model: Optional[nn.Module]) -> tuple[
    Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], Optional[nn.Module], Optional[OutputFn]
]:
    """``(explain(inputs, target), model, output_fn)``: the method resolved for ``model`` by the registry, the model
    it explains (``model``, else the method's own) and the method's ``output_fn``."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        method = resolve_method(explainer, model)
    except TypeError as err:
        raise TypeError(f"explainer: {err}") from err
    model = model if model is not None else getattr(method, "model", None)
    return (lambda x, t: method.attribute(x, target=t)), model, getattr(method, "output_fn", None)


def _flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    v = v.reshape(v.shape[0], -1).double()
    return v.norm(dim=1) if norm == "fro" else v.abs().amax(dim=1)


def max_sensitivity(
    explainer: Explainer,
    inputs: torch.Tensor,
    target: Target = None,
    *,
    attributions: Optional[torch.Tensor] = None,
    model: Optional[nn.Module] = None,
    radius: float = 0.02,
    n_samples: int = 10,
    norm: str = "fro",
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    output_fn: Optional[OutputFn] = None,
) -> SensitivityResult:
    """Max-sensitivity of an explanation method (Yeh et al. 2019) at ``inputs``.

    Every perturbed input explains the same class as the clean one (``target``, or the prediction on the clean
    input when None). Perturbations are drawn from a private generator (the global RNG is untouched); the method runs
    under :func:`~lightning_lens.utils.gradients_enabled`, so this works inside ``torch.inference_mode``, and every
    module's train/eval mode is restored.

    Args:
        explainer: an attribution method (``Gradient(model)``), a registry name (with ``model``), or an explain
            function ``(model, inputs, target) -> attributions`` (it receives ``model``, which may be None).
        inputs: ``(B, ...)`` inputs.
        target: int, ``(B,)`` class indices, or None (the model's prediction; needs ``explainer.model`` or ``model``).
        attributions: the explanations of ``inputs`` if already computed (saves one call).
        model: the model, when ``explainer`` is a name or an explain function (needed when ``target`` is None).
        radius: half-width of the uniform noise per element, in input units (Captum's default 0.02).
        n_samples: perturbations per example (Captum 10, Quantus 200); the cost is ``n_samples`` explanations.
        norm: ``"fro"`` (L2 over all elements) or ``"inf"``.
        normalize: divide by the norm of the unperturbed explanation (as Captum and Quantus); all-zero explanations
            are then excluded and counted.
        seed: seed of the private noise generator.
        batch_size: the most perturbed inputs per call of the method (bounds memory; each method may chunk further).
        output_fn: maps the model's output to ``(B, classes)`` scores when the prediction is the target (default: the
            method's own ``output_fn``).

    Returns:
        A :class:`SensitivityResult` (CPU tensors).

    Example:
        >>> from lightning_lens.attribution import Gradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
        >>> r = max_sensitivity(Gradient(model), torch.rand(4, 8), target=0, n_samples=5)
        >>> r.value  # a linear model's gradient does not change
        0.0
    """
    explain, model, own_output_fn = _explain_fn(explainer, model)
    check_differentiable_inputs(inputs, "inputs")
    check_int(n_samples, "n_samples", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_choice(norm, "norm", NORMS)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"radius must be a positive number (input units), got {radius!r}")

    x = inputs.detach() if model is None else inputs.detach().to(model_device(model, inputs.device))
    b = x.shape[0]
    if model is not None:
        resolved: Optional[torch.Tensor] = resolve_targets(model, x, target, batch_size, output_fn or own_output_fn)
    elif target is None:
        resolved = None  # a model-free control (edge detector, random map): no class to hold fixed
    else:
        resolved = torch.as_tensor(target, device=x.device).long().expand(b).clone()

    generator = torch.Generator().manual_seed(int(seed))
    modes = preserve_modes(model) if model is not None else contextlib.nullcontext()
    with modes, gradients_enabled():
        base = attributions if attributions is not None else explain(x.clone(), resolved)
        base = check_tensor(base, "attributions").detach().to(x.device)
        if base.shape[0] != b:
            raise ValueError(f"attributions hold {base.shape[0]} rows for {b} inputs")
        worst = torch.zeros(b, dtype=torch.float64, device=x.device)
        rows = torch.arange(b, device=x.device).repeat_interleave(n_samples)
        for lo in range(0, b * n_samples, batch_size):
            idx = rows[lo : lo + batch_size]
            # one draw per perturbed row: the noise does not depend on how rows are chunked
            noise = torch.stack([torch.rand(x.shape[1:], generator=generator) for _ in range(idx.numel())])
            noise = (noise * 2 - 1) * float(radius)
            perturbed = x[idx].clone() + noise.to(device=x.device, dtype=x.dtype)
            out = explain(perturbed, None if resolved is None else resolved[idx])
            if not isinstance(out, torch.Tensor) or out.shape != (idx.numel(), *base.shape[1:]):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the explainer returned {shape} for perturbed inputs, expected"
                                 f" {(idx.numel(), *base.shape[1:])} like the unperturbed attributions")
            change = _flat_norm(out.detach() - base[idx], norm)
            worst.scatter_reduce_(0, idx, change, reduce="amax")
    scale = _flat_norm(base, norm)
    if normalize:
        valid = scale > 0
        scores = worst / scale.clamp_min(torch.finfo(torch.float64).tiny)
    else:
        valid = torch.ones(b, dtype=torch.bool, device=x.device)
        scores = worst
    scores = torch.where(valid, scores, torch.full_like(scores, math.nan))
    return SensitivityResult(
        scores=scores.float().cpu(),
        valid=valid.cpu(),
        n_zero_maps=int((~valid).sum()),
        radius=float(radius),
        n_samples=n_samples,
        norm=norm,
        normalized=normalize,
    )


