"""Faithfulness by perturbation: deletion and insertion curves (Petsiuk et al. 2018, "RISE", BMVC).

Features are removed from (deletion) or inserted into (insertion) an image in the order an attribution ranks them,
a fixed share per step, and the model's score for the explained class is read after every step. A faithful map
makes the deletion curve fall early (low area under the curve) and the insertion curve rise early (high area). The
same curves for a random ordering are the control: a map is only informative about the model where it beats random.

Pixels are the features of image inputs ``(B, C, H, W)``: all channels of a pixel go together, ranked by the
attribution pooled over channels. For other input shapes every element is a feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution._batching import default_rows
from lightning_lens.attribution.base import OutputFn, forward_logits
from lightning_lens.evaluation._common import evaluating, feature_map, model_device, resolve_targets
from lightning_lens.utils.checks import check_bool, check_choice, check_finite, check_int, check_tensor
from lightning_lens.utils.targets import Target

__all__ = [
    "PerturbationCurve",
    "Substrate",
    "deletion_curve",
    "gaussian_blur",
    "insertion_curve",
    "perturbation_curve",
    "substrate_like",
]

#: What replaces a removed feature: ``"zeros"``, ``"blur"`` (:func:`gaussian_blur` with RISE's kernel), ``"mean"``
#: (each image's per-channel mean), a tensor broadcastable to the inputs, or a callable ``inputs -> tensor``.
Substrate = Union[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
SUBSTRATES = ("zeros", "blur", "mean")
MODES = ("deletion", "insertion")
DEFAULT_STEPS = 32
SCORES = ("probability", "logit")


def gaussian_blur(inputs: torch.Tensor, sigma: float = 5.0, kernel_size: int = 11) -> torch.Tensor:
    """Blur every channel of ``(B, C, H, W)`` images with a normalized Gaussian kernel (replicate padding).

    The defaults (11 x 11, sigma 5) are the insertion substrate of the RISE evaluation code.

    Example:
        >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0
        >>> y = gaussian_blur(x, sigma=1.0, kernel_size=5)
        >>> round(float(y.sum()), 4), bool(y[0, 0, 4, 4] < 1)
        (1.0, True)
    """
    check_tensor(inputs, "inputs")
    if inputs.dim() != 4:
        raise ValueError(f"gaussian_blur needs images of shape (B, C, H, W), got {tuple(inputs.shape)}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    half = kernel_size // 2
    grid = torch.arange(kernel_size, dtype=inputs.dtype, device=inputs.device) - half
    g = torch.exp(-(grid**2) / (2.0 * float(sigma) ** 2))
    g = g / g.sum()
    c = inputs.shape[1]
    x = inputs.detach()
    # separable: one horizontal and one vertical depthwise pass
    x = F.pad(x, (half, half, 0, 0), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    x = F.pad(x, (0, 0, half, half), mode="replicate")
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def substrate_like(inputs: torch.Tensor, substrate: Substrate, argument: str = "substrate") -> torch.Tensor:
    """The substrate values for ``inputs``, a tensor of the inputs' shape."""
    if isinstance(substrate, str):
        check_choice(substrate, argument, SUBSTRATES)
        if substrate == "zeros":
            return torch.zeros_like(inputs)
        if substrate == "blur":
            if inputs.dim() != 4:
                raise ValueError(f"{argument}='blur' needs image inputs (B, C, H, W), got {tuple(inputs.shape)}")
            return gaussian_blur(inputs)
        dims = tuple(range(2, inputs.dim())) if inputs.dim() == 4 else tuple(range(1, inputs.dim()))
        return inputs.mean(dim=dims, keepdim=True).expand_as(inputs).clone()
    if callable(substrate) and not isinstance(substrate, torch.Tensor):
        with torch.no_grad():
            out = substrate(inputs)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(inputs.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{argument}(inputs) must return a tensor of the inputs' shape {tuple(inputs.shape)},"
                             f" got {shape}")
        return out.detach().to(inputs.dtype)
    if isinstance(substrate, torch.Tensor):
        try:
            return torch.broadcast_to(substrate.detach().to(inputs.device, inputs.dtype), inputs.shape).clone()
        except RuntimeError as err:
            raise ValueError(
                f"{argument} of shape {tuple(substrate.shape)} does not broadcast to the inputs' shape"
                f" {tuple(inputs.shape)}; a per-channel value needs shape (C, 1, 1)"
            ) from err
    raise TypeError(
        f"{argument} must be one of {SUBSTRATES}, a tensor or a callable, got {type(substrate).__name__}"
    )


def _substrate_name(substrate: Substrate) -> str:
    if isinstance(substrate, str):
        return substrate
    return "tensor" if isinstance(substrate, torch.Tensor) else getattr(substrate, "__name__", "callable")


