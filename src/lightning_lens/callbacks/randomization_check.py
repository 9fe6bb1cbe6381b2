r"""
Randomization sanity check
^^^^^^^^^^^^^^^^^^^^^^^^^^

Run the cascading model-randomization test of Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018) on
the model being trained, at the end of fit (default) or every ``n`` epochs, and log which attribution methods pass.
Not to be confused with Lightning's own pre-training "sanity check" of the validation loop.

Tags written (``<method>`` is a registry name such as ``gradient`` or ``integrated_gradients`` -- aliases such as
``"IG"`` are logged under the registry name -- or a method object's ``.name``):

=====================================  ================================================================================
``sanity/cascade``                     image: rows are methods (one block of rows per shown probe), columns the input,
                                       the original model's map, then the map after each randomization stage (the
                                       paper's Figure 2; normalized absolute maps)
``sanity/similarity``                  figure of the verdict's metric: x the stages, one line per method (median over
                                       the probes, band: interquartile range), dashed: the method's floor; controls
                                       marked; the legend right of the plot explains the line styles
``sanity/similarity/<metric>``         the same figure for each other metric of ``figure_metrics``
``sanity/verdicts``                    table (TensorBoard markdown text, W&B table, CSV file): verdict, the verdict a
                                       control is expected to get, the deciding metric and its numbers; a legend line
                                       explains the columns and why each method got its verdict
``sanity/report``                      JSON file with the whole report (curves, controls, verdicts, settings)
``sanity/<method>/<metric>``           scalar: median similarity at full randomization
``sanity/<method>/verdict``            scalar: +1 passes, 0 inconclusive, -1 fails
=====================================  ================================================================================
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from typing_extensions import override

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import log
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import (
    check_bool,
    check_choice,
    check_float,
    check_instance,
    check_int,
    check_optional,
    check_str_list,
)

__all__ = ["RandomizationSanityCheck"]

_MODES = ("cascading", "independent")
_ORDERS = ("top_down", "bottom_up")
_BATCHNORM = ("keep", "reset")
_TARGETS = ("label", "prediction", "randomized_prediction")
_VERDICT_VALUE = {"passes": 1.0, "inconclusive": 0.0, "fails": -1.0}
DEFAULT_METHODS = ("gradient", "guided_backprop")
DEFAULT_FIGURE_METRICS = ("spearman_abs", "spearman_signed")
#: a check running longer than this reports each stage's progress at info level (debug level before)
_PROGRESS_AFTER_SECONDS = 5.0
_DRY_RUN_PROBES = 2


class RandomizationSanityCheck(ProbeCallback):
    """Check, on the model being trained, which attribution methods actually depend on its weights.

    The probes (a few validation examples) are drawn once from the validation dataset, or passed explicitly, or
    shared with another lightning-lens callback of the trainer that asks for the same ``num_probes`` and
    ``probe_seed`` (e.g. :class:`~lightning_lens.callbacks.SaliencyMapCallback`), so both show the same examples. The
    check runs :func:`lightning_lens.sanity.cascading_randomization` (or ``independent_randomization``) on a deep copy
    of the LightningModule: training is never changed (the module, its gradients, its train/eval modes and the global
    RNG are untouched), also when run every ``n`` epochs. Rank zero runs the check, logs through
    :mod:`lightning_lens.loggers` (the tags are listed in the module docstring) and writes one line per method with its
    verdict to the ``lightning_lens`` logger.

    Before the first training step (and at the start of ``trainer.validate()``) the configuration is tried on two
    examples of one validation batch: the module must be deep-copyable, the ``layers`` must exist, the model must
    return ``(batch, classes)`` logits, ``target="label"`` needs integer labels, and every method must run. Errors
    name the argument and the fix. Later failures never stop the fit: each method, the cascade image, the figure, the
    table, the JSON and the scalars fail (and are reported) on their own.

    Args:
        methods: attribution methods: registry names (aliases such as ``"IG"`` are logged under the registry name),
            ``(name, kwargs)`` pairs, attribution objects built on this LightningModule, or a ``{label: method}``
            dict. Default: gradient and Guided Backprop (the paper's pass and fail; both cost one backward pass).
        controls: also run the model-independent Sobel edge map and a fresh random map as methods (see
            :func:`~lightning_lens.sanity.cascading_randomization`); they show what a fail and "no signal" look like.
        num_probes: how many validation examples to check (at least 2, for the floor control).
        probe_seed: seed of the private generator that picks the probes.
        probes: an explicit :class:`~lightning_lens.utils.ProbeSet` (then nothing is drawn).
        every_n_epochs: also run after every n-th validation epoch during fit (``None``: only at the end of fit). As
            for every lightning-lens callback, the first and the last epoch of fit run too, and epochs in between are
            skipped when they would exceed ``max_overhead``.
        run_at_fit_end: run when fit ends (skipped when the last epoch's check already saw the final weights).
        mode: ``"cascading"`` (the paper) or ``"independent"``.
        order: ``"top_down"`` (the paper) or ``"bottom_up"``.
        layers: names of blocks to randomize instead of every parameter-owning module (e.g. ``["model.features",
            "model.classifier"]``).
        batchnorm: ``"keep"`` the trained running statistics (Adebayo et al.) or ``"reset"`` them.
        target: explain the probes' ``"label"``, the original ``"prediction"`` (both fixed across stages), or each
            stage's ``"randomized_prediction"`` (the paper's code).
        metrics: similarity metrics (default: all that apply; see :class:`~lightning_lens.sanity.MapSimilarity`).
        figure_metrics: the metrics drawn as figures, besides the verdict's metric (``sanity/similarity``); each other
            one is ``sanity/similarity/<metric>`` (None: every computed metric). Each costs about 0.05 s to draw; the
            default shows the two Spearman correlations, the others are in the scalars and the JSON report.
        rule: the verdict thresholds (:class:`~lightning_lens.sanity.VerdictRule`).
        seed: seed of the randomization's private generator.
        grid_probes: how many probes the cascade image shows (0: no image, and no maps kept). One by default: the
            verdicts and curves summarize every probe, and each shown probe adds a block of rows to draw.
        input_key, target_key, index_key: where inputs, labels and dataset indices are in a batch.
        cell_size: pixel size of one grid cell.
        max_overhead: the share of fit time the checks every ``n`` epochs may use (None: no limit); the check at the
            end of fit always runs.
        strict: raise the callback's own failures instead of reporting them and continuing (for tests, debugging).
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        smooth_samples, smooth_noise: smooth MPRT (Hedström et al. 2023): every map is the mean of the method's maps
            of ``smooth_samples`` noisy copies of the probes (noise ``smooth_noise`` times each probe's value range),
            so noise in the attributions does not pass for sensitivity to the weights (see
            :func:`~lightning_lens.sanity.cascading_randomization`). Default ``1`` and ``0.0``: the plain test; the
            paper uses 50 and 0.1. The check costs ``smooth_samples`` times as much. Recorded in the report JSON
            (``smooth_mprt``) and the verdict table's legend.

    Raises:
        ValueError: for a choice outside the allowed values, ``num_probes < 2``, ``every_n_epochs < 1``, empty
            ``layers``, or nothing to run (``every_n_epochs=None`` and ``run_at_fit_end=False``).
        TypeError: for arguments of the wrong type.

    Example::

        from pytorch_lightning import Trainer
        from lightning_lens.callbacks import RandomizationSanityCheck

        trainer = Trainer(max_epochs=5, callbacks=[RandomizationSanityCheck(methods=["gradient", "guided_backprop"])])
        # trainer.fit(lit_model, train_loader, val_loader)
        # -> sanity/verdicts: gradient passes, guided_backprop fails (Adebayo et al.'s finding)
    """

    def __init__(
        self,
        methods: Union[Sequence[Any], Mapping[str, Any]] = DEFAULT_METHODS,
        controls: bool = True,
        num_probes: int = 8,
        probe_seed: int = 0,
        probes: Optional[ProbeSet] = None,
        every_n_epochs: Optional[int] = None,
        run_at_fit_end: bool = True,
        mode: Literal["cascading", "independent"] = "cascading",
        order: Literal["top_down", "bottom_up"] = "top_down",
        layers: Optional[Sequence[str]] = None,
        batchnorm: Literal["keep", "reset"] = "keep",
        target: Literal["label", "prediction", "randomized_prediction"] = "label",
        metrics: Optional[Sequence[str]] = None,
        figure_metrics: Optional[Sequence[str]] = DEFAULT_FIGURE_METRICS,
        rule: Optional[Any] = None,
        seed: int = 0,
        grid_probes: int = 1,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        cell_size: int = 64,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        smooth_samples: int = 1,
        smooth_noise: float = 0.0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, max_overhead=max_overhead, strict=strict, verbose=verbose)
        from lightning_lens.sanity import ALL_METRICS, MapSimilarity, VerdictRule
        from lightning_lens.sanity._common import normalize_methods

        self._method_specs = normalize_methods(methods)
        self.controls = check_bool(controls, "controls")
        self.num_probes = check_int(num_probes, "num_probes", minimum=2)
        self.probe_seed = check_int(probe_seed, "probe_seed")
        self.run_at_fit_end = check_bool(run_at_fit_end, "run_at_fit_end")
        if self.every_n_epochs is None and not self.run_at_fit_end:
            raise ValueError("nothing to run: set every_n_epochs=<n> or run_at_fit_end=True")
        self.mode = check_choice(mode, "mode", _MODES)
        self.order = check_choice(order, "order", _ORDERS)
        self.layers = None if layers is None else list(check_str_list(layers, "layers"))
        if self.layers is not None and not self.layers:
            raise ValueError("layers must name at least one module (e.g. ['model.features']) or be None for all")
        self.batchnorm = check_choice(batchnorm, "batchnorm", _BATCHNORM)
        self.target = check_choice(target, "target", _TARGETS)
        self.similarity = MapSimilarity(metrics=metrics)
        self.figure_metrics = check_optional(check_str_list, figure_metrics, "figure_metrics")
        for name in self.figure_metrics or ():
            check_choice(name, "figure_metrics", ALL_METRICS)
        self.rule = check_optional(check_instance, rule, "rule", VerdictRule) or VerdictRule()
        self.seed = check_int(seed, "seed")
        self.grid_probes = check_int(grid_probes, "grid_probes", minimum=0)
        self.cell_size = check_int(cell_size, "cell_size", minimum=8)
        self.smooth_samples = check_int(smooth_samples, "smooth_samples", minimum=1)
        self.smooth_noise = check_float(smooth_noise, "smooth_noise", minimum=0.0)
        self._accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._collector = ProbeCollector(self.num_probes, self._accessor, self.probe_seed, probes, owner=self)
        self._last_report: Any = None
        self._checked_at: Optional[tuple[Any, int]] = None  # (fn, global step) of the last check during fit

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def last_report(self) -> Any:
        """The :class:`~lightning_lens.sanity.RandomizationReport` of the last check (rank zero), or None."""
        return self._last_report

    @property
    def method_names(self) -> list[str]:
        """The names the methods are logged under (registry names for named methods)."""
        return [name for name, _ in self._method_specs]

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        fields = {"methods": self.method_names, "mode": self.mode, "num_probes": self.num_probes,
                  "probe_seed": self.probe_seed}
        if self._smoothed:  # only then: the plain check keeps its key (and its checkpoints)
            fields["smooth_mprt"] = [self.smooth_samples, self.smooth_noise]
        return fields

    @property
    def _smoothed(self) -> bool:
        return self.smooth_samples > 1 or self.smooth_noise > 0

    # ----------------------------------------------------------------------------------------------------------- setup
    @override
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        """Try the configuration on two examples before the first training step (see the class docstring)."""
        from lightning_lens.utils import resolve_module

        for name in self.layers or ():
            resolve_module(pl_module, name, argument="layers")  # ValueError naming `layers` and close names
        with torch.inference_mode(False):
            clone, memo = _deep_copy(pl_module)
            source = self._collector.probes if self._collector.explicit else batch
            if source is None:  # no validation data: the methods can only be built, not run
                for label, spec in self._method_specs:
                    _bind(label, spec, pl_module, clone, memo)
                return
            inputs, labels = self._dry_run_examples(source)
            inputs = inputs.to(_device(clone))
            logits, num_stages = self._check_output(clone, inputs)
            target = None
            if self.target == "label":  # every label of the batch is checked (cheap), two are explained
                target = self._check_labels(labels, logits.shape[1])[: inputs.shape[0]].to(inputs.device)
            start = time.perf_counter()
            for label, spec in self._method_specs:
                method = _bind(label, spec, pl_module, clone, memo)
                try:
                    method.explain(inputs, target if target is not None else logits.argmax(dim=1))
                except Exception as err:
                    raise ValueError(
                        f"RandomizationSanityCheck(methods=...): {label!r} failed on {inputs.shape[0]} validation"
                        f" examples with {type(err).__name__}: {err}. Fix its options (a (name, kwargs) pair) or"
                        " leave it out of methods"
                    ) from err
            if self.run_at_fit_end:
                # the check at the end of fit runs whatever the budget says: the trainer's other lightning-lens
                # callbacks leave room for it. A rough guess: every stage explained like this dry run, plus drawing.
                self.budget.reserve((time.perf_counter() - start) * (num_stages + 2) + _DRAWING_SECONDS)

    def _dry_run_examples(self, source: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(source, ProbeSet):
            return source.inputs[:_DRY_RUN_PROBES].clone(), source.targets
        try:
            inputs = self._accessor.inputs(source)
            labels = self._accessor.targets(source)
        except (KeyError, TypeError) as err:
            raise ValueError(f"RandomizationSanityCheck: {err.args[0] if err.args else err}") from err
        return inputs[:_DRY_RUN_PROBES].detach().clone(), None if labels is None else labels.detach().cpu()

    def _check_output(self, clone: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
        from lightning_lens.sanity import find_layers
        from lightning_lens.sanity._common import checked_logits

        outputs: list = []
        try:
            # the same discovery pass the check makes: finds the layers (and checks named `layers`) and the output
            layers, _ = find_layers(clone, inputs, self.layers, output=outputs)
            return checked_logits(outputs, inputs), len(layers)
        except (TypeError, ValueError) as err:
            raise type(err)(f"RandomizationSanityCheck: {err}") from err

    def _check_labels(self, labels: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
        if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            found = "no labels" if labels is None else f"labels of dtype {labels.dtype} and shape {tuple(labels.shape)}"
            raise ValueError(
                f"RandomizationSanityCheck(target='label') needs one integer class index per example, but the batch"
                f" has {found}; set target_key to where the labels are, or use target='prediction'"
            )
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.numel():
            raise ValueError(
                f"RandomizationSanityCheck(target='label'): labels such as {outside[:3].tolist()} are not class"
                f" indices of the model's {num_classes} outputs; set target_key to where the class labels are, or use"
                " target='prediction'"
            )
        return labels.long()

    # ----------------------------------------------------------------------------------------------------------- hooks
    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.is_due(trainer):  # every rank: the decision is collective
            return
        start = time.perf_counter()
        probes = self._collector.finalize(trainer)  # every rank (a collective for streamed data)
        if probes is not None and trainer.is_global_zero:
            self._check(trainer, pl_module, probes, f"epoch {trainer.current_epoch}")
        if trainer.state.fn == "fit":
            self._checked_at = ("fit", int(trainer.global_step))
        self.record_run_cost(time.perf_counter() - start)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.run_at_fit_end:
            return
        if self._checked_at == ("fit", int(trainer.global_step)):
            return  # the last epoch's check already explained these very weights
        probes = self._collector.finalize(trainer)  # every rank (a collective for streamed data)
        if not trainer.is_global_zero:
            return
        if probes is None:
            self.warn_once(
                "no probes",
                "RandomizationSanityCheck: no probes to check at the end of fit (no validation data to draw them"
                " from); pass probes=ProbeSet(...) or add a validation dataloader",
            )
            return
        self._check(trainer, pl_module, probes, "end of fit")
        self.budget.reserve(0.0)

    # ----------------------------------------------------------------------------------------------------- internals
    def _targets(self, probes: ProbeSet) -> Union[torch.Tensor, str, None]:
        if self.target == "prediction":
            return None
        if self.target == "randomized_prediction":
            return self.target
        labels = probes.targets
        if labels is None or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                "RandomizationSanityCheck(target='label') needs one integer class index per probe; set target_key to"
                " where the labels are, or use target='prediction'"
            )
        return labels.long()

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", probes: ProbeSet, when: str) -> None:
        from lightning_lens import render

        if len(probes) < 2:
            self.warn_once("few probes",
                           "RandomizationSanityCheck: fewer than 2 probes; the floor control needs 2, skipping")
            return
        report = self._randomize(trainer, pl_module, probes)
        if report is None:
            return
        self._last_report = report
        log.info("RandomizationSanityCheck (%s, %d probes, %d stages):\n  %s", when, len(probes), report.num_stages,
                 "\n  ".join(render.verdict_lines(report)))
        if not trainer.loggers:
            self.warn_once(
                "no logger",
                "RandomizationSanityCheck has no logger to write to (Trainer(logger=False)); the report is still"
                " available as `.last_report`. Pass a logger, e.g. TensorBoardLogger('lens_logs').",
            )
            return
        self._log(trainer, report, probes)

    def _randomize(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", probes: ProbeSet) -> Any:
        """The report of one check; a method that fails is left out (and reported), the others still run."""
        from lightning_lens.sanity import cascading_randomization, independent_randomization
        from lightning_lens.sanity._common import control_methods

        specs = [(label, spec) for label, spec in self._method_specs if _part(label) not in self.disabled]
        if not specs:
            self.warn_once("no methods", "RandomizationSanityCheck: every method is switched off after repeated"
                                         " failures; nothing to check")
            return None
        run = cascading_randomization if self.mode == "cascading" else independent_randomization
        inputs = probes.inputs.to(_device(pl_module))
        target = self._targets(probes)
        if isinstance(target, torch.Tensor):
            target = target.to(inputs.device)
        start = time.perf_counter()

        def progress(stage: int, total: int, layer: str) -> None:
            elapsed = time.perf_counter() - start
            level = 20 if elapsed > _PROGRESS_AFTER_SECONDS else 10  # logging.INFO / DEBUG
            log.log(level, "RandomizationSanityCheck: stage %d/%d (%s) done, %.1fs", stage, total, layer, elapsed)

        options = dict(order=self.order, layers=self.layers, batchnorm=self.batchnorm, similarity=self.similarity,
                       rule=self.rule, seed=self.seed, keep_maps=self.grid_probes > 0, progress=progress,
                       smooth_samples=self.smooth_samples, smooth_noise=self.smooth_noise)
        try:  # the usual case: one pass over the stages for every method
            report = run(pl_module, inputs, target, dict(specs), controls=self.controls, **options)
        except Exception:
            if self.strict:
                raise
        else:
            for label, _ in specs:
                self.failures.pop(_part(label), None)
            return report
        # something failed: run each method alone (the same seed gives the same stages), each its own part
        reports = [
            self.run_part(trainer, _part(label), run, pl_module, inputs, target, {label: spec}, controls=False,
                          hint="fix the method's options or leave it out of methods", **options)
            for label, spec in specs
        ]
        if self.controls:
            taken = [label for label, _ in specs]
            reports.append(self.run_part(trainer, "controls", run, pl_module, inputs, target,
                                         dict(control_methods(inputs, exclude=taken)), controls=False, **options))
        done = [r for r in reports if r is not None]
        if not done:
            return None
        results: dict[str, Any] = {}
        for r in done:
            results.update(r.results)
        return dataclasses.replace(done[0], results=results)

    def _log(self, trainer: "pl.Trainer", report: Any, probes: ProbeSet) -> None:
        from lightning_lens import loggers, render

        step = loggers.logging_step(trainer)

        def cascade() -> None:
            labels = None if probes.indices is None else [f"#{int(i)}" for i in probes.indices]
            image = render.cascade_grid(report, probes.inputs, num_probes=self.grid_probes, probe_labels=labels,
                                        cell_size=self.cell_size)
            if image is not None:
                loggers.log_image(trainer, "sanity/cascade", image, step=step, caption=(
                    f"{report.mode} randomization ({report.order}); rows: methods per probe, columns: input,"
                    " original, then each randomized stage (layer names shortened, full names: "
                    + ", ".join(report.stages) + "); controls are marked with their expected verdict"))

        def table() -> None:
            columns, rows, legend = render.verdict_table(report)
            if self._smoothed:
                legend += (f" Smooth MPRT: every map is the mean over {self.smooth_samples} noisy copies of the probes"
                           f" (noise {self.smooth_noise:g} x each probe's value range).")
            loggers.log_table(trainer, "sanity/verdicts", columns, rows, step=step, legend=legend)

        def scalars() -> None:
            values: dict[str, float] = {}
            for name, result in report.results.items():
                tag = f"sanity/{loggers.sanitize_tag(name) or 'method'}"
                for metric in result.metrics:
                    value = report.final(name, metric)
                    if math.isfinite(value):
                        values[f"{tag}/{metric}"] = value
                values[f"{tag}/verdict"] = _VERDICT_VALUE[result.verdict.outcome]
            # pl_module.log is not allowed in on_fit_end: the sink layer writes straight to the loggers
            loggers.log_scalars(trainer, values, step=step)

        def figure() -> None:
            # one figure per metric, readable in a TensorBoard card: the deciding metric under sanity/similarity,
            # the others under sanity/similarity/<metric>
            shown = report.metrics
            if self.figure_metrics is not None:
                shown = [m for m in report.metrics if m in self.figure_metrics or m == self.rule.metric]
            for metric in sorted(shown, key=lambda m: m != self.rule.metric):
                tag = "sanity/similarity" if metric == self.rule.metric else f"sanity/similarity/{metric}"
                loggers.log_image(trainer, tag, render.similarity_chart(report, [metric]), step=step)

        if self.grid_probes:
            self.run_part(trainer, "cascade grid", cascade)
        self.run_part(trainer, "similarity figure", figure)
        self.run_part(trainer, "verdict table", table)
        self.run_part(trainer, "report JSON", lambda: loggers.log_json(
            trainer, "sanity/report", {**report.to_dict(include_per_example=False), "smooth_mprt": {
                "samples": self.smooth_samples, "noise": self.smooth_noise}}, step=step))
        self.run_part(trainer, "scalars", scalars)

    def summary(self) -> Optional[str]:
        """The last check's verdict table for the console (logged at the end of fit by the base)."""
        from lightning_lens.report.summaries import sanity_summary

        return None if self._last_report is None else sanity_summary(self._last_report)


#: seconds the end-of-fit figures, table and JSON take, roughly (part of the reserve in the group budget)
_DRAWING_SECONDS = 0.05


def _part(label: str) -> str:
    """The failure-isolation part of one method."""
    return f"method {label}"


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _deep_copy(pl_module: "pl.LightningModule") -> tuple[torch.nn.Module, dict[int, Any]]:
    from lightning_lens.sanity._common import private_copy

    try:
        return private_copy(pl_module)
    except TypeError as err:
        raise TypeError(
            "RandomizationSanityCheck randomizes a deep copy of the LightningModule (the trained module is never"
            f" touched), and copy.deepcopy(module) fails: {err.__cause__ or err}. Make the module deep-copyable (keep"
            " open files, locks, clients or generators out of its attributes, or define __deepcopy__), or remove the"
            " callback"
        ) from err


def _bind(label: str, spec: Any, model: torch.nn.Module, clone: torch.nn.Module, memo: dict[int, Any]) -> Any:
    from lightning_lens.sanity._common import bind

    try:
        return bind(label, spec, model, clone, memo)
    except (TypeError, ValueError) as err:
        raise type(err)(f"RandomizationSanityCheck(methods=...): {err}") from err
