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
``saliency/<method>`` (text)               token ids with ``layer=``: one row per probe, its tokens on backgrounds
                                           coloured by their score (image in TensorBoard; HTML in W&B and the file
                                           logger's ``.html``, via :func:`lightning_lens.loggers.log_html`)
``saliency/<method>`` (tabular)            ``(batch, features)`` inputs with ``feature_names``: a bar chart of the
                                           ``top_k_features`` attributions per probe
``saliency/<method>/<input>``              several inputs (a tuple or dict, ``input_key=(...)``): one image grid or bar
                                           chart per floating-point input (position or key)
``saliency/<method>/mean_abs``             scalar: mean absolute attribution over probes and input elements
``saliency/<method>/top10_mass``           scalar: share of a map's total ``|attribution|`` (summed over channels) held
                                           by its 10% highest pixels, averaged over probes: 0.1 for a flat map, 1.0
                                           when everything sits in a tenth of the image (see
                                           :func:`lightning_lens.evaluation.saliency_summaries`)
``saliency/<method>/seconds``              scalar (``log_timing=True`` only): wall time to compute (and score) the
                                           method's maps this epoch
``saliency/skipped_methods``               scalar (with ``time_budget``, or when ``max_overhead`` deferred methods):
                                           methods deferred to a later epoch for lack of time
``quality/<method>/<metric>``              scalars from :func:`lightning_lens.evaluation.compute_quality` when
                                           ``quality_metrics`` is set; each ``..._chance`` level is drawn on its
                                           metric's chart in TensorBoard's Custom Scalars tab ("quality vs chance")
``lens_errors/SaliencyMapCallback``        text: a failure of one part (a method, the rendering, ``denormalize``)
=========================================  ===========================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_lens._pl import pl, rank_zero_warn
from lightning_lens.attribution import method_specs
from lightning_lens.attribution.base import forward_logits, model_scores
from lightning_lens.callbacks._base import _last_epoch, log
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector
from lightning_lens.utils import BatchAccessor, ProbeSet, gradients_enabled, preserve_modes
from lightning_lens.utils.batch import (
    Inputs,
    Key,
    describe_inputs,
    input_batch_size,
    input_kind,
    input_leaves,
    map_inputs,
    padding_mask,
    token_ids,
)
from lightning_lens.utils.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_instance,
    check_int,
    check_optional,
    check_positive_number,
    check_str_list,
)

__all__ = ["SaliencyMapCallback"]

_TARGETS = ("label", "prediction")
_LAYOUTS = ("per_method", "methods_x_probes")
#: a ``(mean, std)`` pair of per-channel values, to undo input normalization for display
MeanStd = tuple[list[float], list[float]]
#: the default methods, at settings that keep the callback within ``max_overhead=0.05`` of a small model's fit
#: (benchmarks/overhead.py); name a method in ``methods`` to get its own defaults instead.
DEFAULT_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "gradcam")
DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"n_samples": 10},
    "integrated_gradients": {"n_steps": 16},
}
#: methods that explain through a layer's spatial activation
_CAM_METHODS = ("gradcam", "hirescam", "guided_gradcam")
_DRY_RUN_SAMPLES = 2
_DENORMALIZE_FIX = (
    "denormalize must take one input sample (a (C, H, W) tensor) and return a tensor of the same shape, e.g."
    " lambda x: x * std + mean, or be a (mean, std) pair of per-channel lists; the grids are logged without it"
    " meanwhile"
)


