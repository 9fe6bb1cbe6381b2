r"""
Saliency maps
^^^^^^^^^^^^^

Explain a fixed set of validation examples (the probes) with several attribution methods every ``n`` epochs and log
the maps as labelled image grids plus per-method scalar summaries, so TensorBoard's step slider shows the
explanations evolving as the model trains.

Tags written (``<method>`` is a registry name such as ``gradient`` or a method object's ``.name``):

=========================================  ===========================================================================
``saliency/<method>``                      image (``layout="per_method"``): one row per probe, columns input, map,
                                           overlay; rows labelled with the dataset index, label and prediction
``saliency/methods_x_probes``              image (``layout="methods_x_probes"``): first row the probes, then one row of
                                           maps per method
``saliency/<method>/mean_abs``             scalar: mean absolute attribution over probes and input elements
``saliency/<method>/top10_mass``           scalar: share of a map's total ``|attribution|`` (summed over channels) held
                                           by its 10% highest pixels, averaged over probes: 0.1 for a flat map, 1.0
                                           when everything sits in a tenth of the image
``saliency/<method>/seconds``              scalar: wall time to compute (and score) the method's maps this epoch
``saliency/skipped_methods``               scalar (only with ``time_budget``): methods skipped for lack of time
``quality/<method>/<metric>``              scalars from :func:`lightning_lens.evaluation.compute_quality` when
                                           ``quality_metrics`` is set
=========================================  ===========================================================================
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_lens._pl import pl, rank_zero_warn
from lightning_lens.attribution.base import forward_logits
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector
from lightning_lens.utils import BatchAccessor, ProbeSet, gradients_enabled, preserve_modes
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_bool, check_choice, check_int, check_str_list

__all__ = ["SaliencyMapCallback"]

_TARGETS = ("label", "prediction")
_LAYOUTS = ("per_method", "methods_x_probes")
#: a ``(mean, std)`` pair of per-channel values, to undo input normalization for display
MeanStd = tuple[list[float], list[float]]
DEFAULT_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "gradcam")


class SaliencyMapCallback(ProbeCallback):
    """Log saliency maps of a fixed probe set during validation.

    The probes are drawn once (``num_probes`` examples spread over classes, reproducibly from ``probe_seed``) from the
    first validation epoch that is not Lightning's sanity check, or passed explicitly, or reused from another
    lightning-lens callback of the same trainer that already holds probes. They stay fixed across epochs and across
    checkpoint resume (:meth:`state_dict`). Every ``every_n_epochs``-th epoch (and on every ``trainer.validate()``)
    each method explains the probes with the unwrapped LightningModule in eval mode, with gradients taken only with
    respect to the inputs: training is never changed (no parameter ``.grad``, modes and buffers
    restored, no global RNG), and it works under ``trainer.validate()`` with ``inference_mode=True``.

    The probes come from the first validation dataloader. The LightningModule's ``forward`` must map the batch's input
    tensor to ``(batch, classes)`` logits. Rank zero
    computes, renders and logs through :mod:`lightning_lens.loggers` (TensorBoard, W&B, CSV/files); the tags are
    listed in the module docstring.

    Args:
        methods: attribution methods, as :func:`lightning_lens.attribution.resolve_method` takes them: registry names
            (see :func:`lightning_lens.attribution.available_methods`), ``(name, kwargs)`` pairs,
            :class:`~lightning_lens.attribution.base.Attribution`
            objects built on this LightningModule (or one of its submodules), or callables ``model -> Attribution``
            such as a method class. Default: gradient, SmoothGrad, Integrated Gradients, Grad-CAM.
        method_kwargs: keyword arguments per method name for the named methods, e.g.
            ``{"smoothgrad": {"n_samples": 20}, "gradcam": {"layer": "model.features.6"}}``.
        num_probes: how many validation examples to explain.
        probe_seed: seed of the private generator that picks the probes.
        probes: an explicit :class:`~lightning_lens.utils.ProbeSet` (then nothing is collected).
        every_n_epochs: log on every n-th epoch during ``fit`` (``trainer.validate()`` always logs).
        target: explain the ``"label"`` class or the model's ``"prediction"``.
        input_key: where the inputs are in a batch (int position, dict key or callable); default: see
            :class:`~lightning_lens.utils.BatchAccessor`.
        target_key: where the labels are.
        index_key: where the dataset indices are (shown in row labels).
        denormalize: undoes the input normalization for display only: a callable on one ``(C, H, W)`` input (e.g.
            ``lambda x: x * std + mean``) or a ``(mean, std)`` pair of per-channel lists (handy in YAML).
        class_names: names shown instead of class indices in labels.
        time_budget: seconds allowed per logged epoch. Once spent, the remaining methods are skipped with a warning
            (counted in ``saliency/skipped_methods``); the methods that waited longest run first the next time.
        layout: ``"per_method"`` (one grid per method: probe, map, overlay) or ``"methods_x_probes"`` (one grid).
        quality_metrics: explanation-quality metrics computed per method on the probes with
            :func:`lightning_lens.evaluation.compute_quality` and logged as ``quality/<method>/<metric>``
            (e.g. ``["relevance_mass", "pointing_game", "deletion_auc"]``; see
            :func:`lightning_lens.evaluation.available_quality_metrics`). Off by default: some are costly. The mask
            metrics log ``quality/<method>/<metric>/<region>`` and ``..._chance`` (the region's area fraction).
        quality_options: per-metric keyword arguments for ``compute_quality(options=...)``, e.g.
            ``{"deletion": {"n_steps": 16}}``.
        mask_regions: ground-truth mask regions (batch keys ``<region>_mask``) handed to the quality metrics;
            default: every mask the probes carry.
        log_scalars: log the per-method summaries ``saliency/<method>/...``.
        cell_size: pixel size of one grid cell (images are upscaled with nearest neighbours); ``None``: the
            renderer's default.

    Raises:
        ValueError: for an unknown method name (the message lists the available ones), a duplicate method,
            ``method_kwargs`` for a method not in ``methods``, ``num_probes < 1``, ``every_n_epochs < 1``, a
            ``target`` or ``layout`` outside the choices, or a non-positive ``time_budget``.
        TypeError: for arguments of the wrong type.

    Example::

        from pytorch_lightning import Trainer
        from pytorch_lightning.loggers import TensorBoardLogger
        from lightning_lens.callbacks import SaliencyMapCallback

        trainer = Trainer(
            max_epochs=5,
            logger=TensorBoardLogger("lens_logs"),
            callbacks=[SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=8, every_n_epochs=1)],
        )
        # trainer.fit(lit_model, train_loader, val_loader) -> Images tab: saliency/gradient, saliency/gradcam

    .. tip:: Several instances can run on one trainer (for example different methods at different frequencies); the
        checkpoint state key includes the method names, target and probe settings.
    """

    def __init__(
        self,
        methods: Sequence[Union[str, Any]] = DEFAULT_METHODS,
        method_kwargs: Optional[dict[str, dict[str, Any]]] = None,
        num_probes: int = 16,
        probe_seed: int = 0,
        probes: Optional[ProbeSet] = None,
        every_n_epochs: int = 1,
        target: Literal["label", "prediction"] = "label",
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        denormalize: Optional[Union[MeanStd, Callable]] = None,
        class_names: Optional[Sequence[str]] = None,
        time_budget: Optional[float] = None,
        layout: Literal["per_method", "methods_x_probes"] = "per_method",
        quality_metrics: Sequence[str] = (),
        quality_options: Optional[dict[str, dict[str, Any]]] = None,
        mask_regions: Optional[Sequence[str]] = None,
        log_scalars: bool = True,
        cell_size: Optional[int] = 64,
    ) -> None:
        super().__init__()
        self._method_specs = _check_methods(methods)
        self.method_kwargs = _check_method_kwargs(method_kwargs, self._method_specs)
        self.num_probes = check_int(num_probes, "num_probes", minimum=1)
        self.probe_seed = check_int(probe_seed, "probe_seed")
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1)
        self.target = check_choice(target, "target", _TARGETS)
        self.layout = check_choice(layout, "layout", _LAYOUTS)
        self.denormalize = _check_denormalize(denormalize)
        self.class_names = None if class_names is None else list(check_str_list(class_names, "class_names"))
        if time_budget is not None:
            if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)):
                raise TypeError(f"time_budget must be a number of seconds or None, got {type(time_budget).__name__}")
            if not time_budget > 0:
                raise ValueError(f"time_budget must be > 0 seconds (or None for no limit), got {time_budget}")
        self.time_budget = None if time_budget is None else float(time_budget)
        self.quality_metrics = check_str_list(quality_metrics, "quality_metrics")
        if quality_options is not None and not isinstance(quality_options, Mapping):
            raise TypeError(
                f"quality_options must be a dict of metric -> dict of keyword arguments, got {quality_options!r}"
            )
        self.quality_options = dict(quality_options or {})
        self.mask_regions = None if mask_regions is None else check_str_list(mask_regions, "mask_regions")
        self.log_scalars = check_bool(log_scalars, "log_scalars")
        self.cell_size = None if cell_size is None else check_int(cell_size, "cell_size", minimum=8)
        if self.quality_metrics:
            _check_quality_metrics(self.quality_metrics)

        self._accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._collector = ProbeCollector(self.num_probes, self._accessor, self.probe_seed, probes, owner=self)
        self._methods: list[tuple[str, Any]] = []  # (name, bound method object), built in setup
        self._bound_to: Optional[nn.Module] = None
        self._last_seconds: dict[str, float] = {}
        self._logged_round: dict[str, int] = {}  # method -> the last logged epoch (counted in calls) it ran in
        self._rounds = 0
        self._last_attributions: dict[str, torch.Tensor] = {}
        self._last_targets: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def last_attributions(self) -> dict[str, torch.Tensor]:
        """The maps of the last logged epoch (rank zero): method name -> CPU float tensor, probes in order."""
        return dict(self._last_attributions)

    @property
    def last_targets(self) -> Optional[torch.Tensor]:
        """The classes the last logged maps explain (labels or predictions, per ``target``)."""
        return self._last_targets

    @property
    def method_names(self) -> list[str]:
        """Names of the configured methods, in order (also the tag names)."""
        return [name for name, _ in self._method_specs]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self.method_names, target=self.target, num_probes=self.num_probes, probe_seed=self.probe_seed
        )

    # ----------------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._bind_methods(pl_module)
        if not trainer.loggers:
            rank_zero_warn(
                "SaliencyMapCallback has no logger to write to (Trainer(logger=False)); the maps are still computed"
                " and available as `.last_attributions`. Pass a logger, e.g. TensorBoardLogger('lens_logs')."
            )

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        probes = self._collector.finalize(trainer)  # a collective under DDP: every rank calls it
        if probes is None or not self._should_log(trainer) or not trainer.is_global_zero:
            return
        self._log_maps(trainer, pl_module, probes)

    # ----------------------------------------------------------------------------------------------------- internals
    def _bind_methods(self, pl_module: nn.Module) -> None:
        """Build (or rebuild, for a new module) the method objects on the unwrapped LightningModule."""
        if self._bound_to is pl_module and self._methods:
            return
        from lightning_lens.attribution import resolve_method

        methods = []
        for i, (name, spec) in enumerate(self._method_specs):
            try:
                method = resolve_method(spec, pl_module, **self.method_kwargs.get(name, {}))
            except TypeError as err:
                raise TypeError(f"methods[{i}] ({name!r}): {err}") from err
            model = getattr(method, "model", None)
            if isinstance(model, nn.Module) and not any(m is model for m in pl_module.modules()):
                raise ValueError(
                    f"methods[{i}] ({name!r}) explains a model that is not part of the LightningModule being trained;"
                    f" build it on the module (e.g. Method(lit_module)) or pass the method's name instead"
                )
            methods.append((name, method))
        self._methods = methods
        self._bound_to = pl_module

    def _should_log(self, trainer: "pl.Trainer") -> bool:
        if trainer.state.fn != "fit":  # validate() was asked for explicitly
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _method_order(self) -> list[tuple[str, Any]]:
        """Methods that have waited longest run first (ties in the configured order), so under a time budget every
        method is logged in turn."""
        return sorted(self._methods, key=lambda m: self._logged_round.get(m[0], -1))

    def _log_maps(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", probes: ProbeSet) -> None:
        from lightning_lens import loggers

        self._bind_methods(pl_module)
        step = loggers.logging_step(trainer)
        start = time.perf_counter()
        computed: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        skipped: list[str] = []
        with preserve_modes(pl_module, mode=False), gradients_enabled():
            inputs = _model_inputs(probes.inputs, pl_module)
            preds, probs = _predict(pl_module, inputs)
            targets = self._targets(probes, preds)
            masks = self._masks(probes, inputs.device)
            for name, method in self._method_order():
                if self._out_of_time(time.perf_counter() - start, name, ran_any=bool(computed)):
                    skipped.append(name)
                    continue
                computed[name], method_scalars = self._explain(name, method, pl_module, inputs, targets, masks)
                scalars.update(method_scalars)
                if self.layout == "per_method":
                    image, caption = self._method_grid(name, probes, computed[name], preds, probs)
                    loggers.log_image(trainer, f"saliency/{name}", image, step=step, caption=caption)
        computed = {name: computed[name] for name, _ in self._methods if name in computed}  # configured order
        if self.layout == "methods_x_probes" and computed:
            image, caption = self._methods_x_probes_grid(computed, probes, preds, probs)
            loggers.log_image(trainer, "saliency/methods_x_probes", image, step=step, caption=caption)
        if self.time_budget is not None:
            scalars["saliency/skipped_methods"] = float(len(skipped))
            self._warn_skipped(skipped, time.perf_counter() - start, step)
        self._rounds += 1
        self._last_attributions = computed
        self._last_targets = targets
        if scalars:
            loggers.log_scalars(trainer, scalars, step=step)

    def _explain(
        self,
        name: str,
        method: Any,
        pl_module: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One method's maps of the probes (CPU, float, non-finite values zeroed) and its scalars."""
        start = time.perf_counter()
        attributions = _check_attributions(method.attribute(inputs, target=targets.to(inputs.device)), inputs, name)
        scalars: dict[str, float] = {}
        if self.quality_metrics:
            quality = self._quality(pl_module, method, inputs, attributions, targets.to(inputs.device), masks)
            scalars.update({f"quality/{name}/{k}": v for k, v in quality.items()})
        seconds = time.perf_counter() - start
        self._last_seconds[name] = seconds
        self._logged_round[name] = self._rounds
        maps = torch.nan_to_num(attributions.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.log_scalars:
            scalars.update({f"saliency/{name}/{k}": v for k, v in _summaries(maps).items()})
            scalars[f"saliency/{name}/seconds"] = seconds
        return maps, scalars

    def _warn_skipped(self, skipped: list[str], elapsed: float, step: int) -> None:
        if skipped:
            rank_zero_warn(
                f"SaliencyMapCallback: time_budget={self.time_budget:g}s was spent after {elapsed:.1f}s; skipped"
                f" {len(skipped)} method(s) at step {step}: {skipped}. The methods that waited longest run first next"
                " time. Raise time_budget or make methods cheaper through method_kwargs (n_samples, n_steps)."
            )

    def _out_of_time(self, elapsed: float, name: str, ran_any: bool) -> bool:
        if self.time_budget is None or not ran_any:  # at least one method always runs
            return False
        return elapsed + self._last_seconds.get(name, 0.0) > self.time_budget

    def _targets(self, probes: ProbeSet, preds: torch.Tensor) -> torch.Tensor:
        if self.target == "prediction":
            return preds
        labels = probes.targets
        if labels is None:
            raise ValueError(
                "SaliencyMapCallback(target='label') found no labels in the validation batches; set target_key to"
                " where they are, or use target='prediction'"
            )
        if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != preds.shape[0]:
            raise ValueError(
                f"SaliencyMapCallback(target='label') needs one integer class index per example, got labels of shape"
                f" {tuple(labels.shape)} and dtype {labels.dtype}; set target_key (a callable works) or use"
                " target='prediction'"
            )
        return labels.long()

    def _masks(self, probes: ProbeSet, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.quality_metrics:
            return {}
        if self.mask_regions is None:
            regions = list(probes.masks)
        else:
            missing = [r for r in self.mask_regions if r not in probes.masks]
            if missing:
                raise ValueError(
                    f"mask_regions={self.mask_regions} names {missing}, which the probes do not carry; available"
                    f" regions (batch keys '<region>_mask'): {sorted(probes.masks)}"
                )
            regions = list(self.mask_regions)
        return {r: probes.masks[r].to(device) for r in regions}

    def _quality(
        self,
        pl_module: nn.Module,
        method: Any,
        inputs: torch.Tensor,
        attributions: torch.Tensor,
        targets: torch.Tensor,
        masks: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        compute_quality = _compute_quality()
        values = compute_quality(
            pl_module, method, inputs, attributions, targets, masks, list(self.quality_metrics),
            options=self.quality_options, seed=self.probe_seed,
        )
        return {str(k): float(v) for k, v in values.items()}

    # ------------------------------------------------------------------------------------------------------ rendering

    def _class(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def _probe_labels(self, probes: ProbeSet, preds: torch.Tensor, probs: torch.Tensor) -> list[str]:
        labels = []
        for i in range(len(probes)):
            parts = []
            if probes.indices is not None:
                parts.append(f"#{int(probes.indices[i])}")
            if probes.targets is not None and probes.targets.dim() == 1:
                parts.append(f"y={self._class(int(probes.targets[i]))}")
            p = int(preds[i])
            parts.append(f"pred={self._class(p)} ({float(probs[i, p]):.2f})")
            labels.append(" ".join(parts))
        return labels

    def _method_grid(
        self, name: str, probes: ProbeSet, attributions: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor
    ) -> tuple[np.ndarray, str]:
        from lightning_lens import render

        cells = []
        for image, attribution in zip(probes.inputs.float(), attributions):
            cells.append([
                render.to_rgb_uint8(image, denormalize=self.denormalize),
                render.heatmap(attribution),
                render.overlay(image, attribution, denormalize=self.denormalize),
            ])
        grid = render.image_grid(
            cells,
            row_labels=self._probe_labels(probes, preds, probs),
            col_labels=["input", name, "overlay"],
            cell_size=self.cell_size,
        )
        caption = f"{name} (target: {self.target}); rows: probes, columns: input, map, overlay"
        return grid, caption

    def _methods_x_probes_grid(
        self, computed: Mapping[str, torch.Tensor], probes: ProbeSet, preds: torch.Tensor, probs: torch.Tensor
    ) -> tuple[np.ndarray, str]:
        from lightning_lens import render

        rows = [[render.to_rgb_uint8(image, denormalize=self.denormalize) for image in probes.inputs.float()]]
        rows += [[render.heatmap(a) for a in attributions] for attributions in computed.values()]
        grid = render.image_grid(
            rows,
            row_labels=["input", *computed],
            col_labels=self._probe_labels(probes, preds, probs),
            cell_size=self.cell_size,
        )
        caption = f"saliency maps (target: {self.target}); rows: input then one per method, columns: probes"
        return grid, caption


# --------------------------------------------------------------------------------------------------------- helpers
def _check_methods(methods: Any) -> list[tuple[str, Any]]:
    """(name, spec) pairs: names in their registry spelling, objects and factories named by ``.name``."""
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise TypeError(
            f"methods must be a list of method names, method objects or factories, got {methods!r}"
            + (f"; did you mean methods=[{methods!r}]?" if isinstance(methods, str) else "")
        )
    if len(methods) == 0:
        raise ValueError("methods is empty; name at least one attribution method, e.g. methods=['gradient']")
    from lightning_lens.attribution import method_name

    specs: list[tuple[str, Any]] = []
    for i, spec in enumerate(methods):
        try:
            name = method_name(spec)
        except (TypeError, ValueError) as err:
            raise type(err)(f"methods[{i}]={spec!r}: {err}") from None
        specs.append((name, name if isinstance(spec, str) else spec))  # aliases ("ig") log under the registry name
    names = [n for n, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"methods contains {duplicates} more than once; each method logs under saliency/<name>, so names must be"
            " unique (give differently configured objects distinct .name attributes)"
        )
    return specs


def _check_method_kwargs(method_kwargs: Any, specs: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    if method_kwargs is None:
        return {}
    if not isinstance(method_kwargs, Mapping):
        raise TypeError(
            f"method_kwargs must be a dict of method name -> dict of keyword arguments, got {method_kwargs!r}"
        )
    from lightning_lens.attribution import canonical_name

    named = [name for name, spec in specs if isinstance(spec, str)]
    out: dict[str, dict[str, Any]] = {}
    for key, kwargs in method_kwargs.items():
        if not isinstance(key, str) or canonical_name(key) not in named:
            raise ValueError(
                f"method_kwargs has an entry for {key!r}, which is not among the methods given by name ({named});"
                " configure method objects directly instead"
            )
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"method_kwargs[{key!r}] must be a dict of keyword arguments, got {kwargs!r}")
        out[canonical_name(key)] = dict(kwargs)
    return out


def _compute_quality() -> Callable[..., Mapping[str, float]]:
    try:
        from lightning_lens.evaluation import compute_quality
    except ImportError as err:
        raise RuntimeError(
            "quality_metrics needs lightning_lens.evaluation.compute_quality, which this installation lacks; leave"
            " quality_metrics empty"
        ) from err
    return compute_quality


def _check_quality_metrics(metrics: Sequence[str]) -> None:
    """Fail at construction for unknown metric names when the evaluation module lists what it offers."""
    _compute_quality()
    from lightning_lens import evaluation

    available = getattr(evaluation, "available_quality_metrics", None)
    if callable(available):
        known = list(available())
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ValueError(f"quality_metrics names unknown metric(s) {unknown}; available: {known}")


def _check_denormalize(denormalize: Any) -> Any:
    if denormalize is None or callable(denormalize):
        return denormalize
    if isinstance(denormalize, Sequence) and not isinstance(denormalize, str) and len(denormalize) == 2:
        mean, std = (list(v) if isinstance(v, Sequence) else [v] for v in denormalize)
        if all(isinstance(v, (int, float)) for v in mean + std) and len(mean) == len(std):
            return (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    raise TypeError(
        f"denormalize must be a callable (C, H, W) -> (C, H, W), a (mean, std) pair of per-channel lists or None,"
        f" got {denormalize!r}"
    )


def _model_inputs(inputs: torch.Tensor, pl_module: nn.Module) -> torch.Tensor:
    """The probes on the module's device, in its floating dtype, as a normal (non-inference) tensor."""
    param = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if not inputs.is_floating_point():
        raise TypeError(
            f"the probes' inputs have dtype {inputs.dtype}; saliency needs floating-point inputs: set input_key to a"
            " callable that returns them as floats"
        )
    return inputs.to(device=device, dtype=dtype).clone()


def _predict(pl_module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, softmax probabilities) of the probes, on the CPU."""
    with torch.no_grad():
        logits = forward_logits(pl_module, inputs)
    probs = logits.detach().float().softmax(dim=1).cpu()
    return probs.argmax(dim=1), probs


def _check_attributions(attributions: Any, inputs: torch.Tensor, name: str) -> torch.Tensor:
    ok = (
        isinstance(attributions, torch.Tensor)
        and attributions.dim() == inputs.dim()
        and attributions.shape[0] == inputs.shape[0]
        and attributions.shape[1] in (1, inputs.shape[1])
    )
    if not ok:
        shape = tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions).__name__
        raise ValueError(
            f"method {name!r} returned attributions of shape {shape} for inputs of shape {tuple(inputs.shape)};"
            " expected (B, C, H, W) or (B, 1, h, w)"
        )
    if not torch.isfinite(attributions).all():
        warnings.warn(
            f"method {name!r} produced non-finite attributions; they are drawn and summarized as 0",
            RuntimeWarning,
            stacklevel=2,
        )
    return attributions


def _summaries(attributions: torch.Tensor) -> dict[str, float]:
    """mean_abs and top10_mass of (B, C, H, W) maps (see the module docstring)."""
    a = torch.nan_to_num(attributions.abs(), nan=0.0, posinf=0.0, neginf=0.0)
    per_pixel = a.sum(dim=1).flatten(1)  # (B, H*W)
    k = max(1, math.ceil(0.1 * per_pixel.shape[1]))
    total = per_pixel.sum(dim=1)
    top = per_pixel.topk(k, dim=1).values.sum(dim=1)
    nonzero = total > 0
    top10 = float((top[nonzero] / total[nonzero]).mean()) if bool(nonzero.any()) else float("nan")
    return {"mean_abs": float(a.mean()), "top10_mass": top10}
