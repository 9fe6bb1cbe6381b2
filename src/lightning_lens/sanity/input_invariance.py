"""Input invariance (Kindermans et al., "The (Un)reliability of Saliency Methods", 2017/2019).

Shift every input by a constant, ``x' = x + s``, and compensate the shift in the first layer's bias: the *twin*
model computes exactly the same function of the original data (``twin(x + s) == model(x)``), so an explanation of the
model should not change. Gradient-based maps pass; reference-point methods with a fixed reference (Gradient x Input,
Integrated Gradients with a zero baseline) fail, because ``x' - 0 != x - 0``; Integrated Gradients passes again when
its baseline is shifted with the data (``shift_baselines``).

The twin is built analytically on a deep copy (no retraining):

* ``nn.Linear``: ``b' = b - W s`` (``s`` flattened the way the layer sees its input).
* ``nn.Conv1d/2d/3d``: ``b' = b - sum_k W[:, c, k] s_c`` per output channel (computed as the convolution of a
  constant patch of ``s``, so groups and dilation are handled). With zero padding the compensation would be wrong at
  the borders (the padded zeros are not shifted), so the twin's first convolution pads with the *shifted* value
  ``s`` instead (a small wrapper pads with zeros and adds ``s`` on the padded border, then convolves without
  padding); ``reflect``/``replicate``/``circular`` padding shifts with the data already.

The twin's outputs are checked against the model's (``output_difference``; a ``ValueError`` when they differ, e.g.
when the first layer does not receive the raw inputs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.sanity._common import (
    Methods,
    Reference,
    bind,
    check_batch,
    correspondence,
    median,
    normalize_methods,
    outside_inference_mode,
    predict,
    private_copy,
)
from lightning_lens.sanity.report import MapComparison, Verdict, _f
from lightning_lens.sanity.similarity import MapSimilarity
from lightning_lens.utils import preserve_modes, resolve_target
from lightning_lens.utils.checks import check_float
from lightning_lens.utils.targets import Target

__all__ = ["InputInvarianceReport", "input_invariance", "shifted_twin"]

Shift = Union[float, Sequence[float], torch.Tensor]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class InputInvarianceReport(MapComparison):
    """Result of :func:`input_invariance`: a :class:`~lightning_lens.sanity.report.MapComparison` of each method's maps
    of ``(model, x)`` and ``(twin, x + shift)`` (``similarity``; ``floor``/``ceiling`` as in the randomization tests),
    with a verdict per method: ``"passes"`` when the maps are equal within ``tolerance`` for every example.

    The verdicts' ``metric`` is ``"relative_difference"`` and their ``similarity``/``score`` fields hold the largest
    relative difference over the examples (``max |a - a'| / max |a|`` per example).

    Attributes:
        differences: ``{method: (B,)}`` relative difference of the two maps per example.
        tolerance: the largest relative difference that passes.
        shift: the shift, shaped to broadcast over one example.
        first_layer: name of the compensated layer.
        output_difference: ``max |twin(x + s) - model(x)|`` over the logits.
        shifted_baselines: methods whose baseline was shifted with the data for the twin.
        targets: ``(B,)`` explained classes.
        maps: ``{method: (2, B, ...)}`` raw maps (model, twin), or empty with ``keep_maps=False``.
    """

    differences: dict[str, torch.Tensor]
    tolerance: float
    shift: torch.Tensor
    first_layer: str
    output_difference: float
    shifted_baselines: list[str]
    targets: torch.Tensor
    maps: dict[str, torch.Tensor]

    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: one row per method: verdict, largest relative difference, median similarities."""
        metrics = sorted({m for d in self.similarity.values() for m in d})
        columns = ["method", "verdict", "max relative difference", *metrics]
        rows = [[n, self.verdicts[n].outcome, _max(self.differences[n]),
                 *[median(d[m]) if m in d else math.nan for m in metrics]] for n, d in self.similarity.items()]
        return columns, rows

    def summary(self) -> str:
        shift = self.shift.flatten().tolist()
        lines = [f"Input invariance (Kindermans et al.): inputs shifted by {shift if len(shift) > 1 else shift[0]},"
                 f" compensated in {self.first_layer!r} (outputs differ by {_f(self.output_difference)}); a method"
                 f" passes when its maps differ by at most {self.tolerance} (relative)"]
        if self.shifted_baselines:
            lines.append("  baselines shifted with the data: " + ", ".join(self.shifted_baselines))
        return "\n".join(lines + self._method_lines())

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"shift": self.shift.flatten().tolist(), "first_layer": self.first_layer,
                "output_difference": self.output_difference, "tolerance": self.tolerance,
                "shifted_baselines": list(self.shifted_baselines), "targets": self.targets.tolist(),
                "differences": {n: v.tolist() for n, v in self.differences.items()}, **self._comparison_dict()}