class SaliencyMapCallback(ProbeCallback):
    """Log saliency maps of a fixed probe set during validation.

    The probes (``num_probes`` validation examples spread over classes, drawn by dataset position with a private
    generator seeded by ``probe_seed``, so 1 and N processes agree) are drawn once, at the first logged epoch, or
    passed explicitly. Other lightning-lens callbacks with the same ``num_probes`` and ``probe_seed`` share them; they
    stay fixed across epochs and checkpoint resume. On every due epoch (see below) each method explains the probes
    with the unwrapped LightningModule in eval mode, with gradients taken only with respect to the inputs: training is
    never changed (no parameter ``.grad``, modes and buffers restored, no global RNG), and it works under
    ``trainer.validate()`` with ``inference_mode=True``. Rank zero computes, renders and logs through
    :mod:`lightning_lens.loggers` (TensorBoard, W&B, CSV/files); the tags are listed in the module docstring.

    **When.** Every ``every_n_epochs``-th epoch counted from one, always the first and the last epoch of a fit and
    every ``trainer.validate()``. With ``max_overhead`` (default 5 % of the fit's time) the epochs in between are
    spaced so that the callback's cumulative time stays within it, and within a logged epoch methods whose cost
    (measured at their last run, or at setup) would break the budget are deferred. The method that waited longest
    runs even if it takes longer than ``time_budget``, and deferred methods run first the next time, so every method
    is logged in turn; past ``max_overhead`` it runs only at the first and the last epoch.

    **Checks at setup.** Before the first training step, one validation batch checks the configuration: the batch
    keys, the labels, ``denormalize`` against the channel count, the model's ``(batch, classes)`` output and a dry
    run of every method (and quality metric) on two samples; errors name the argument. The default methods leave
    Grad-CAM out (with an info line) when the model has no layer with a spatial output (an MLP, a transformer).

    **Failures.** A method, the rendering or ``denormalize`` that raises during fit is reported once (a warning naming
    the callback, the epoch and the exception, plus a ``lens_errors/SaliencyMapCallback`` text entry) and training
    continues; a part failing ``max_failures`` times in a row is switched off, the others keep logging. A failing
    ``denormalize`` leaves the grids undenormalized. ``strict=True`` raises instead.

    Args:
        methods: attribution methods, as :func:`lightning_lens.attribution.resolve_method` takes them: registry names
            (see :func:`lightning_lens.attribution.available_methods`), ``(name, kwargs)`` pairs,
            :class:`~lightning_lens.attribution.base.Attribution` objects built on this LightningModule (or one of its
            submodules), or callables ``model -> Attribution`` such as a method class. Default (None): gradient,
            SmoothGrad with 10 samples, Integrated Gradients with 16 steps and Grad-CAM (when the model has a spatial
            layer); methods named explicitly get their own defaults.
        method_kwargs: keyword arguments per method name for the named methods, e.g.
            ``{"smoothgrad": {"n_samples": 20}, "gradcam": {"layer": "model.features.6"}}``.
        num_probes: how many validation examples to explain.
        probe_seed: seed of the private generator that picks the probes.
        probes: an explicit :class:`~lightning_lens.utils.ProbeSet` (then nothing is drawn).
        every_n_epochs: log on every n-th epoch during ``fit`` (``trainer.validate()`` always logs).
        target: explain the ``"label"`` class or the model's ``"prediction"``.
        input_key: where the inputs are in a batch (int position, dict key or callable); default: see
            :class:`~lightning_lens.utils.BatchAccessor`.
        target_key: where the labels are.
        index_key: where the dataset indices are (shown in row labels; default: the position in the dataset).
        denormalize: undoes the input normalization for display only: a callable on one input sample (e.g.
            ``lambda x: x * std + mean``) or a ``(mean, std)`` pair of per-channel lists (handy in YAML).
        class_names: names shown instead of class indices in labels.
        time_budget: seconds allowed per logged epoch. Each method's cost is estimated from its last run (before
            that, from the setup dry run); a method that would exceed the budget is deferred with a warning (counted
            in ``saliency/skipped_methods``) and runs first the next time. An epoch takes at most ``time_budget``
            plus one method's cost.
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
        log_timing: also log ``saliency/<method>/seconds`` (off by default: it is about the machine, not the model).
        layer: explain the output of this module (a module or its dotted name) with the methods that support it
            (gradient, gradient×input, SmoothGrad, VarGrad, Integrated Gradients). Required for token ids: the
            embedding layer, e.g. ``"model.token_embedding"``; the maps are then one score per token (see
            ``token_reduce``). Text batches are dicts with ``input_ids`` (and ``attention_mask``), passed to the
            model as keyword arguments; multi-input batches are selected with ``input_key=("image", "meta")``.
        tokenizer: decodes token ids for display: a HuggingFace tokenizer (``convert_ids_to_tokens``), anything with
            ``decode``, or a vocabulary list (id -> token); special tokens and padding are hidden. Text maps are
            logged as an image (TensorBoard) and as HTML (W&B, files) through ``log_html``.
        feature_names: names of the columns of ``(batch, features)`` float inputs: the maps are then drawn as bar
            charts of the ``top_k_features`` features per probe (tabular data) instead of images.
        token_reduce: ``"sum"`` or ``"l2"`` over the hidden dimension: one score per token.
        top_k_features: features per probe in the tabular bar charts.
        output_fn: maps the LightningModule's output to ``(batch, classes)`` scores, e.g. ``lambda out: out["scores"]``.
            Not needed for a tensor, a tuple (its first element) or a mapping / HuggingFace ``ModelOutput`` with
            ``"logits"`` (a ``BertForSequenceClassification``'s output works as it is); used for the probes'
            predictions and by the methods given by name (method objects bring their own ``output_fn``).
        cell_size: pixel size of one grid cell (images are upscaled with nearest neighbours); ``None``: the
            renderer's default.
        max_overhead: the callback's share of the fit's time (0.05 = 5 %); None: no limit.
        strict: raise exceptions from the callback's own work instead of reporting them and continuing.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: failures in a row after which one part (a method, the rendering) is switched off.

    Raises:
        ValueError: for an unknown method name (the message lists the available ones), a duplicate method,
            ``method_kwargs`` for a method not in ``methods``, ``num_probes < 1``, ``every_n_epochs < 1``, a
            ``target`` or ``layout`` outside the choices, or a non-positive ``time_budget``; at setup, for a
            configuration the model or the data cannot serve (see "Checks at setup").
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
        checkpoint state key includes the method names, the target and the layout.
    """

    def __init__(
        self,
        methods: Optional[Sequence[Union[str, Any]]] = None,
        method_kwargs: Optional[dict[str, dict[str, Any]]] = None,
        num_probes: int = 8,
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
        cell_size: Optional[int] = 96,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
        log_timing: bool = False,
        layer: Optional[Union[str, nn.Module]] = None,
        tokenizer: Any = None,
        feature_names: Optional[Sequence[str]] = None,
        token_reduce: Literal["sum", "l2"] = "sum",
        top_k_features: int = 10,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    ) -> None:
        super().__init__(
            every_n_epochs=check_int(every_n_epochs, "every_n_epochs", minimum=1),
            max_overhead=max_overhead,
            strict=strict,
            verbose=verbose,
            max_failures=max_failures,
        )
        self.default_methods = methods is None
        self._method_specs = method_specs(DEFAULT_METHODS if methods is None else methods, "methods")
        self.method_kwargs = _check_method_kwargs(method_kwargs, self._method_specs)
        defaults = DEFAULT_METHOD_KWARGS if self.default_methods else {}
        self._kwargs = {  # what the methods are built with: the callback's settings for its default methods
            name: {**defaults.get(name, {}), **self.method_kwargs.get(name, {})} for name, _ in self._method_specs
        }
        self.num_probes = check_int(num_probes, "num_probes", minimum=1)
        self.probe_seed = check_int(probe_seed, "probe_seed")
        self.target = check_choice(target, "target", _TARGETS)
        self.layout = check_choice(layout, "layout", _LAYOUTS)
        self.denormalize = _check_denormalize(denormalize)
        self.class_names = check_optional(_str_list, class_names, "class_names")
        self.time_budget = check_optional(check_positive_number, time_budget, "time_budget")
        self.quality_metrics = check_str_list(quality_metrics, "quality_metrics")
        self.quality_options = _check_quality_options(quality_options)
        self.mask_regions = check_optional(check_str_list, mask_regions, "mask_regions")
        self.log_scalars = check_bool(log_scalars, "log_scalars")
        self.log_timing = check_bool(log_timing, "log_timing")
        self.layer = check_optional(check_instance, layer, "layer", (str, nn.Module),
                                    hint="a module of the model or its dotted name, e.g. 'model.token_embedding'")
        self.tokenizer = _check_tokenizer(tokenizer)
        self.feature_names = check_optional(_str_list, feature_names, "feature_names")
        self.token_reduce = check_choice(token_reduce, "token_reduce", ("sum", "l2"))
        self.top_k_features = check_int(top_k_features, "top_k_features", minimum=1)
        self.output_fn = check_optional(check_callable, output_fn, "output_fn",
                                        hint="the model's output -> (batch, classes) scores")
        self._kind: Optional[str] = None  # what the probes hold: image, tabular, text or multi (decided at setup)
        self._grid_epoch: Optional[int] = None  # the epoch of the grids being drawn (named in their titles)
        self.cell_size = check_optional(check_int, cell_size, "cell_size", minimum=8)
        if self.quality_metrics:
            _check_quality_metrics(self.quality_metrics)

        self._accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._collector = ProbeCollector(self.num_probes, self._accessor, self.probe_seed, probes, owner=self)
        self._methods: list[tuple[str, Any]] = []  # (name, bound method object), built in setup
        self._bound_to: Optional[nn.Module] = None
        self._left_out: set[str] = set()  # default methods the model cannot serve (Grad-CAM on an MLP)
        self._estimates: dict[str, float] = {}  # method -> seconds for all probes, from the dry run
        self._attempted: dict[str, int] = {}  # method -> when it last ran (or failed), counted in method runs
        self._runs = 0
        self.method_epochs: dict[str, list[int]] = {}  # method -> epochs of fit whose maps it logged (summary)
        self._last_attributions: dict[str, torch.Tensor] = {}
        self._last_targets: Optional[torch.Tensor] = None
        self.last_scalars: dict[str, float] = {}  # the last logged epoch's scalars (summary)

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def last_attributions(self) -> dict[str, torch.Tensor]:
        """The maps of the last logged epoch (rank zero): method name -> CPU float tensor, probes in order (for token
        ids one score per token, ``(probes, tokens)``; for several inputs a tuple or dict of the floating inputs'
        maps)."""
        return dict(self._last_attributions)

    @property
    def last_targets(self) -> Optional[torch.Tensor]:
        """The classes the last logged maps explain (labels or predictions, per ``target``)."""
        return self._last_targets

    @property
    def method_names(self) -> list[str]:
        """Names of the methods in use, in order (also the tag names); default methods the model cannot serve are
        left out once the callback is set up."""
        return [name for name, _ in self._method_specs if name not in self._left_out]

    def _state_key_fields(self) -> dict[str, Any]:
        return {"methods": [name for name, _ in self._method_specs], "target": self.target, "layout": self.layout}

    # ----------------------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._bind_methods(pl_module)
        if stage == "fit":
            self.method_epochs = {}
        if not trainer.loggers:
            rank_zero_warn(
                "SaliencyMapCallback has no logger to write to (Trainer(logger=False)); the maps are still computed"
                " and available as `.last_attributions`. Pass a logger, e.g. TensorBoardLogger('lens_logs')."
            )

    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        self._check_setup(trainer, pl_module, batch)  # its time counts against max_overhead (the base's dry run)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.is_due(trainer):  # a collective under DDP, as finalize may be: every rank gets here
            return
        probes = self._collector.finalize(trainer)
        if probes is None or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        self._log_maps(trainer, pl_module, probes)
        self.record_run_cost(time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------------- setup checks
    def _bind_methods(self, pl_module: nn.Module) -> None:
        """Build (or rebuild, for a new module) the method objects on the unwrapped LightningModule."""
        if self._bound_to is pl_module and self._methods:
            return
        from lightning_lens.attribution import resolve_method

        methods = []
        for i, (name, spec) in enumerate(self._method_specs):
            kwargs = self._kwargs.get(name, {})
            if self.output_fn is not None and isinstance(spec, (str, tuple)) and "output_fn" not in kwargs:
                kwargs = {**kwargs, "output_fn": self.output_fn}  # named methods score the model as the callback does
            try:
                method = resolve_method(spec, pl_module, **kwargs)
                if self.layer is not None and "layer" not in kwargs and getattr(method, "supports_layer", False) \
                        and isinstance(spec, (str, tuple)):  # named methods explain the layer given to the callback
                    method = resolve_method(spec, pl_module, **{**kwargs, "layer": self.layer})
            except (TypeError, ValueError) as err:
                raise type(err)(f"methods[{i}] ({name!r}): {err}") from err
            model = getattr(method, "model", None)
            if isinstance(model, nn.Module) and not any(m is model for m in pl_module.modules()):
                raise ValueError(
                    f"methods[{i}] ({name!r}) explains a model that is not part of the LightningModule being trained;"
                    f" build it on the module (e.g. Method(lit_module)) or pass the method's name instead"
                )
            methods.append((name, method))
        self._methods = methods
        self._bound_to = pl_module

    def _check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        self._bind_methods(pl_module)
        explicit = self._collector.probes if self._collector.explicit else None
        if explicit is not None:
            sample = explicit.select(torch.arange(min(_DRY_RUN_SAMPLES, len(explicit))))
        elif batch is None:
            return  # no validation data: nothing to check against (and nothing will be logged)
        else:
            sample = self._sample_of(batch)
        inputs = sample.inputs
        self._kind = self._check_inputs(inputs)
        if self.target == "label":
            _check_labels(sample.targets, "the probes" if explicit is not None else "the validation batches")
        self._check_masks(sample)
        if isinstance(self.denormalize, tuple):
            _check_mean_std(self.denormalize, inputs)  # type: ignore[arg-type]
        elif self.denormalize is not None:  # a user callable: a failure is reported, the run goes on without it
            self.run_part(trainer, "denormalize", _apply_denormalize, self.denormalize, inputs[:1],  # type: ignore
                          hint=_DENORMALIZE_FIX)
        with preserve_modes(pl_module, mode=False), gradients_enabled():
            x = _model_inputs(inputs, pl_module)
            try:
                with torch.no_grad():
                    output = _call_model(pl_module, x)
            except Exception as err:
                raise ValueError(
                    f"SaliencyMapCallback: the LightningModule's forward failed on the inputs input_key selects"
                    f" ({_shape_text(inputs)}): {type(err).__name__}: {err}. Set input_key to"
                    " what the module's forward takes, or wrap the module so that forward maps those inputs to"
                    " (batch, classes) logits"
                ) from err
            n = input_batch_size(x)
            try:  # the one normalization the methods use: tensor, tuple, mapping / ModelOutput "logits", output_fn
                logits = model_scores(output, n, self.output_fn)
            except (TypeError, ValueError) as err:
                got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"SaliencyMapCallback: the LightningModule's forward returns {got} for {n} inputs, which gives no"
                    f" (batch, classes) logits ({err}). Give the callback output_fn= (the model's output -> (batch,"
                    " classes) scores), or make forward return the logits"
                ) from err
            targets = self._targets(sample, logits.argmax(dim=1).cpu()).to(logits.device)
            _check_targets_fit(targets, logits, self.target)
            self._adapt_methods(pl_module, x)
            masks = self._masks(sample, logits.device)
            for i, (name, method) in enumerate(self._methods):
                if name in self._left_out:
                    continue
                self._dry_run_method(i, name, method, pl_module, x, targets, masks)

    def _sample_of(self, batch: Any) -> ProbeSet:
        """The first samples of a validation batch as a probe set; missing keys are configuration errors."""
        try:
            sample = ProbeSet.from_batch(batch, self._accessor)
        except KeyError as err:
            raise ValueError(f"SaliencyMapCallback: {err.args[0]}") from None
        return sample.select(torch.arange(min(_DRY_RUN_SAMPLES, len(sample))))

    def _adapt_methods(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        """Leave Grad-CAM out of the default methods when no layer has a spatial output."""
        cams = [name for name, _ in self._methods if name in _CAM_METHODS]
        if not cams or _spatial_layers(pl_module, _first_rows(x, 1)):
            return
        if self.default_methods:
            self._left_out.update(cams)
            log.info(
                "SaliencyMapCallback: the model has no layer with a spatial (batch, channels, height, width) output,"
                f" so {', '.join(cams)} is left out of the default methods"
            )
            return
        i = next(i for i, (name, _) in enumerate(self._methods) if name in cams)
        raise ValueError(
            f"methods[{i}]={cams[0]!r} needs a layer with a spatial (batch, channels, height, width) output larger than"
            " 1x1, and the model has none (an MLP or a transformer?); remove it from methods, or pass"
            f" method_kwargs={{{cams[0]!r}: {{'layer': '<module name>'}}}} with a layer that has one"
        )

    def _dry_run_method(
        self, i: int, name: str, method: Any, pl_module: nn.Module, x: torch.Tensor, targets: torch.Tensor,
        masks: dict[str, torch.Tensor],
    ) -> None:
        start = time.perf_counter()
        try:
            attributions = _check_attributions(method.attribute(x, target=targets), x, name)
        except Exception as err:
            raise ValueError(
                f"methods[{i}] ({name!r}) failed on {input_batch_size(x)} validation sample(s) at setup with"
                f" {type(err).__name__}: {err}; fix its options (method_kwargs={{{name!r}: ...}}) or remove it from"
                " methods"
            ) from err
        layer = _cam_layer(method)
        if layer is not None:
            shape = _output_shape(pl_module, layer, _first_rows(x, 1))
            # (B, N, D) tokens of a vision transformer: the CAM reshaped them to a patch grid (it ran above)
            if shape is not None and len(shape) != 3 and (len(shape) != 4 or shape[2] * shape[3] <= 1):
                raise ValueError(
                    f"methods[{i}] ({name!r}) uses a layer whose output has shape {shape}: a Grad-CAM map needs a"
                    " spatial (batch, channels, height, width) output larger than 1x1; pass"
                    f" method_kwargs={{{name!r}: {{'layer': '<module name>'}}}} with an earlier convolutional layer"
                )
        if self.quality_metrics:
            try:
                self._quality(pl_module, method, x, attributions, targets, masks)
            except Exception as err:
                raise ValueError(
                    f"quality_metrics={list(self.quality_metrics)} failed for {name!r} on {input_batch_size(x)}"
                    " validation"
                    f" sample(s) at setup with {type(err).__name__}: {err}; check quality_options and mask_regions"
                ) from err
        self._estimates[name] = (time.perf_counter() - start) * self.num_probes / input_batch_size(x)

    def _check_masks(self, sample: ProbeSet) -> None:
        if not self.quality_metrics or self.mask_regions is None:
            return
        missing = [r for r in self.mask_regions if r not in sample.masks]
        if missing:
            raise ValueError(
                f"mask_regions={self.mask_regions} names {missing}, which the probes do not carry; available"
                f" regions (batch keys '<region>_mask'): {sorted(sample.masks)}"
            )

    # ------------------------------------------------------------------------------------------ text, tabular, multi
    def _check_inputs(self, inputs: Inputs) -> str:
        """The probes' input kind, with the configuration errors it implies (at setup)."""
        kind = input_kind(inputs, tabular=self.feature_names is not None)
        if kind == "image":
            _check_input_layout(inputs)  # type: ignore[arg-type]
            return kind
        if kind == "text" and self.layer is None:
            from lightning_lens.attribution.layer import find_embedding

            embedding = find_embedding(self._bound_to)
            raise TypeError(
                f"SaliencyMapCallback: the inputs hold token ids ({describe_inputs(inputs)}), which have no gradient;"
                f" pass layer={embedding or '<the embedding module>'!r} to explain the output of the embedding layer"
                " (one score per token)"
            )
        ids = token_ids(inputs)
        if kind == "text" and ids is not None and self.tokenizer is not None and not _decodes(self.tokenizer, ids):
            raise ValueError(
                f"tokenizer could not decode the batch's token ids (largest id {int(ids.max())}); pass the tokenizer"
                " or vocabulary the data was encoded with"
            )
        if kind == "tabular" and self.feature_names is not None and len(self.feature_names) != inputs.shape[1]:
            raise ValueError(
                f"feature_names has {len(self.feature_names)} names, but the inputs have {inputs.shape[1]} columns"
                " (batch, features); give one name per column"
            )
        problems = [("layout='methods_x_probes'", self.layout != "per_method"),
                    ("quality_metrics", bool(self.quality_metrics)),
                    ("denormalize", self.denormalize is not None)]
        for argument, used in problems:
            if used:
                raise ValueError(
                    f"SaliencyMapCallback: {argument} applies to image inputs; these are {kind} inputs"
                    f" ({describe_inputs(inputs)}): leave {argument.split('=')[0]} at its default"
                )
        return kind

    def _maps(self, attributions: Any, inputs: Inputs) -> Any:
        """What is drawn and summarized, on the CPU in float: one score per token for text (the layer's attributions
        reduced over the hidden dimension), the attributions of the floating inputs for several inputs (a tuple with
        None for integer inputs, or a dict without them), else the attributions."""
        if isinstance(attributions, torch.Tensor):
            maps = attributions.detach().float().cpu()
            ids = token_ids(inputs)
            if ids is not None and maps.dim() >= 3 and tuple(maps.shape[:2]) == tuple(ids.shape):
                from lightning_lens.attribution.layer import reduce_tokens

                maps = reduce_tokens(maps, how=self.token_reduce)
            return maps
        if isinstance(attributions, Mapping):
            return {k: v.detach().float().cpu() for k, v in attributions.items()
                    if isinstance(v, torch.Tensor) and isinstance(inputs, Mapping) and inputs[k].is_floating_point()}
        return tuple(v.detach().float().cpu() if isinstance(v, torch.Tensor) and x.is_floating_point() else None
                     for v, x in zip(attributions, inputs))

    def _tokens(self, ids: torch.Tensor) -> list[str]:
        from lightning_lens import render

        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return render.decode_tokens(ids, self.tokenizer)

    def _log_structured(self, trainer: "pl.Trainer", name: str, probes: ProbeSet, maps: Any, preds: torch.Tensor,
                        probs: torch.Tensor, step: int) -> None:
        """Token maps (image and HTML), feature bar charts, or one of those per input of a multi-input model."""
        from lightning_lens import loggers, render

        tag = f"saliency/{loggers.sanitize_tag(name)}"
        labels = self._probe_labels(probes, preds, probs)
        inputs = probes.inputs
        if self._kind == "text" and isinstance(maps, torch.Tensor):
            ids = token_ids(inputs)
            assert ids is not None
            padding = padding_mask(inputs)
            special = render.special_token_ids(self.tokenizer) if self.tokenizer is not None else set()
            hide = [[int(t) in special or bool(padding is not None and padding[i, j]) for j, t in enumerate(row)]
                    for i, row in enumerate(ids.tolist())]
            tokens = [self._tokens(row) for row in ids]
            image = render.text_heatmap(tokens, maps, labels=labels, hide=hide)
            fragment = render.text_html(tokens, maps, labels=labels, hide=hide)
            caption = (f"{name} (target: {self.target}) per token ({self.token_reduce} over the layer's hidden"
                       " dimension); red positive, blue negative, each row scaled to its largest |score|")
            loggers.log_html(trainer, tag, fragment, step=step, image=image, caption=caption)
            return
        if isinstance(maps, torch.Tensor):
            parts: list[tuple[str, torch.Tensor, torch.Tensor]] = [("", input_leaves(inputs)[0], maps)]
        elif isinstance(maps, Mapping):
            parts = [(f"/{k}", inputs[k], m) for k, m in maps.items()]  # type: ignore[index]
        else:
            parts = [(f"/{j}", x, m) for j, (x, m) in enumerate(zip(input_leaves(inputs), maps)) if m is not None]
        for suffix, x, m in parts:
            part_tag = f"{tag}/{loggers.sanitize_tag(suffix[1:])}" if suffix else tag
            if m.dim() == 2:
                names = self.feature_names if self.feature_names is not None and len(self.feature_names) == m.shape[1] \
                    else None
                image = render.feature_bars(m, names, labels=labels, top_k=self.top_k_features,
                                            title=f"{name}{suffix} (target: {self.target})")
                caption = f"{name}{suffix}: top {self.top_k_features} features per probe; red positive, blue negative"
            else:
                image, caption = self._method_grid(f"{name}{suffix}", probes, x, m, preds, probs)
            loggers.log_image(trainer, part_tag, image, step=step, caption=caption)

    # ------------------------------------------------------------------------------------------------- logged epochs
    def _log_maps(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", probes: ProbeSet) -> None:
        from lightning_lens import loggers

        self._bind_methods(pl_module)
        step = loggers.logging_step(trainer)
        self._grid_epoch = int(trainer.current_epoch)
        start = time.perf_counter()
        limit, reason = self._epoch_limit(trainer)
        computed: dict[str, torch.Tensor] = {}
        scalars: dict[str, float] = {}
        deferred: list[str] = []
        with preserve_modes(pl_module, mode=False), gradients_enabled():
            inputs = _model_inputs(probes.inputs, pl_module)
            preds, probs = _predict(pl_module, inputs, self.output_fn)
            targets = self._targets(probes, preds)
            masks = self._masks(probes, _device(inputs))
            display = self._display_images(trainer, probes.inputs)
            # the method that waited longest runs even past time_budget (so every method is logged in turn), and
            # past max_overhead only at the first and the last epoch; the others when their estimated cost fits
            overhead = None if self.is_mandatory_epoch(trainer) else self._overhead_allowance(trainer)
            for k, (name, method) in enumerate(self._method_order()):
                first = k == 0 and (overhead is None or self._fits(name, 0.0, overhead))
                if first or self._fits(name, time.perf_counter() - start, limit):
                    self._run_method(trainer, name, method, pl_module, probes, display, inputs, targets, masks,
                                     preds, probs, step, computed, scalars)
                else:
                    deferred.append(name)
        computed = {name: computed[name] for name in self.method_names if name in computed}  # configured order
        if self.layout == "methods_x_probes" and computed:
            self.run_part(trainer, "render", self._log_methods_x_probes_grid, trainer, computed, probes, display,
                          preds, probs, step)
        if self.time_budget is not None or deferred:
            scalars["saliency/skipped_methods"] = float(len(deferred))
        if deferred:
            self._report_deferred(trainer, deferred, reason, limit, time.perf_counter() - start, step)
        self._last_attributions = computed
        self._last_targets = targets
        self.last_scalars = dict(scalars)  # for the end-of-fit summary
        if scalars:
            self.run_part(trainer, "log", loggers.log_scalars, trainer, scalars, step=step)
            chance = _chance_layout(scalars)
            if chance:
                self.run_part(trainer, "log", loggers.log_scalar_layout, trainer, chance, step=step)

    def _run_method(
        self, trainer: "pl.Trainer", name: str, method: Any, pl_module: nn.Module, probes: ProbeSet,
        display: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, masks: dict[str, torch.Tensor],
        preds: torch.Tensor, probs: torch.Tensor, step: int, computed: dict[str, torch.Tensor],
        scalars: dict[str, float],
    ) -> None:
        """One method as a part, then its grid as another part (``layout="per_method"``)."""
        self._runs += 1
        self._attempted[name] = self._runs
        out = self.run_part(trainer, f"method:{name}", self._explain, name, method, pl_module, inputs, targets, masks)
        if out is None:
            return
        computed[name], method_scalars = out
        scalars.update(method_scalars)
        if trainer.state.fn == "fit":
            epochs = self.method_epochs.setdefault(name, [])
            if int(trainer.current_epoch) not in epochs:
                epochs.append(int(trainer.current_epoch))
        if self.layout == "per_method":
            self.run_part(trainer, f"render:{name}", self._log_method_grid, trainer, name, probes, display,
                          computed[name], preds, probs, step)

    def _method_order(self) -> list[tuple[str, Any]]:
        """Methods in use that are switched on; the one that has waited longest runs first (never-run ones in the
        configured order), so under a budget every method is logged in turn."""
        active = [(n, m) for n, m in self._methods if n not in self._left_out and f"method:{n}" not in self.disabled]
        return sorted(active, key=lambda m: self._attempted.get(m[0], -1))

    def _estimate(self, name: str) -> Optional[float]:
        """Seconds one method takes this epoch with its grid: its last run, else the setup dry run's extrapolation;
        a grid not drawn yet is costed like the dearest grid drawn so far."""
        method = self.part_seconds.get(f"method:{name}", self._estimates.get(name))
        if method is None:
            return None
        grids = [s for part, s in self.part_seconds.items() if part.startswith("render:")]
        return method + self.part_seconds.get(f"render:{name}", max(grids, default=0.0))

    def _fits(self, name: str, elapsed: float, limit: Optional[float]) -> bool:
        """Whether the method may start now: a measured one if its estimate fits the time left, an unmeasured one
        while time is left. With the first method, which always runs, an epoch ends within ``limit`` plus one
        method's cost."""
        if limit is None:
            return True
        estimate = self._estimate(name)
        if estimate is None:
            return elapsed < limit
        return elapsed + estimate <= limit

    def _epoch_limit(self, trainer: "pl.Trainer") -> tuple[Optional[float], str]:
        """Seconds this epoch's methods may take: ``time_budget`` and the share of ``max_overhead`` left for it."""
        limits: list[tuple[float, str]] = []
        if self.time_budget is not None:
            limits.append((self.time_budget, "time_budget"))
        allowance = self._overhead_allowance(trainer)
        if allowance is not None:
            limits.append((allowance, "max_overhead"))
        if not limits:
            return None, ""
        return min(limits)

    def _overhead_allowance(self, trainer: "pl.Trainer") -> Optional[float]:
        """What is left of the fit's overhead budget (this callback's and the trainer's group budget), after the last
        epoch's full run when this is not the last."""
        if self.budget.started is None or trainer.state.fn != "fit":
            return None
        epoch, last = int(trainer.current_epoch), _last_epoch(trainer)
        before_last = last is not None and epoch < last
        reserve = self.last_epoch_reserve() if before_last else 0.0
        left = self.budget.left(epoch, None if last is None else last + 1, reserve=reserve)
        return None if left is None else max(0.0, left)

    def last_epoch_reserve(self) -> float:
        """Every method with its grid, at its last measured cost (the last epoch's maps are the ones that matter)."""
        estimates = [self._estimate(name) for name, _ in self._method_order()]
        known = [e for e in estimates if e is not None]
        return sum(known) if known else self._run_cost

    def _report_deferred(
        self, trainer: "pl.Trainer", deferred: list[str], reason: str, limit: Optional[float], elapsed: float,
        step: int,
    ) -> None:
        epoch = int(trainer.current_epoch)
        if reason == "time_budget":
            message = (
                f"SaliencyMapCallback: time_budget={self.time_budget:g}s was spent after {elapsed:.1f}s; skipped"
                f" {len(deferred)} method(s) at epoch {epoch} (step {step}): {deferred}. They run first next time."
                " Raise time_budget or make methods cheaper through method_kwargs (n_samples, n_steps)."
            )
            self.warn_once("time_budget", message)
        else:
            message = (
                f"SaliencyMapCallback: deferred {deferred} at epoch {epoch} to stay within"
                f" max_overhead={self.budget.max_overhead:g} of the fit's time ({limit or 0.0:.2f}s left for this"
                " epoch); they run first next time. Raise max_overhead, or make methods cheaper through method_kwargs"
                " (n_samples, n_steps) or num_probes."
            )
        log.info(message)

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
        from lightning_lens.evaluation import saliency_summaries

        start = time.perf_counter()
        target = targets.to(_device(inputs))
        attributions = _check_attributions(method.attribute(inputs, target=target), inputs, name)
        scalars: dict[str, float] = {}
        if self.quality_metrics:
            quality = self._quality(pl_module, method, inputs, attributions, target, masks)
            scalars.update({f"quality/{name}/{k}": v for k, v in quality.items()})
        seconds = time.perf_counter() - start
        maps = self._maps(attributions, inputs)
        bad = sum(int((~torch.isfinite(m)).sum()) for m in _map_leaves(maps))
        if bad:
            self.warn_once(
                f"nonfinite:{name}",
                f"SaliencyMapCallback: method {name!r} produced {bad} non-finite attribution values;"
                " they are drawn and summarized as 0",
            )
            maps = _map_structure(lambda m: torch.where(torch.isfinite(m), m, torch.zeros(())), maps)
        if self.log_scalars:
            flat = torch.cat([m.flatten(1) for m in _map_leaves(maps)], dim=1)
            scalars.update({f"saliency/{name}/{k}": v for k, v in saliency_summaries(flat).items()})
            if self.log_timing:
                scalars[f"saliency/{name}/seconds"] = seconds
        return maps, scalars

    def _targets(self, probes: ProbeSet, preds: torch.Tensor) -> torch.Tensor:
        if self.target == "prediction":
            return preds
        _check_labels(probes.targets, "the probes")
        labels = probes.targets
        assert labels is not None
        if labels.shape[0] != preds.shape[0]:
            raise ValueError(
                f"SaliencyMapCallback(target='label') needs one label per probe, got {labels.shape[0]} labels for"
                f" {preds.shape[0]} probes; set target_key (a callable works) or use target='prediction'"
            )
        return labels.long()

    def _masks(self, probes: ProbeSet, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.quality_metrics:
            return {}
        self._check_masks(probes)
        regions = list(probes.masks) if self.mask_regions is None else list(self.mask_regions)
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
            pl_module, method, inputs, attributions, targets, {r: m[: inputs.shape[0]] for r, m in masks.items()},
            list(self.quality_metrics), options=self.quality_options, seed=self.probe_seed,
        )
        return {str(k): float(v) for k, v in values.items()}

    # ------------------------------------------------------------------------------------------------------ rendering
    def _display_images(self, trainer: "pl.Trainer", inputs: torch.Tensor) -> torch.Tensor:
        """The probes as shown: denormalized when ``denormalize`` is given and works (a part: a failure is
        reported and the raw inputs are shown)."""
        if self.denormalize is None:
            return inputs
        shown = self.run_part(trainer, "denormalize", _apply_denormalize, self.denormalize, inputs,
                              hint=_DENORMALIZE_FIX)
        return inputs if shown is None else shown

    def _class(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def _probe_labels(self, probes: ProbeSet, preds: torch.Tensor, probs: torch.Tensor) -> list[str]:
        labels = []
        wrong = self._wrong(probes, preds)
        for i in range(len(probes)):
            parts = []
            if probes.indices is not None:
                parts.append(f"#{int(probes.indices[i])}")
            if probes.targets is not None and probes.targets.dim() == 1:
                parts.append(f"y={self._class(int(probes.targets[i]))}")
            p = int(preds[i])
            parts.append(f"pred={self._class(p)} ({float(probs[i, p]):.2f})")
            if wrong[i]:
                parts.append("WRONG")
            labels.append(" ".join(parts))
        return labels

    def _wrong(self, probes: ProbeSet, preds: torch.Tensor) -> list[bool]:
        """Per probe: the prediction differs from its label (all False without class labels)."""
        labels = probes.targets
        if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != preds.shape[0]:
            return [False] * int(preds.shape[0])
        return [bool(w) for w in (labels.cpu().long() != preds.cpu().long())]

    def _grid_title(self, what: str) -> str:
        epoch = "" if self._grid_epoch is None else f", epoch {self._grid_epoch}"
        return f"{what} (target: {self.target}{epoch})"

    def _method_grid(
        self,
        name: str,
        probes: ProbeSet,
        display: torch.Tensor,
        attributions: torch.Tensor,
        preds: torch.Tensor,
        probs: torch.Tensor,
    ) -> tuple[np.ndarray, str]:
        from lightning_lens import render

        maps = _as_images(attributions)
        signed = _any_negative(maps)  # one colour scale for the whole grid, shown beside it
        wrong = self._wrong(probes, preds)
        cells, captions, frames = [], [], []
        for image, attribution, miss in zip(_as_images(display.float()), maps, wrong):
            cells.append([render.to_rgb_uint8(image), render.heatmap(attribution, signed=signed),
                          render.overlay(image, attribution, signed=signed)])
            captions.append([None, _zero_note(name, attribution), None])
            frames.append([render.MISTAKE_COLOR if miss else None, None, None])
        grid = render.image_grid(
            cells,
            row_labels=self._probe_labels(probes, preds, probs),
            col_labels=["input", name, "overlay"],
            cell_size=self.cell_size,
            title=self._grid_title(name),
            cell_captions=captions if any(c[1] for c in captions) else None,
            row_label_colors=[render.MISTAKE_COLOR if miss else None for miss in wrong],
            cell_frames=frames,
            colorbar="signed" if signed else "absolute",
            colorbar_labels=_SCALE_LABELS[signed],
        )
        caption = (f"{name} (target: {self.target}); rows: probes, columns: input, map, overlay; "
                   + _legend(signed, any(wrong), [c[1] for c in captions]))
        return grid, caption

    def _log_method_grid(self, trainer: "pl.Trainer", name: str, probes: ProbeSet, display: torch.Tensor,
                         attributions: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor, step: int) -> None:
        from lightning_lens import loggers

        if self._kind is None:  # no setup check ran (no validation batch then): decide from the probes
            self._kind = input_kind(probes.inputs, tabular=self.feature_names is not None)
        if self._kind in ("text", "tabular", "multi"):
            self._log_structured(trainer, name, probes, attributions, preds, probs, step)
            return
        image, caption = self._method_grid(name, probes, display, attributions, preds, probs)
        loggers.log_image(trainer, f"saliency/{loggers.sanitize_tag(name)}", image, step=step, caption=caption)

    def _methods_x_probes_grid(
        self,
        computed: Mapping[str, torch.Tensor],
        probes: ProbeSet,
        display: torch.Tensor,
        preds: torch.Tensor,
        probs: torch.Tensor,
    ) -> tuple[np.ndarray, str]:
        from lightning_lens import render

        maps = {name: _as_images(attributions) for name, attributions in computed.items()}
        signed = any(_any_negative(m) for m in maps.values())
        wrong = self._wrong(probes, preds)
        rows = [[render.to_rgb_uint8(image) for image in _as_images(display.float())]]
        rows += [[render.heatmap(a, signed=signed) for a in m] for m in maps.values()]
        captions = [[None] * len(rows[0])] + [[_zero_note(name, a) for a in m] for name, m in maps.items()]
        grid = render.image_grid(
            rows,
            row_labels=["input", *computed],
            col_labels=self._probe_labels(probes, preds, probs),
            cell_size=self.cell_size,
            title=self._grid_title("saliency maps"),
            cell_captions=captions if any(c for row in captions for c in row) else None,
            col_label_colors=[render.MISTAKE_COLOR if miss else None for miss in wrong],
            cell_frames=[[render.MISTAKE_COLOR if miss else None for miss in wrong]],
            colorbar="signed" if signed else "absolute",
            colorbar_labels=_SCALE_LABELS[signed],
        )
        caption = (f"saliency maps (target: {self.target}); rows: input then one per method, columns: probes; "
                   + _legend(signed, any(wrong), [c for row in captions for c in row]))
        return grid, caption

    def _log_methods_x_probes_grid(self, trainer: "pl.Trainer", computed: Mapping[str, torch.Tensor],
                                   probes: ProbeSet, display: torch.Tensor, preds: torch.Tensor, probs: torch.Tensor,
                                   step: int) -> None:
        from lightning_lens import loggers

        image, caption = self._methods_x_probes_grid(computed, probes, display, preds, probs)
        loggers.log_image(trainer, "saliency/methods_x_probes", image, step=step, caption=caption)

    def summary(self) -> Optional[str]:
        """Which epochs got maps, and the last logged epoch's quality metrics (logged at the end of fit)."""
        from lightning_lens.report.summaries import saliency_summary

        if not self.run_epochs:
            return None
        return saliency_summary(self.run_epochs, self.method_names, self.last_scalars,
                                method_epochs=self.method_epochs)


# --------------------------------------------------------------------------------------------------------- figures
_SCALE_LABELS = {True: ["+p99", "0", "-p99"], False: ["p99", "0"]}


def _any_negative(maps: Sequence[torch.Tensor]) -> bool:
    return any(bool((m < 0).any()) for m in maps)


def _zero_note(name: str, attribution: torch.Tensor) -> Optional[str]:
    """The note under a map that is zero everywhere (drawn all black / all white otherwise, with no hint why)."""
    if bool((attribution != 0).any()):
        return None
    if "cam" in name.lower():
        return "map is zero: no positive evidence"  # Grad-CAM's ReLU keeps only evidence for the class
    return "map is zero: no attribution"


def _legend(signed: bool, wrong: bool, notes: Sequence[Optional[str]]) -> str:
    """The caption's explanation of the colours, marks and notes of a saliency grid."""
    parts = [
        ("colour scale: blue negative, red positive" if signed else "colour scale: |attribution|, black 0")
        + ", each map scaled to its 99th percentile of |a| (p99)"
    ]
    if wrong:
        parts.append("red label and frame: wrong prediction")
    if any(note and "positive evidence" in note for note in notes):
        parts.append("'map is zero: no positive evidence': Grad-CAM found no evidence for the class at its layer"
                     " (the ReLU of the weighted activations removed everything); an earlier layer may show more")
    if any(note and "no attribution" in note for note in notes):
        parts.append("'map is zero: no attribution': every value of the map is 0 (e.g. dead ReLUs or a saturated"
                     " output)")
    return "; ".join(parts)


def _chance_layout(scalars: Mapping[str, float]) -> dict[str, dict[str, list[str]]]:
    """Custom-scalar charts putting each ``..._chance`` level on its metric's chart."""
    import re

    charts = {}
    for key in scalars:
        if key.endswith("_chance") and key[: -len("_chance")] in scalars:
            metric = key[: -len("_chance")]
            charts[f"{metric} (with chance)"] = [re.escape(metric), re.escape(key)]
    return {"quality vs chance": charts} if charts else {}


# --------------------------------------------------------------------------------------------------------- helpers
def _check_method_kwargs(method_kwargs: Any, specs: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    if method_kwargs is None:
        return {}
    check_instance(method_kwargs, "method_kwargs", Mapping, hint="method name -> dict of keyword arguments")
    from lightning_lens.attribution import canonical_name

    named = [name for name, spec in specs if isinstance(spec, str)]
    out: dict[str, dict[str, Any]] = {}
    for key, kwargs in method_kwargs.items():
        if not isinstance(key, str) or canonical_name(key) not in named:
            raise ValueError(
                f"method_kwargs has an entry for {key!r}, which is not among the methods given by name ({named});"
                " configure method objects directly instead"
            )
        check_instance(kwargs, f"method_kwargs[{key!r}]", Mapping, hint="keyword arguments")
        out[canonical_name(key)] = dict(kwargs)
    return out


def _check_quality_options(options: Any) -> dict[str, dict[str, Any]]:
    if options is None:
        return {}
    check_instance(options, "quality_options", Mapping, hint="metric name -> dict of keyword arguments")
    for key, value in options.items():
        check_instance(key, "quality_options keys", str)
        check_instance(value, f"quality_options[{key!r}]", Mapping, hint="keyword arguments")
    return {k: dict(v) for k, v in options.items()}


def _str_list(value: Any, argument: str) -> list[str]:
    return list(check_str_list(value, argument))


def _compute_quality() -> Callable[..., Mapping[str, float]]:
    from lightning_lens.evaluation import compute_quality

    return compute_quality


def _check_quality_metrics(metrics: Sequence[str]) -> None:
    """Fail at construction for unknown metric names."""
    from lightning_lens.evaluation import available_quality_metrics

    known = list(available_quality_metrics())
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"quality_metrics names unknown metric(s) {unknown}; available: {known}")


def _check_denormalize(denormalize: Any) -> Any:
    if denormalize is None or callable(denormalize):
        return denormalize
    if isinstance(denormalize, Sequence) and not isinstance(denormalize, str) and len(denormalize) == 2:
        mean, std = (list(v) if isinstance(v, Sequence) else [v] for v in denormalize)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean + std)
        if numbers and mean and std:
            if len(mean) != len(std):
                raise ValueError(
                    f"denormalize=(mean, std) has {len(mean)} mean(s) and {len(std)} std(s); give one of each per"
                    " channel"
                )
            return (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    raise TypeError(
        "denormalize must be a callable on one input sample, e.g. lambda x: x * std + mean, a (mean, std) pair of"
        f" per-channel lists or None, got {denormalize!r}"
    )


def _check_mean_std(denormalize: tuple[tuple[float, ...], tuple[float, ...]], inputs: torch.Tensor) -> None:
    channels = int(inputs.shape[1]) if inputs.dim() == 4 else 1
    given = len(denormalize[0])
    if given not in (1, channels):
        need = "one value" if channels == 1 else f"one value or {channels} values"
        raise ValueError(
            f"denormalize=(mean, std) gives {given} values each, but the inputs have {channels} channel(s): pass"
            f" {need} each, the mean and std used to normalize these inputs"
        )


def _apply_denormalize(denormalize: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The inputs denormalized for display: ``(mean, std)`` per channel, or the callable on every sample."""
    x = inputs.detach().float().cpu()
    if isinstance(denormalize, tuple):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(denormalize[0]).reshape(shape)
        std = torch.tensor(denormalize[1]).reshape(shape)
        return x * std + mean
    out = []
    for sample in x:
        shown = denormalize(sample.clone())
        if not isinstance(shown, torch.Tensor) or shown.shape != sample.shape:
            got = tuple(shown.shape) if isinstance(shown, torch.Tensor) else type(shown).__name__
            raise ValueError(f"denormalize returned {got} for an input of shape {tuple(sample.shape)}")
        out.append(shown.detach().float().cpu())
    return torch.stack(out)


def _check_input_layout(inputs: torch.Tensor) -> None:
    if inputs.is_floating_point() and 2 <= inputs.dim() <= 4:
        return
    if not inputs.is_floating_point():
        raise TypeError(
            f"input_key selects inputs of dtype {inputs.dtype}; saliency maps are gradients with respect to the"
            " inputs, so they must be floating point (pixels, features). For token ids of shape (batch, tokens),"
            " pass layer='<the embedding module>' to explain the embeddings' output"
        )
    raise ValueError(
        f"input_key selects inputs of shape {tuple(inputs.shape)}; SaliencyMapCallback draws (batch, features),"
        " (batch, height, width) or (batch, channels, height, width) inputs: set input_key (a callable works) to"
        " select them"
    )


def _check_labels(labels: Optional[torch.Tensor], where: str) -> None:
    if labels is None:
        raise ValueError(
            f"SaliencyMapCallback(target='label') found no labels in {where}; set target_key to where they are, or"
            " use target='prediction'"
        )
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"SaliencyMapCallback(target='label') needs one integer class index per example, got labels of shape"
            f" {tuple(labels.shape)} and dtype {labels.dtype}; set target_key (a callable works) or use"
            " target='prediction'"
        )


def _check_targets_fit(targets: torch.Tensor, logits: torch.Tensor, target: str) -> None:
    classes = int(logits.shape[1])
    bad = targets[(targets < 0) | (targets >= classes)]
    if bad.numel():
        binary = " (one logit: a binary model)" if classes == 1 else ""
        raise ValueError(
            f"SaliencyMapCallback(target={target!r}): the labels hold class {int(bad[0])}, but the model returns"
            f" {classes} logit(s) per example{binary}; use target='prediction'"
            + (" (it explains the single logit), or return two logits, e.g. torch.cat([-z, z], dim=1)"
               if classes == 1 else ", or set target_key to the class indices")
        )


def _model_inputs(inputs: Inputs, pl_module: nn.Module) -> Inputs:
    """The probes on the module's device, floating tensors in its floating dtype (token ids and masks keep theirs),
    as normal (non-inference) tensors, in the probes' structure."""
    param = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if isinstance(inputs, torch.Tensor) and input_kind(inputs) == "image":
        _check_input_layout(inputs)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).clone()

    return map_inputs(move, inputs)


def _call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` on the probes: a dict as keyword arguments, a tuple positionally."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _shape_text(inputs: Inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"shape {tuple(inputs.shape)}, dtype {inputs.dtype}"
    return describe_inputs(inputs)


def _device(inputs: Inputs) -> torch.device:
    return input_leaves(inputs)[0].device


def _first_rows(inputs: Inputs, n: int) -> Inputs:
    return map_inputs(lambda t: t[:n], inputs)


def _predict(pl_module: nn.Module, inputs: Inputs, output_fn: Optional[Callable[[Any], torch.Tensor]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, softmax probabilities) of the probes, on the CPU (scores through ``output_fn``)."""
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            logits = forward_logits(pl_module, inputs, output_fn)
        else:
            from lightning_lens.attribution._inputs import ModelInputs

            logits = forward_logits(pl_module, ModelInputs.from_user(inputs), output_fn)
    probs = logits.detach().float().softmax(dim=1).cpu()
    return probs.argmax(dim=1), probs


def _check_attributions(attributions: Any, inputs: Inputs, name: str) -> Any:
    structured = not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point()
    if structured or isinstance(attributions, (tuple, dict)):
        return _check_structured_attributions(attributions, inputs, name)
    ok = (
        isinstance(attributions, torch.Tensor)
        and attributions.dim() == inputs.dim()
        and attributions.shape[0] == inputs.shape[0]
        and (inputs.dim() < 4 or attributions.shape[1] in (1, inputs.shape[1]))
    )
    if not ok:
        shape = tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions).__name__
        raise ValueError(
            f"method {name!r} returned attributions of shape {shape} for inputs of shape {tuple(inputs.shape)};"
            " expected the inputs' shape or (B, 1, h, w)"
        )
    return attributions


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """Samples as (B, C, H, W) images for display: features padded into a square, channels other than 1/3/4
    summed."""
    x = x.detach().float().cpu()
    if x.dim() == 2:
        side = math.isqrt(x.shape[1] - 1) + 1 if x.shape[1] > 1 else 1
        padded = torch.zeros(x.shape[0], side * side)
        padded[:, : x.shape[1]] = x
        return padded.reshape(x.shape[0], 1, side, side)
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.shape[1] not in (1, 3, 4):
        return x.sum(dim=1, keepdim=True)
    return x


def _spatial_layers(model: nn.Module, x: Inputs) -> list[str]:
    """Names of the submodules whose output is 4-D with more than one spatial position (one forward, no grad)."""
    found: list[str] = []
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                found.append(name)

        return hook

    try:
        for name, module in model.named_modules():
            if module is not model:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            _call_model(model, map_inputs(lambda t: t.detach().clone(), x))
    finally:
        for h in handles:
            h.remove()
    return found


def _cam_layer(method: Any) -> Optional[nn.Module]:
    if getattr(method, "supports_layer", False):  # a gradient method's layer= (embeddings): not a CAM layer
        return None
    layer = getattr(method, "layer", None)
    if layer is None:
        layer = getattr(getattr(method, "gradcam", None), "layer", None)
    return layer if isinstance(layer, nn.Module) else None


def _output_shape(model: nn.Module, layer: nn.Module, x: Inputs) -> Optional[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            shapes.append(tuple(output.shape))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            _call_model(model, map_inputs(lambda t: t.detach().clone(), x))
    finally:
        handle.remove()
    return shapes[-1] if shapes else None


# --------------------------------------------------------------------------------------------- text, tabular, multi
def _check_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or callable(getattr(tokenizer, "convert_ids_to_tokens", None)) \
            or callable(getattr(tokenizer, "decode", None)):
        return tokenizer
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str) \
            and all(isinstance(t, str) for t in tokenizer):
        return list(tokenizer)
    raise TypeError(
        "tokenizer must be a HuggingFace tokenizer (convert_ids_to_tokens), an object with decode, or a vocabulary"
        f" list of token strings indexed by id, got {type(tokenizer).__name__}"
    )


def _decodes(tokenizer: Any, ids: torch.Tensor) -> bool:
    """Whether every id of ``ids`` has a token (a vocabulary list must cover the largest id)."""
    if isinstance(tokenizer, list):
        return int(ids.max()) < len(tokenizer) and int(ids.min()) >= 0
    from lightning_lens import render

    try:
        render.decode_tokens(ids[0], tokenizer)
    except Exception:
        return False
    return True


def _check_structured_attributions(attributions: Any, inputs: Inputs, name: str) -> Any:
    """Attributions of a layer (one tensor, one row per example) or mirroring tuple/dict inputs."""
    n = input_batch_size(inputs)
    if isinstance(attributions, torch.Tensor):
        if attributions.dim() >= 2 and attributions.shape[0] == n:
            return attributions
    elif isinstance(attributions, Mapping) and isinstance(inputs, Mapping) and list(attributions) == list(inputs):
        if all(isinstance(a, torch.Tensor) and a.shape == inputs[k].shape for k, a in attributions.items()):
            return attributions
    elif isinstance(attributions, tuple) and isinstance(inputs, tuple) and len(attributions) == len(inputs):
        if all(isinstance(a, torch.Tensor) and a.shape == x.shape for a, x in zip(attributions, inputs)):
            return attributions
    got = describe_inputs(attributions) if isinstance(attributions, (torch.Tensor, tuple, dict)) \
        else type(attributions).__name__
    raise ValueError(
        f"method {name!r} returned attributions {got} for inputs {describe_inputs(inputs)}; expected the inputs'"
        " structure and shapes, or with layer= one tensor with a row per example"
    )


def _map_leaves(maps: Any) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor):
        return [maps]
    values = maps.values() if isinstance(maps, Mapping) else maps
    return [m for m in values if m is not None]


def _map_structure(fn: Callable[[torch.Tensor], torch.Tensor], maps: Any) -> Any:
    if isinstance(maps, torch.Tensor):
        return fn(maps)
    if isinstance(maps, Mapping):
        return {k: fn(v) for k, v in maps.items()}
    return tuple(None if m is None else fn(m) for m in maps)
