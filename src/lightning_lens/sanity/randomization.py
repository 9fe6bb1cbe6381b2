"""Model-parameter randomization tests (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

A saliency method that explains the *model* must produce different maps once the model's learned weights are
replaced by random ones. :func:`cascading_randomization` re-initializes the layers one after another, from the output
side down, keeping earlier layers randomized; :func:`independent_randomization` re-initializes one layer at a time.
After every stage each method explains the same inputs again and its maps are compared with the original model's
(:class:`~lightning_lens.sanity.similarity.MapSimilarity`). Verdicts are relative to controls measured in the same
run (:class:`~lightning_lens.sanity.report.VerdictRule`).

Guarantees: the given model is never modified (everything happens on one deep copy), the global RNG is untouched
(a private generator; ``reset_parameters`` runs inside ``torch.random.fork_rng``), no parameter gradient is written.
See :mod:`lightning_lens.sanity.layers` for what a layer is and how it is re-initialized.

Speed: the copy is re-initialized cumulatively in place (one deep copy for the whole cascade), each method's
reference maps are prepared once and all stages are compared in one batched call, and on CPU the copy runs in the
channels-last memory layout (:func:`~lightning_lens.sanity.layers.to_fast_layout_`: 1.5-2x faster convolutions,
same values up to float rounding). With a given target the layers are found during the first method's explanation
(:class:`~lightning_lens.sanity.layers.ExecutionRecorder`) instead of in a forward pass of their own, and without
``keep_maps`` the normalized signed maps are not computed. ``benchmarks/sanity.py --quantus`` compares the cascade
with Quantus' MPRT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import nn

from lightning_lens.sanity._common import (
    BoundMethod,
    Methods,
    Reference,
    bind,
    check_batch,
    control_methods,
    normalize_methods,
    outside_inference_mode,
    checked_logits,
    predict,
    private_copy,
)
from lightning_lens.sanity.layers import (
    BatchNormPolicy,
    ExecutionRecorder,
    InitFn,
    Layer,
    find_layers,
    in_fast_layout,
    layers_in_order,
    reinitialize_,
)
from lightning_lens.sanity.report import (
    MethodResult,
    RandomizationReport,
    VerdictRule,
)
from lightning_lens.sanity.similarity import MapSimilarity
from lightning_lens.utils import resolve_target
from lightning_lens.utils.targets import per_example_target
from lightning_lens.utils.checks import check_float, check_int
from lightning_lens.utils.targets import Target

__all__ = ["cascading_randomization", "independent_randomization", "RANDOMIZED_PREDICTION", "SmoothedMethod"]

log = logging.getLogger(__name__)

#: ``target=RANDOMIZED_PREDICTION`` explains, at every stage, the class the randomized model predicts (the paper's code)
RANDOMIZED_PREDICTION = "randomized_prediction"
Order = Literal["top_down", "bottom_up"]
Progress = Callable[[int, int, str], None]
LayerSpec = Optional[Sequence[Union[str, nn.Module]]]


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Union[Target, str] = None,
    methods: Methods = ("gradient", "guided_backprop"),
    *,
    order: Order = "top_down",
    layers: LayerSpec = None,
    batchnorm: BatchNormPolicy = "keep",
    similarity: Optional[MapSimilarity] = None,
    rule: Optional[VerdictRule] = None,
    seed: int = 0,
    keep_maps: bool = True,
    controls: bool = True,
    init_fn: Optional[InitFn] = None,
    progress: Optional[Progress] = None,
    smooth_samples: int = 1,
    smooth_noise: float = 0.0,
) -> RandomizationReport:
    """Randomize the model's layers cumulatively and measure how each method's maps change.

    Stage ``s`` has the ``s`` layers closest to the output (``order="top_down"``, the paper) or to the input
    (``"bottom_up"``, Hedström et al. 2023) re-initialized. Cost: ``S + 1`` explanations per method for ``S``
    layers (plus one for the ceiling of a stochastic method), one deep copy and one forward pass to find the layers
    (none with a given target when the first method runs the model on the inputs themselves: it records them).

    Args:
        model: a classifier returning ``(batch, classes)`` logits. Never modified.
        inputs: ``(B, ...)`` inputs to explain (moved to the model's device); ``B >= 2`` for the floor control.
        target: the class to explain, fixed across stages: an int, ``B`` labels, or ``None`` (the original model's
            prediction); or ``"randomized_prediction"`` to explain each stage's own predicted class.
        methods: registry names (``"gradient"``, ``"guided_backprop"``, ``"edge"`` ...), ``(name, kwargs)``
            tuples, attribution objects built on ``model`` (rebound to the copy), functions
            ``explain(model, inputs, target) -> Tensor``, or a ``{label: method}`` dict.
        order: ``"top_down"`` or ``"bottom_up"``.
        layers: names of blocks to randomize instead of every parameter-owning module.
        batchnorm: ``"keep"`` the trained running statistics (Adebayo et al.) or ``"reset"`` them (Quantus).
        similarity: the metrics and normalization (default :class:`MapSimilarity()`).
        rule: the verdict thresholds (default :class:`VerdictRule()`).
        seed: seed of the private generator the re-initialization draws from.
        keep_maps: keep the normalized maps of every stage in the report (for cascade grids).
        controls: also run the model-independent controls as methods: ``"edge"`` (Sobel edge map, image inputs
            only; its maps never change, so it must fail) and ``"random"`` (fresh noise on every call; re-runs differ
            as much as anything, so it is inconclusive, never a pass). Skipped for names already in ``methods``.
        init_fn: re-initialization of parameters no ``reset_parameters`` covers.
        progress: called as ``progress(stage, num_stages, layer_name)`` after each stage.
        smooth_samples, smooth_noise: smooth MPRT (Hedström et al. 2023, "Sanity Checks Revisited: An Exploration
            to Repair the Model Parameter Randomisation Test"): every explanation (original, each stage, controls)
            is the mean of the method's explanations of ``smooth_samples`` noisy copies ``x + e``, ``e ~ N(0,
            (smooth_noise * (max(x) - min(x)))^2)`` per example, so noise in the attributions does not pass for
            sensitivity to the weights. The copies come from a private generator seeded from ``seed`` and are the
            same at every stage. ``1`` and ``0.0`` (default): the plain test. Hedström et al. use 50 samples and
            noise 0.1; the cost grows ``smooth_samples``-fold.

    Returns:
        A :class:`RandomizationReport`; ``print(report.summary())`` for the verdicts and curves.

    Example:
        >>> from lightning_lens.testing import SmallCNN
        >>> report = cascading_randomization(SmallCNN(), torch.rand(4, 1, 32, 32), None, ["gradient", "edge"])
        >>> report.stages[0], report.verdicts["edge"].outcome
        ('classifier.3', 'fails')
    """
    return _randomization_test("cascading", model, inputs, target, methods, order, layers, batchnorm, similarity,
                               rule, seed, keep_maps, controls, init_fn, progress, smooth_samples, smooth_noise)


def independent_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Union[Target, str] = None,
    methods: Methods = ("gradient", "guided_backprop"),
    *,
    order: Order = "top_down",
    layers: LayerSpec = None,
    batchnorm: BatchNormPolicy = "keep",
    similarity: Optional[MapSimilarity] = None,
    rule: Optional[VerdictRule] = None,
    seed: int = 0,
    keep_maps: bool = True,
    controls: bool = True,
    init_fn: Optional[InitFn] = None,
    progress: Optional[Progress] = None,
    smooth_samples: int = 1,
    smooth_noise: float = 0.0,
) -> RandomizationReport:
    """Randomize one layer at a time (the others keep their trained weights) and measure how the maps change.

    Same arguments and report as :func:`cascading_randomization`; stage ``s`` has only layer ``s`` re-initialized
    (restored from a saved copy of its tensors before the next stage).

    Example:
        >>> from lightning_lens.testing import SmallCNN
        >>> report = independent_randomization(SmallCNN(), torch.rand(4, 1, 32, 32), methods="gradient")
        >>> report.mode, report.num_stages
        ('independent', 6)
    """
    return _randomization_test("independent", model, inputs, target, methods, order, layers, batchnorm, similarity,
                               rule, seed, keep_maps, controls, init_fn, progress, smooth_samples, smooth_noise)


def _stage_zero(
    clone: nn.Module,
    x: torch.Tensor,
    target: Union[Target, str],
    layers: LayerSpec,
    bound: list,
    similarity: MapSimilarity,
    randomized_target: bool,
    keep_signed: bool = True,
) -> tuple[list[Layer], list[str], Optional[torch.Tensor], torch.Tensor, list[Reference]]:
    """The layers, the fixed target, the original prediction and every method's reference maps and controls."""
    if not randomized_target and target is not None and bound:
        merged = _stage_zero_merged(clone, x, target, layers, bound, similarity, keep_signed)
        if merged is not None:
            return merged
    outputs: list = []
    found, skipped = find_layers(clone, x, layers, output=outputs)
    if not found:
        raise ValueError("model has no parameters to randomize (no module with parameters ran in its forward)")
    logits = checked_logits(outputs, x)
    fixed = None if randomized_target else resolve_target(target, logits)  # type: ignore[arg-type]
    prediction = logits.argmax(dim=1)
    stage_target = prediction if randomized_target else fixed
    references = [Reference.compute(m, x, stage_target, similarity, keep_signed=keep_signed) for m in bound]
    return found, skipped, fixed, prediction, references


def _stage_zero_merged(
    clone: nn.Module,
    x: torch.Tensor,
    target: Target,
    layers: LayerSpec,
    bound: list,
    similarity: MapSimilarity,
    keep_signed: bool,
) -> Optional[tuple[list[Layer], list[str], Optional[torch.Tensor], torch.Tensor, list[Reference]]]:
    """:func:`_stage_zero` for a given target with the layer discovery folded into the first method's explanation
    (:class:`~lightning_lens.sanity.layers.ExecutionRecorder`): one forward pass fewer when that explanation runs the
    model on the inputs themselves (gradient-type methods; otherwise the discovery pass runs after it). ``None`` when
    anything fails: the caller then takes the plain path, which reports errors with its own messages."""
    try:
        fixed = per_example_target(target, x.shape[0], x.device)
        with ExecutionRecorder(clone, x) as recorder:
            first = Reference.compute(bound[0], x, fixed, similarity, keep_signed=keep_signed)
        if recorder.order is not None:
            found, skipped = layers_in_order(clone, recorder.order, layers)
            logits = checked_logits([recorder.output], x)
        else:  # the first explanation did not run the model on the inputs (a path, noisy copies): discover now
            outputs: list = []
            found, skipped = find_layers(clone, x, layers, output=outputs)
            logits = checked_logits(outputs, x)
        if not found or not torch.equal(resolve_target(target, logits), fixed):
            return None
    except Exception:  # noqa: BLE001 - the plain path raises the documented errors
        return None
    prediction = logits.argmax(dim=1)
    references = [first] + [Reference.compute(m, x, fixed, similarity, keep_signed=keep_signed) for m in bound[1:]]
    return found, skipped, fixed, prediction, references


def _check_options(order: str, batchnorm: str, seed: int, target: object) -> None:
    if order not in ("top_down", "bottom_up"):
        raise ValueError(f"order must be 'top_down' (the paper) or 'bottom_up', got {order!r}")
    if batchnorm not in ("keep", "reset"):
        raise ValueError(f"batchnorm must be 'keep' (trained running statistics) or 'reset', got {batchnorm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(target, str) and target != RANDOMIZED_PREDICTION:
        raise ValueError(
            f"target must be an int, a tensor of class indices, None (the original prediction) or"
            f" {RANDOMIZED_PREDICTION!r}, got {target!r}"
        )


@outside_inference_mode
def _randomization_test(
    mode: str,
    model: nn.Module,
    inputs: torch.Tensor,
    target: Union[Target, str],
    methods: Methods,
    order: str,
    layers: LayerSpec,
    batchnorm: str,
    similarity: Optional[MapSimilarity],
    rule: Optional[VerdictRule],
    seed: int,
    keep_maps: bool,
    controls: bool,
    init_fn: Optional[InitFn],
    progress: Optional[Progress],
    smooth_samples: int = 1,
    smooth_noise: float = 0.0,
) -> RandomizationReport:
    _check_options(order, batchnorm, seed, target)
    check_int(smooth_samples, "smooth_samples", minimum=1)
    smooth_noise = check_float(smooth_noise, "smooth_noise", minimum=0.0)
    similarity = similarity or MapSimilarity()
    rule = rule or VerdictRule()
    specs = normalize_methods(methods)
    clone, memo = private_copy(model)
    x = check_batch(inputs, clone)
    if controls:
        specs += control_methods(x, exclude=[label for label, _ in specs])
    bound = [bind(label, spec, model, clone, memo) for label, spec in specs]
    if smooth_samples > 1 or smooth_noise > 0:
        bound = [SmoothedMethod(m.name, m.method, m.fn, m.model, smooth_samples, smooth_noise, seed) for m in bound]
    randomized_target = isinstance(target, str)
    found, skipped, fixed, prediction, references = in_fast_layout(
        clone, x, lambda: _stage_zero(clone, x, target, layers, bound, similarity, randomized_target, keep_maps))
    sequence = list(reversed(found)) if order == "top_down" else found
    generator = torch.Generator().manual_seed(seed)
    predictions = [prediction.cpu()]
    targets = [(prediction if randomized_target else fixed).cpu()]  # type: ignore[union-attr]
    stage_target = prediction.to(x.device) if randomized_target else fixed
    stage_maps: list[list[torch.Tensor]] = [[] for _ in bound]

    fallback: list[str] = []
    total = len(sequence)
    for stage, layer in enumerate(sequence, start=1):
        saved = layer.state() if mode == "independent" else None
        reinitialize_(layer, generator, batchnorm=batchnorm, init_fn=init_fn)  # type: ignore[arg-type]
        fallback.extend(n for n in layer.fallback if n not in fallback)
        if randomized_target:
            stage_target = predict(clone, x).argmax(dim=1)
            predictions.append(stage_target.cpu())
        targets.append(stage_target.cpu())  # type: ignore[union-attr]
        for i, ref in enumerate(references):
            stage_maps[i].append(ref.method.explain(x, stage_target))
        if saved is not None:
            with torch.no_grad():
                for tensor, value in saved:
                    tensor.copy_(value)
        if progress is not None:
            progress(stage, total, layer.name)
        log.debug("randomization stage %d/%d (%s) done", stage, total, layer.name)

    report = RandomizationReport(
        mode=mode, order=order, stages=[layer.name for layer in sequence],
        stage_parameters=[[n for n, _ in layer.parameters] for layer in sequence],
        fallback_parameters=fallback, skipped_modules=skipped, batchnorm=batchnorm,
        target_mode=RANDOMIZED_PREDICTION if randomized_target else "fixed",
        targets=torch.stack(targets), predictions=torch.stack(predictions), seed=seed, rule=rule,
    )
    for i, ref in enumerate(references):
        name = ref.method.name
        scores, prepared = ref.compare_stages(stage_maps[i], similarity, keep_signed=keep_maps)
        stage_maps[i] = []  # free the raw maps
        sims = {m: v.detach().float().cpu() for m, v in scores.items()}
        maps = signed = None
        if keep_maps:
            shape = (len(sequence) + 1, *ref.prepared.absolute.shape)
            maps = torch.cat([ref.prepared.absolute, *(p.absolute for p in prepared)]).float().cpu().view(shape)
            signed = torch.cat([ref.prepared.signed, *(p.signed for p in prepared)]).float().cpu().view(shape)
        report.results[name] = MethodResult(
            name=name, metrics=ref.metrics, similarity=sims, floor=ref.floor, ceiling=ref.ceiling,
            stochastic=ref.method.stochastic, maps=maps, signed_maps=signed,
            verdict=rule.judge(name, sims, ref.floor, ref.ceiling),
        )
    return report



@dataclass
class SmoothedMethod(BoundMethod):
    """A bound method whose explanation is the mean over ``samples`` noisy copies of the inputs (smooth MPRT).

    Copy ``i`` is ``x + noise * (max(x_b) - min(x_b)) * z_i`` per example ``b``, ``z_i ~ N(0, 1)`` drawn from a private
    generator re-seeded with ``seed`` on every call, so every call (every randomization stage) sees the same copies.

    Example:
        >>> from lightning_lens.sanity._common import bind
        >>> model = torch.nn.Linear(3, 2)
        >>> m = bind("gradient", "gradient", model, model, {})
        >>> smooth = SmoothedMethod(m.name, m.method, m.fn, m.model, samples=4, noise=0.1, seed=0)
        >>> torch.allclose(smooth.explain(torch.rand(2, 3), torch.tensor([0, 1])), model.weight.detach()[[0, 1]])
        True
    """

    samples: int = 1
    noise: float = 0.0
    seed: int = 0

    def noisy_copies(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """The ``samples`` noisy copies of ``inputs``, in order (the same on every call)."""
        generator = torch.Generator().manual_seed(self.seed)
        span = (inputs.flatten(1).amax(dim=1) - inputs.flatten(1).amin(dim=1)).view(-1, *([1] * (inputs.dim() - 1)))
        for _ in range(self.samples):
            z = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype).to(inputs.device)
            yield inputs + self.noise * span * z

    def _mean(self, explain: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for copy_ in self.noisy_copies(inputs):
            maps = explain(copy_)
            total = maps.clone() if total is None else total.add_(maps)
        assert total is not None
        return total / self.samples

    def explain(self, inputs: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        return self._mean(lambda x: BoundMethod.explain(self, x, target), inputs)

    def rerun(self, inputs: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        return self._mean(lambda x: BoundMethod.rerun(self, x, target), inputs)