def _max(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else math.nan


class _ShiftPaddedConv(nn.Module):
    """A convolution whose zero padding is replaced by padding with the constant ``shift`` (per input channel)."""

    def __init__(self, conv: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.pad = list(conv._reversed_padding_repeated_twice)
        conv.padding = (0,) * len(conv.kernel_size)
        conv._reversed_padding_repeated_twice = [0] * len(self.pad)
        self.conv = conv
        self.register_buffer("shift", shift.reshape(-1, *([1] * len(conv.kernel_size))), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, self.pad)
        border = F.pad(torch.zeros_like(x[:1, :1]), self.pad, value=1.0)  # 1 on the padded border only
        return self.conv(padded + border * self.shift)


def _first_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module, torch.Tensor]:
    """``(name, module, its input)`` of the first module with parameters of its own to run on ``x``."""
    found: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                if not found and args and isinstance(args[0], torch.Tensor):
                    found.append((name, mod, args[0].detach()))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with preserve_modes(model, mode=False), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError("model: no module with parameters ran on the inputs, so there is no first layer to compensate")
    return found[0]


def _shift_tensor(shift: Shift, x: torch.Tensor) -> torch.Tensor:
    """The shift shaped ``(C, 1, ...)`` (or a scalar tensor) to broadcast over one example ``x[0]``."""
    if isinstance(shift, bool):
        raise TypeError(f"shift must be a float, a sequence of floats (one per channel) or a tensor, got {shift!r}")
    if isinstance(shift, (int, float)):
        return torch.tensor(float(shift), dtype=x.dtype, device=x.device)
    if not isinstance(shift, (torch.Tensor, Sequence)) or isinstance(shift, str):
        raise TypeError(f"shift must be a float, a sequence of floats (one per channel) or a tensor, got"
                        f" {type(shift).__name__}")
    s = torch.as_tensor(shift, dtype=x.dtype).to(x.device).flatten()
    if s.numel() == 1:
        return s.reshape(())
    channels = x.shape[1]
    if s.numel() != channels:
        raise ValueError(f"shift has {s.numel()} values but the inputs have {channels} channels (dim 1); pass one"
                         " value per channel or a scalar")
    return s.reshape(channels, *([1] * (x.dim() - 2)))


def shifted_twin(model: nn.Module, inputs: torch.Tensor, shift: Shift) -> tuple[nn.Module, str, torch.Tensor]:
    """A deep copy of ``model`` with its first layer compensating the input shift: ``twin(x + shift) == model(x)``.

    Returns ``(twin, first layer name, shift as a tensor broadcasting over one example)``. ``model`` is not modified.

    Example:
        >>> from lightning_lens.testing import SmallCNN
        >>> net, x = SmallCNN(width=2), torch.rand(2, 1, 32, 32)
        >>> twin, layer, s = shifted_twin(net, x, -1.0)
        >>> layer, bool(torch.allclose(twin(x - 1.0), net(x), atol=1e-5))
        ('features.0', True)
    """
    twin, _ = private_copy(model)
    x = check_batch(inputs, twin)
    s = _shift_tensor(shift, x)
    name, layer, layer_input = _first_layer(twin, x)
    if layer_input.numel() != x.numel() or not torch.equal(layer_input.reshape(x.shape), x):
        raise ValueError(
            f"model: its first layer {name!r} does not receive the inputs unchanged (only a reshape such as Flatten"
            " may come before it), so a shift of the inputs cannot be compensated in its bias; pass the model without"
            " its preprocessing"
        )
    full = torch.broadcast_to(s, x.shape[1:])
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            # the shift as the layer sees it: rows of its last dimension (one row for a flattened input)
            rows = full.reshape(-1, layer.in_features) if layer_input.dim() > 2 else full.reshape(1, -1)
            if not torch.equal(rows, rows[:1].expand_as(rows)):
                raise ValueError(f"shift: {name!r} is a Linear layer over the last dimension of its input, so the"
                                 " shift must be the same for every row it sees (a scalar)")
            delta = layer.weight @ rows[0]
        elif isinstance(layer, _CONVS):
            spatial = len(layer.kernel_size)
            if x.dim() != spatial + 2:
                raise ValueError(f"model: the first layer {name!r} is a {type(layer).__name__} but the inputs have"
                                 f" shape {tuple(x.shape)}")
            channel_shift = full.reshape(x.shape[1], -1)[:, 0]
            extent = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size)]
            patch = channel_shift.reshape(1, -1, *([1] * spatial)).expand(1, -1, *extent)
            conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
            delta = conv(patch, layer.weight, None, 1, 0, layer.dilation, layer.groups).reshape(-1)
        else:
            raise ValueError(
                f"model: the first layer {name!r} is a {type(layer).__name__}; input invariance compensates the shift"
                " in the bias of a first nn.Linear or nn.Conv1d/2d/3d layer"
            )
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
        layer.bias.sub_(delta)
    if isinstance(layer, _CONVS) and layer.padding_mode == "zeros" and any(layer._reversed_padding_repeated_twice):
        wrapped = _ShiftPaddedConv(layer, channel_shift.clone())
        if name == "":
            twin = wrapped
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name), child, wrapped)
    return twin, name, s.detach().clone()


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(1), b.double().flatten(1)
    scale = a.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return ((a - b).abs().amax(dim=1) / scale).float().cpu()


