"""Shared plumbing of the sanity tests: the private model copy, binding methods to it, running them, targets."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, Union

import torch
from torch import nn

from lightning_lens.attribution.base import ExplainFn, check_inputs, forward_logits
from lightning_lens.attribution.registry import MethodSpec, method_specs, resolve_method
from lightning_lens.sanity.similarity import MapSimilarity, PreparedMaps
from lightning_lens.utils import preserve_modes

#: what the sanity functions take as ``methods``: one :data:`~lightning_lens.attribution.MethodSpec` (a registry name,
#: ``(name, kwargs)``, an attribution object bound to the model or one of its submodules, a factory, or an explain
#: function ``(model, inputs, target) -> maps``), a list of them, or a ``{label: spec}`` dict.
Methods = Union[MethodSpec, Sequence[MethodSpec], Mapping[str, MethodSpec]]


@dataclass
class BoundMethod:
    """A method bound to the private copy of the model."""

    name: str
    method: Any  # attribution object, or None for a plain function
    fn: Optional[ExplainFn]
    model: nn.Module

    @property
    def stochastic(self) -> bool:
        return self.method is not None and hasattr(self.method, "seed")

    def explain(self, inputs: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        if self.method is not None:
            out = self.method.attribute(inputs, target=target)
        else:
            assert self.fn is not None
            out = self.fn(self.model, inputs, target)
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != inputs.shape[0]:
            raise TypeError(
                f"method {self.name!r} must return a tensor of attributions of shape (batch, ...) with batch"
                f" {inputs.shape[0]}, got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out.detach()

    def rerun(self, inputs: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """The same method with another seed (the ceiling of a stochastic method)."""
        other = copy.copy(self.method)
        seed = getattr(other, "seed", None)
        other.seed = None if seed is None else int(seed) + 1  # None draws fresh noise on each call anyway
        return BoundMethod(self.name, other, None, self.model).explain(inputs, target)


def private_copy(model: nn.Module) -> tuple[nn.Module, dict[int, Any]]:
    """A deep copy whose parameters need no grad, and a ``copy.deepcopy`` memo mapping the original's modules,
    parameters and buffers to the copy's (to rebind method objects)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        clone = copy.deepcopy(model)
    except Exception as err:  # non-copyable attributes (open files, locks, some wrapped modules)
        raise TypeError(
            f"model: the randomization tests work on a deep copy of the model, and copy.deepcopy failed ({err});"
            " pass a model without non-copyable attributes (e.g. the bare nn.Module rather than a wrapper)"
        ) from err
    memo = correspondence(model, clone)
    for p in clone.parameters():
        p.requires_grad_(False)  # the copy is only explained: no parameter gradients are ever needed
        p.grad = None
    return clone, memo