@dataclass(frozen=True)
class PerturbationCurve:
    """Deletion or insertion curves of a batch, for the attribution's ordering and (optionally) a random one.

    Attributes:
        mode: ``"deletion"`` or ``"insertion"``.
        fractions: ``(K + 1,)`` share of features removed/inserted after each step, from 0 to 1.
        scores: ``(B, K + 1)`` the target class score after each step, attribution ordering.
        auc: ``(B,)`` trapezoid area under each curve over ``fractions``.
        random_scores: ``(B, K + 1)`` the same for a random ordering, or None.
        random_auc: ``(B,)`` or None.
        target: ``(B,)`` the explained classes.
        score: ``"probability"`` (softmax) or ``"logit"``.
        substrate: name of the substrate.
    """

    mode: str
    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    random_scores: Optional[torch.Tensor]
    random_auc: Optional[torch.Tensor]
    target: torch.Tensor
    score: str
    substrate: str

    @property
    def mean_auc(self) -> float:
        """Mean area under the curve over the batch (deletion: lower is better; insertion: higher is better)."""
        return float(self.auc.mean())

    @property
    def mean_random_auc(self) -> Optional[float]:
        """Mean area of the random-ordering control, or None when it was not computed."""
        return None if self.random_auc is None else float(self.random_auc.mean())

    @property
    def mean_curve(self) -> torch.Tensor:
        """``(K + 1,)`` the batch's mean curve."""
        return self.scores.mean(0)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _descending_ranks(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rank of every feature (0 = first to go) by descending value; ties broken at random, not by position."""
    b, d = values.shape
    shuffle = torch.rand(b, d, generator=generator).argsort(dim=1).to(values.device)
    shuffled = values.gather(1, shuffle)
    order = shuffle.gather(1, shuffled.argsort(dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d, device=values.device).expand(b, d))
    return ranks


def _curve_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    substrate: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    target: torch.Tensor,
    insertion: bool,
    score: str,
    batch_size: int,
    output_fn: Optional[OutputFn] = None,
) -> torch.Tensor:
    """Scores ``(B, K + 1)``: row ``b`` after the first ``counts[k]`` ranked features were removed (or inserted)."""
    b = inputs.shape[0]
    n_points = counts.numel()
    d = ranks.shape[1]
    # (B, channels-per-feature, features): image channels move with their pixel
    x = inputs.reshape(b, inputs.shape[1] if inputs.dim() == 4 else 1, d)
    base = substrate.reshape(x.shape)
    start, end = (base, x) if insertion else (x, base)
    out = torch.empty(b * n_points, device=inputs.device, dtype=torch.float32)
    for lo in range(0, b * n_points, batch_size):
        pairs = torch.arange(lo, min(lo + batch_size, b * n_points), device=inputs.device)
        rows, steps = pairs // n_points, pairs % n_points
        changed = (ranks[rows] < counts[steps].unsqueeze(1)).unsqueeze(1)
        perturbed = torch.where(changed, end[rows], start[rows]).reshape(-1, *inputs.shape[1:])
        logits = forward_logits(model, perturbed, output_fn)
        if score == "probability":
            logits = logits.float().softmax(dim=1)
        out[lo : lo + pairs.numel()] = logits.gather(1, target[rows].view(-1, 1)).squeeze(1).float()
    return out.view(b, n_points)


def perturbation_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: Target = None,
    *,
    mode: str = "deletion",
    n_steps: Optional[int] = None,
    step_fraction: Optional[float] = None,
    substrate: Optional[Substrate] = None,
    score: str = "probability",
    pooling: str = "sum",
    random_control: bool = True,
    seed: int = 0,
    batch_size: Optional[int] = None,
    output_fn: Optional[OutputFn] = None,
) -> PerturbationCurve:
    """Deletion or insertion curves (Petsiuk et al. 2018) of ``attributions`` for ``model`` on ``inputs``.

    Args:
        model: classifier returning ``(B, classes)`` logits; run in eval mode without autograd (every module's
            mode is restored afterwards).
        inputs: ``(B, C, H, W)`` images (pixels are the features) or ``(B, ...)`` (elements are the features).
        attributions: the inputs' shape, or ``(B, 1, H, W)`` maps for images.
        target: explained class: int, ``(B,)`` indices, or None for the prediction on the clean inputs.
        mode: ``"deletion"`` (start from the input, replace features by the substrate) or ``"insertion"``
            (start from the substrate, put the input's features back).
        n_steps: number of steps from 0 to all features (default 32; capped at the number of features); the curve
            has ``n_steps + 1`` points. RISE used 224 steps for 224 x 224 images.
        step_fraction: alternatively the share of features per step (``n_steps = ceil(1 / step_fraction)``).
        substrate: see :data:`Substrate`; default ``"zeros"`` for deletion, ``"blur"`` for insertion (as RISE).
        score: ``"probability"`` (softmax of the target class, as RISE) or ``"logit"``.
        pooling: how channels pool into one pixel score before ranking (see ``POOLINGS``); ``"sum"`` ranks the
            strongest positive evidence first.
        random_control: also compute the curves of a random ordering (the same number of forwards again).
        seed: seed of the private generator for the random ordering and for breaking ties between equal
            attribution values (the global RNG is untouched).
        batch_size: the most perturbed inputs per forward pass (default: as many as fit the attribution methods'
            element budget, 2**16 input elements: 64 images of 1x32x32; on CPU larger blocks run slower per row).
        output_fn: maps the model's output to ``(B, classes)`` scores, as the attribution methods' ``output_fn``
            (not needed for a tensor, a tuple, or a mapping / HuggingFace ``ModelOutput`` with ``"logits"``).

    Returns:
        A :class:`PerturbationCurve`; tensors on the CPU.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.rand(3, 1, 4, 4)
        >>> curve = deletion_curve(model, x, torch.rand(3, 1, 4, 4), target=0, n_steps=4)
        >>> curve.scores.shape, curve.fractions.tolist()
        (torch.Size([3, 5]), [0.0, 0.25, 0.5, 0.75, 1.0])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(mode, "mode", MODES)
    check_choice(score, "score", SCORES)
    check_tensor(inputs, "inputs")
    if batch_size is None:
        batch_size = default_rows(inputs[0].numel())
    check_int(batch_size, "batch_size", minimum=1)
    check_bool(random_control, "random_control")
    if step_fraction is not None:
        if not isinstance(step_fraction, (int, float)) or not 0 < step_fraction <= 1:
            raise ValueError(f"step_fraction must be a number in (0, 1], got {step_fraction!r}")
        if n_steps is not None:
            raise ValueError("pass either n_steps or step_fraction, not both")
        n_steps = math.ceil(1.0 / step_fraction - 1e-9)
    elif n_steps is None:
        n_steps = DEFAULT_STEPS
    check_int(n_steps, "n_steps", minimum=1)
    if substrate is None:
        substrate = "zeros" if mode == "deletion" else "blur"

    device = model_device(model, inputs.device)
    x = inputs.detach().to(device)
    values = feature_map(attributions, x.shape, pooling).to(device)
    check_finite(values, "attributions")
    b = x.shape[0]
    values = values.reshape(b, -1).float()
    d = values.shape[1]
    n_steps = min(n_steps, d)
    counts = torch.linspace(0, d, n_steps + 1, device=device).round().long()
    fractions = counts.double().div(d).float()

    resolved = resolve_targets(model, x, target, batch_size, output_fn)
    base = substrate_like(x, substrate)
    generator = torch.Generator().manual_seed(int(seed))
    ranks = _descending_ranks(values, generator)
    insertion = mode == "insertion"
    with evaluating(model):
        scores = _curve_scores(model, x, base, ranks, counts, resolved, insertion, score, batch_size, output_fn)
        random_scores = None
        if random_control:
            random_ranks = torch.rand(b, d, generator=generator).argsort(dim=1).to(device)
            random_scores = _curve_scores(model, x, base, random_ranks, counts, resolved, insertion, score, batch_size,
                                          output_fn)
    fractions_cpu = fractions.cpu()
    scores = scores.cpu()
    random_scores = None if random_scores is None else random_scores.cpu()
    return PerturbationCurve(
        mode=mode,
        fractions=fractions_cpu,
        scores=scores,
        auc=torch.trapezoid(scores, fractions_cpu, dim=1),
        random_scores=random_scores,
        random_auc=None if random_scores is None else torch.trapezoid(random_scores, fractions_cpu, dim=1),
        target=resolved.cpu(),
        score=score,
        substrate=_substrate_name(substrate),
    )


def deletion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: Target = None,
    *,
    substrate: Substrate = "zeros",
    **kwargs,
) -> PerturbationCurve:
    """Deletion curves: remove the most relevant features first (lower AUC = more faithful).

    Same arguments as :func:`perturbation_curve` with ``mode="deletion"``; the substrate defaults to zeros.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> curve = deletion_curve(model, torch.rand(2, 4), torch.rand(2, 4), target=1, n_steps=4)
        >>> len(curve), curve.random_auc.shape
        (2, torch.Size([2]))
    """
    return perturbation_curve(model, inputs, attributions, target, mode="deletion", substrate=substrate, **kwargs)


def insertion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    target: Target = None,
    *,
    substrate: Substrate = "blur",
    **kwargs,
) -> PerturbationCurve:
    """Insertion curves: start from the substrate and put the most relevant features back first (higher AUC = more
    faithful).

    Same arguments as :func:`perturbation_curve` with ``mode="insertion"``; the substrate defaults to RISE's blur
    (use ``"zeros"`` or ``"mean"`` for non-image inputs).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> curve = insertion_curve(model, torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), target=0, n_steps=2)
        >>> curve.mode, curve.substrate
        ('insertion', 'blur')
    """
    return perturbation_curve(model, inputs, attributions, target, mode="insertion", substrate=substrate, **kwargs)