def _shifted_baseline_method(method: Any, label: str, s: torch.Tensor) -> Any:
    if not hasattr(method, "baseline"):
        raise ValueError(f"shift_baselines: {label!r} has no baseline option; name only methods with a baseline"
                         " (integrated_gradients, occlusion)")
    other = copy.copy(method)
    base = other.baseline
    other.baseline = s.clone() if base is None else (torch.as_tensor(base, dtype=s.dtype, device=s.device) + s)
    return other


@outside_inference_mode
def input_invariance(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target = None,
    methods: Methods = ("gradient", "gradient_x_input", "integrated_gradients"),
    *,
    shift: Shift = -1.0,
    shift_baselines: Union[bool, Sequence[str]] = False,
    tolerance: float = 1e-3,
    similarity: Optional[MapSimilarity] = None,
    keep_maps: bool = True,
    dtype: Optional[torch.dtype] = torch.float64,
) -> InputInvarianceReport:
    """Explain ``(model, x)`` and its shifted twin ``(twin, x + shift)`` and check that each method's maps agree.

    Cost: 2 explanations per method, one deep copy, two forward passes. The model is never modified.

    Args:
        model: a classifier returning ``(batch, classes)`` logits whose first layer with parameters is an
            ``nn.Linear`` or ``nn.Conv1d/2d/3d`` receiving the inputs unchanged (a ``Flatten`` before it is fine).
        inputs: ``(B, ...)`` inputs.
        target: the class explained for both (int, ``B`` labels, ``None``: the model's prediction).
        methods: as in :func:`~lightning_lens.sanity.cascading_randomization`.
        shift: the constant added to the inputs: a float, or one value per channel (dim 1). Kindermans et al. shift
            images in ``[0, 1]`` by ``-1``.
        shift_baselines: ``True`` shifts the baseline of every method with a ``baseline`` option (Integrated
            Gradients, Occlusion) for the twin (``None``/0 becomes ``shift``); a list of method labels shifts only
            those (compare ``{"ig": "integrated_gradients", "ig_shifted": "integrated_gradients"}`` with
            ``shift_baselines=["ig_shifted"]``). ``False`` keeps the baselines fixed, the reference-point failure.
        tolerance: the largest relative difference ``max |a - a'| / max |a|`` (per example) that passes; float32
            rounding of the twin stays near ``1e-6``.
        similarity: the similarity metrics reported beside the verdict (default :class:`MapSimilarity()`).
        keep_maps: keep the raw maps of both in the report.
        dtype: the precision both private copies run in (default float64: the twin's bias absorbs ``W s``, and in
            float32 the rounding can flip a ReLU near its kink on a few points of an integration path); ``None``
            keeps the model's.

    Returns:
        An :class:`InputInvarianceReport`.

    Example:
        >>> from lightning_lens.testing import SmallCNN
        >>> report = input_invariance(SmallCNN(width=4), torch.rand(4, 1, 32, 32), methods=["gradient",
        ...                           "gradient_x_input"])
        >>> {name: v.outcome for name, v in report.verdicts.items()}
        {'gradient': 'passes', 'gradient_x_input': 'fails'}
    """
    tolerance = check_float(tolerance, "tolerance", minimum=0.0)
    similarity = similarity or MapSimilarity()
    specs = normalize_methods(methods)
    labels = [label for label, _ in specs]
    if isinstance(shift_baselines, bool):
        shifted_labels = labels if shift_baselines else []
    elif isinstance(shift_baselines, Sequence) and not isinstance(shift_baselines, str) and all(
            isinstance(v, str) for v in shift_baselines):
        unknown = [v for v in shift_baselines if v not in labels]
        if unknown:
            raise ValueError(f"shift_baselines names {unknown}, which are not among the methods' labels {labels}")
        shifted_labels = list(shift_baselines)
    else:
        raise TypeError(f"shift_baselines must be a bool or a list of method labels, got {shift_baselines!r}")

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    clone, memo = private_copy(model)
    x = check_batch(inputs, clone)
    if dtype is not None:
        clone, x = clone.to(dtype), x.to(dtype)
    twin, layer_name, s = shifted_twin(clone, x, shift)
    twin = twin.to(x.device)
    x_shifted = x + s
    logits = predict(clone, x)
    output_difference = float((predict(twin, x_shifted) - logits).abs().max())
    scale = float(logits.abs().max())
    if not output_difference <= 1e-4 * max(1.0, scale):
        raise ValueError(
            f"model: the shifted twin's outputs differ from the model's by {output_difference:.3g}, so the shift is not"
            f" compensated (does the input reach more than the first layer {layer_name!r}, e.g. a skip connection from"
            " the input, or does the model normalize its inputs?); input invariance needs a model whose first layer"
            " alone sees the inputs"
        )
    targets = resolve_target(target, logits)
    wrapped = isinstance(twin if layer_name == "" else twin.get_submodule(layer_name), _ShiftPaddedConv)
    twin_memo = None if wrapped else correspondence(model, twin)

    sims, floors, ceilings, verdicts, differences, maps = {}, {}, {}, {}, {}, {}
    shifted_used: list[str] = []
    for label, spec in specs:
        method = bind(label, spec, model, clone, memo)
        original = method.explain(x, targets)
        ref = Reference.compute(method, x, targets, similarity, maps=original)
        twin_method = _bind_twin(label, spec, model, twin, twin_memo)
        if label in shifted_labels:
            if hasattr(twin_method.method, "baseline"):
                twin_method.method = _shifted_baseline_method(twin_method.method, label, s)
                shifted_used.append(label)
            elif not isinstance(shift_baselines, bool):
                _shifted_baseline_method(twin_method.method, label, s)  # raises: names the method
        shifted = twin_method.explain(x_shifted, targets)
        scores, _ = ref.compare(shifted, similarity)
        sims[label] = {k: v.float().cpu() for k, v in scores.items()}
        floors[label], ceilings[label] = ref.floor, ref.ceiling
        diff = _relative_difference(original, shifted)
        differences[label] = diff
        worst = _max(diff)
        if math.isnan(worst):
            outcome, reason = "inconclusive", "non-finite maps"
        elif worst <= tolerance:
            outcome, reason = "passes", f"the maps agree within {_f(worst)} <= {tolerance} (relative)"
        else:
            outcome, reason = "fails", f"the maps differ by up to {_f(worst)} > {tolerance} (relative)"
        verdicts[label] = Verdict(label, outcome, "relative_difference", worst,  # type: ignore[arg-type]
                                  math.nan, math.nan, worst, reason, 1)
        if keep_maps:
            maps[label] = torch.stack([original.float().cpu(), shifted.float().cpu()])
    return InputInvarianceReport(sims, floors, ceilings, verdicts, differences=differences, tolerance=tolerance,
                                 shift=s.cpu(), first_layer=layer_name, output_difference=output_difference,
                                 shifted_baselines=shifted_used, targets=targets.cpu(), maps=maps)


def _bind_twin(label: str, spec: Any, model: nn.Module, twin: nn.Module, memo: Optional[dict[int, Any]]) -> Any:
    """Bind a method to the twin; a method object built on ``model`` is rebound when the twin keeps the model's
    structure, otherwise (the first convolution wrapped) only names, pairs, factories and functions can be."""
    if memo is None:
        if hasattr(spec, "attribute") and not isinstance(spec, type) and getattr(spec, "model", None) is not None \
                and getattr(spec, "model", None) is not model:
            raise ValueError(f"methods: {label!r} is bound to a submodule of the model, which cannot be rebound to the"
                             " shifted twin (its first convolution is wrapped for the padding); pass its name or a"
                             " (name, kwargs) pair")
        memo = {id(model): twin}
    return bind(label, spec, model, twin, memo)