def correspondence(source: nn.Module, copy_of_source: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo mapping ``source``'s modules, parameters and buffers to those of a deep copy of it."""
    memo: dict[int, Any] = {id(source): copy_of_source}
    pairs = [
        (source.named_modules(remove_duplicate=False), copy_of_source.named_modules(remove_duplicate=False)),
        (source.named_parameters(), copy_of_source.named_parameters()),
        (source.named_buffers(), copy_of_source.named_buffers()),
    ]
    for left, right in pairs:
        for (name_a, a), (name_b, b) in zip(left, right):
            if name_a != name_b:
                raise ValueError(f"the copy's structure differs from the model's ({name_a!r} vs {name_b!r})")
            memo[id(a)] = b
    return memo


def normalize_methods(methods: Methods) -> list[tuple[str, Any]]:
    """``[(label, spec)]`` from a single spec, a sequence or a ``{label: spec}`` mapping: the registry's
    :func:`~lightning_lens.attribution.method_specs`, so labels are the names the other callbacks log under
    (``"IG"`` -> ``"integrated_gradients"``); labels must be unique.

    Example:
        >>> normalize_methods(["IG", "saliency"])
        [('integrated_gradients', 'integrated_gradients'), ('gradient', 'gradient')]
    """
    return method_specs(methods, allow_single=True)


def control_methods(inputs: torch.Tensor, exclude: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The model-independent controls ``[("edge", EdgeDetector()), ("random", RandomMap(seed=None))]`` (the edge
    map only for image batches), minus names in ``exclude``."""
    from lightning_lens.attribution import EdgeDetector, RandomMap

    out: list[tuple[str, Any]] = []
    if inputs.dim() == 4 and "edge" not in exclude:
        out.append(("edge", EdgeDetector()))
    if "random" not in exclude:
        out.append(("random", RandomMap(seed=None)))
    return out


def bind(label: str, spec: Any, model: nn.Module, clone: nn.Module, memo: dict[int, Any]) -> BoundMethod:
    """Bind one method spec to ``clone`` (the copy of ``model``).

    Names, ``(name, kwargs)`` pairs, factories and explain functions are resolved for the copy by
    :func:`~lightning_lens.attribution.resolve_method`; a method object built on ``model`` (or one of its submodules)
    is deep-copied onto the copy.
    """
    if hasattr(spec, "attribute") and not isinstance(spec, type):
        bound_to = getattr(spec, "model", None)
        if bound_to is not None and id(bound_to) not in memo:
            raise ValueError(
                f"methods: {label!r} is bound to a model that is neither the given model nor one of its submodules;"
                " build it on the model you check, or pass its name"
            )
        # deepcopy with the memo maps every reference to the model (or its submodules, e.g. a Grad-CAM layer) to
        # the copy's counterpart and copies the rest of the method's state
        return BoundMethod(label, copy.deepcopy(spec, dict(memo)), None, clone)
    try:
        method = resolve_method(spec, clone)
    except TypeError as err:
        raise TypeError(f"methods[{label!r}]: {err}") from err
    return BoundMethod(label, method, None, clone)


F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(fn: F) -> F:
    """Run ``fn`` with inference mode off: the model copy is created, re-initialized in place and differentiated,
    none of which inference tensors allow (``trainer.validate()`` runs callbacks under ``torch.inference_mode``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_batch(inputs: Any, model: nn.Module) -> torch.Tensor:
    """Validated inputs, detached, on the model's device, as normal (not inference) tensors."""
    x = check_inputs(inputs)
    param = next(model.parameters(), None)
    if param is not None and x.device != param.device:
        x = x.to(param.device)
    return x.clone() if x.is_inference() else x.detach()


def predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` logits in eval mode without grad; modes restored."""
    with preserve_modes(model, mode=False), torch.no_grad():
        return forward_logits(model, inputs)


def median(t: torch.Tensor) -> float:
    """Median of the finite entries (``nan`` if none)."""
    t = t.detach().float().cpu()
    return float(t.nanmedian()) if torch.isfinite(t).any() else math.nan


def floor_partners(target: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """For every example, the index of the example it is compared with for the floor: the next one (cyclically)
    whose target class differs, so the floor measures unrelated maps rather than two maps of the same class; the
    next one when every example has the same class."""
    partners = torch.arange(1, batch + 1) % batch
    if target is None or target.dim() != 1 or target.shape[0] != batch:
        return partners
    labels = target.detach().cpu().tolist()
    for i in range(batch):
        for step in range(1, batch):
            j = (i + step) % batch
            if labels[j] != labels[i]:
                partners[i] = j
                break
    return partners


@dataclass
class Reference:
    """A method's maps on the unmodified model, prepared for comparisons, with the floor and ceiling controls.

    ``floor``: median similarity of the maps of two different inputs under the same model, each example paired with
    the next one explaining another class (see :func:`floor_partners`); ``nan`` with a single example.
    ``ceiling``: 1 for a deterministic method; for one with a ``seed`` attribute, the median similarity with a
    re-run under another seed.
    """

    method: BoundMethod
    metrics: tuple[str, ...]
    prepared: PreparedMaps
    floor: dict[str, float]
    ceiling: dict[str, float]

    @classmethod
    def compute(cls, method: BoundMethod, inputs: torch.Tensor, target: Optional[torch.Tensor],
                similarity: MapSimilarity, keep_signed: bool = True,
                maps: Optional[torch.Tensor] = None) -> "Reference":
        """``keep_signed=False``: skip the normalized signed maps unless a metric needs them (nobody reads them).
        ``maps``: the method's maps of ``inputs`` when the caller already has them (saves one explanation)."""
        maps = method.explain(inputs, target) if maps is None else maps
        metrics = similarity.applicable(maps.shape)
        prepared = similarity.prepare(maps, metrics, signed=keep_signed)
        if inputs.shape[0] > 1:
            partners = floor_partners(target, inputs.shape[0])
            floor = {k: median(v) for k, v in similarity.compare(prepared, prepared.take(partners), metrics).items()}
        else:
            floor = {k: math.nan for k in metrics}
        ceiling = {k: 1.0 for k in metrics}
        if method.stochastic:
            rerun = similarity.prepare(method.rerun(inputs, target), metrics)
            ceiling = {k: median(v) for k, v in similarity.compare(prepared, rerun, metrics).items()}
        return cls(method, tuple(metrics), prepared, floor, ceiling)

    def compare(self, maps: torch.Tensor, similarity: MapSimilarity) -> tuple[dict[str, torch.Tensor], PreparedMaps]:
        """``({metric: (B,)}, prepared maps)`` of other maps of the same inputs against these."""
        prepared = similarity.prepare(maps, self.metrics)
        return similarity.compare(self.prepared, prepared, self.metrics), prepared

    def compare_stages(self, stages: Sequence[torch.Tensor], similarity: MapSimilarity,
                       max_elements: int = 2**24, keep_signed: bool = True,
                       ) -> tuple[dict[str, torch.Tensor], list[PreparedMaps]]:
        """``({metric: (S, B)}, prepared maps per chunk)`` for the maps of ``S`` stages, compared in a few large
        batches: one pass of every metric over many stages costs far less than ``S`` small passes.
        ``keep_signed=False``: the prepared maps skip the signed maps unless a metric needs them."""
        per_stage = max(1, stages[0].numel()) if stages else 1
        chunk = max(1, max_elements // per_stage)
        scores: dict[str, list[torch.Tensor]] = {m: [] for m in self.metrics}
        prepared_chunks = []
        for start in range(0, len(stages), chunk):
            group = stages[start : start + chunk]
            prepared = similarity.prepare(torch.cat(list(group)), self.metrics, signed=keep_signed)
            for m, v in similarity.compare_stacked(self.prepared, prepared, self.metrics).items():
                scores[m].append(v)
            prepared_chunks.append(prepared)
        return {m: torch.cat(v) for m, v in scores.items()}, prepared_chunks


def checked_logits(outputs: list, inputs: torch.Tensor) -> torch.Tensor:
    """The logits the layer-discovery pass recorded (see :func:`~lightning_lens.sanity.layers.find_layers`)."""
    if not outputs or not isinstance(outputs[0], torch.Tensor):
        raise TypeError(
            "the model must return a tensor of logits of shape (batch, classes), got"
            f" {type(outputs[0]).__name__ if outputs else 'nothing'}; wrap the model so that its forward returns"
            " one score per class"
        )
    logits = outputs[0]
    if logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"the model must return logits of shape (batch, classes) = ({inputs.shape[0]}, C), got shape"
            f" {tuple(logits.shape)}; wrap the model so that its forward returns one score per class"
        )
    return logits.detach()
