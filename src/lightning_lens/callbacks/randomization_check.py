r"""
Randomization sanity check
^^^^^^^^^^^^^^^^^^^^^^^^^^

Run the cascading model-randomization test of Adebayo et al., "Sanity Checks for Saliency Maps" (NeurIPS 2018) on
the model being trained, at the end of fit (default) or every ``n`` epochs, and log which attribution methods pass.
Not to be confused with Lightning's own pre-training "sanity check" of the validation loop.

Tags written (``<method>`` is a registry name such as ``gradient`` or a method object's ``.name``):

=====================================  ================================================================================
``sanity/cascade``                     image: rows are methods (one block of rows per shown probe), columns the input,
                                       the original model's map, then the map after each randomization stage (the
                                       paper's Figure 2; normalized absolute maps)
``sanity/similarity``                  figure: one panel per metric; x the stages, one line per method (median over
                                       the probes, band: interquartile range), dashed: the method's floor
``sanity/verdicts``                    table (TensorBoard markdown text, W&B table, CSV file): verdict, the numbers
                                       behind it, every metric at full randomization
``sanity/report``                      JSON file with the whole report (curves, controls, verdicts, settings)
``sanity/<method>/<metric>``           scalar: median similarity at full randomization
``sanity/<method>/verdict``            scalar: +1 passes, 0 inconclusive, -1 fails
=====================================  ================================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from typing_extensions import override

from lightning_lens._pl import pl, rank_zero_warn
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector, shared_probes
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_bool, check_choice, check_int

__all__ = ["RandomizationSanityCheck"]

_MODES = ("cascading", "independent")
_ORDERS = ("top_down", "bottom_up")
_BATCHNORM = ("keep", "reset")
_TARGETS = ("label", "prediction", "randomized_prediction")
_VERDICT_VALUE = {"passes": 1.0, "inconclusive": 0.0, "fails": -1.0}
DEFAULT_METHODS = ("gradient", "guided_backprop")


class RandomizationSanityCheck(ProbeCallback):
    """Check, on the model being trained, which attribution methods actually depend on its weights.

    The probes (a few validation examples) are drawn once from the first real validation epoch, or passed
    explicitly, or shared with another lightning-lens callback of the trainer that holds probes (e.g.
    :class:`~lightning_lens.callbacks.SaliencyMapCallback`), so both show the same examples. The check runs
    :func:`lightning_lens.sanity.cascading_randomization` (or ``independent_randomization``) on a deep copy of the
    LightningModule: training is never changed (the module, its gradients, its train/eval modes and the global RNG
    are untouched), also when run every ``n`` epochs. Rank zero runs the check and logs through
    :mod:`lightning_lens.loggers`; the tags are listed in the module docstring. Each stage reports its progress
    through Lightning's info log.

    Args:
        methods: attribution methods: registry names, ``(name, kwargs)`` pairs, attribution objects built on this
            LightningModule, or a ``{label: method}`` dict. Default: gradient and Guided Backprop.
        controls: also run the model-independent Sobel edge map and a fresh random map as methods (see
            :func:`~lightning_lens.sanity.cascading_randomization`); they show what a fail and "no signal" look like.
        num_probes: how many validation examples to check (at least 2, for the floor control).
        probe_seed: seed of the private generator that picks the probes.
        probes: an explicit :class:`~lightning_lens.utils.ProbeSet` (then nothing is collected).
        every_n_epochs: also run after every n-th validation epoch during fit (``None``: only at the end of fit).
        run_at_fit_end: run when fit ends.
        mode: ``"cascading"`` (the paper) or ``"independent"``.
        order: ``"top_down"`` (the paper) or ``"bottom_up"``.
        layers: names of blocks to randomize instead of every parameter-owning module (e.g. ``["model.features",
            "model.classifier"]``).
        batchnorm: ``"keep"`` the trained running statistics (Adebayo et al.) or ``"reset"`` them.
        target: explain the probes' ``"label"``, the original ``"prediction"`` (both fixed across stages), or each
            stage's ``"randomized_prediction"`` (the paper's code).
        metrics: similarity metrics (default: all that apply; see :class:`~lightning_lens.sanity.MapSimilarity`).
        rule: the verdict thresholds (:class:`~lightning_lens.sanity.VerdictRule`).
        seed: seed of the randomization's private generator.
        grid_probes: how many probes the cascade image shows (0: no image).
        input_key, target_key, index_key: where inputs, labels and dataset indices are in a batch.
        cell_size: pixel size of one grid cell.

    Raises:
        ValueError: for a choice outside the allowed values, ``num_probes < 2``, ``every_n_epochs < 1``, or nothing
            to run (``every_n_epochs=None`` and ``run_at_fit_end=False``).

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
        rule: Optional[Any] = None,
        seed: int = 0,
        grid_probes: int = 2,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        cell_size: int = 48,
    ) -> None:
        super().__init__()
        from lightning_lens.sanity import MapSimilarity, VerdictRule
        from lightning_lens.sanity._common import normalize_methods

        self._method_specs = normalize_methods(methods)
        self.controls = check_bool(controls, "controls")
        self.num_probes = check_int(num_probes, "num_probes", minimum=2)
        self.probe_seed = check_int(probe_seed, "probe_seed")
        self.every_n_epochs = None if every_n_epochs is None else check_int(every_n_epochs, "every_n_epochs", 1)
        self.run_at_fit_end = check_bool(run_at_fit_end, "run_at_fit_end")
        if self.every_n_epochs is None and not self.run_at_fit_end:
            raise ValueError("nothing to run: set every_n_epochs=<n> or run_at_fit_end=True")
        self.mode = check_choice(mode, "mode", _MODES)
        self.order = check_choice(order, "order", _ORDERS)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be a list of module names or None, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        self.batchnorm = check_choice(batchnorm, "batchnorm", _BATCHNORM)
        self.target = check_choice(target, "target", _TARGETS)
        self.similarity = MapSimilarity(metrics=metrics)
        if rule is not None and not isinstance(rule, VerdictRule):
            raise TypeError(f"rule must be a lightning_lens.sanity.VerdictRule or None, got {type(rule).__name__}")
        self.rule = rule or VerdictRule()
        self.seed = check_int(seed, "seed")
        self.grid_probes = check_int(grid_probes, "grid_probes", minimum=0)
        self.cell_size = check_int(cell_size, "cell_size", minimum=8)
        self._accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._collector = ProbeCollector(self.num_probes, self._accessor, self.probe_seed, probes, owner=self)
        self._last_report: Any = None

    # ------------------------------------------------------------------------------------------------------ properties
    @property
    def last_report(self) -> Any:
        """The :class:`~lightning_lens.sanity.RandomizationReport` of the last check (rank zero), or None."""
        return self._last_report

    @property
    def method_names(self) -> list[str]:
        return [name for name, _ in self._method_specs]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.method_names, mode=self.mode, num_probes=self.num_probes,
                                        probe_seed=self.probe_seed)

    # ----------------------------------------------------------------------------------------------------------- hooks
    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        probes = self._collector.finalize(trainer)  # a collective under DDP: every rank calls it
        due = (self.every_n_epochs is not None and trainer.state.fn == "fit"
               and (trainer.current_epoch + 1) % self.every_n_epochs == 0)
        if due and probes is not None and trainer.is_global_zero:
            self._check(trainer, pl_module, probes)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.run_at_fit_end or not trainer.is_global_zero:
            return
        probes = self._collector.probes or shared_probes(trainer, exclude=self)
        if probes is None:
            rank_zero_warn(
                "RandomizationSanityCheck: no probes to check at the end of fit (no validation epoch ran); pass"
                " probes=ProbeSet(...) or add a validation dataloader"
            )
            return
        self._check(trainer, pl_module, probes)

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

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", probes: ProbeSet) -> None:
        from lightning_lens.sanity import cascading_randomization, independent_randomization

        if len(probes) < 2:
            rank_zero_warn("RandomizationSanityCheck: fewer than 2 probes; the floor control needs 2, skipping")
            return
        run = cascading_randomization if self.mode == "cascading" else independent_randomization
        device = next(pl_module.parameters()).device if any(True for _ in pl_module.parameters()) else "cpu"
        inputs = probes.inputs.to(device)
        target = self._targets(probes)
        if isinstance(target, torch.Tensor):
            target = target.to(device)
        start = time.perf_counter()
        info = pl.utilities.rank_zero_info

        def progress(stage: int, total: int, layer: str) -> None:
            info(f"RandomizationSanityCheck: stage {stage}/{total} ({layer}) done, {time.perf_counter() - start:.1f}s")

        report = run(
            pl_module, inputs, target, dict(self._method_specs), order=self.order, layers=self.layers,
            batchnorm=self.batchnorm, similarity=self.similarity, rule=self.rule, seed=self.seed, keep_maps=True,
            controls=self.controls, progress=progress,
        )
        self._last_report = report
        if not trainer.loggers:
            rank_zero_warn(
                "RandomizationSanityCheck has no logger to write to (Trainer(logger=False)); the report is still"
                " available as `.last_report`. Pass a logger, e.g. TensorBoardLogger('lens_logs')."
            )
            return
        self._log(trainer, report, probes)

    def _log(self, trainer: "pl.Trainer", report: Any, probes: ProbeSet) -> None:
        from lightning_lens import loggers

        step = loggers.logging_step(trainer)
        if self.grid_probes:
            image = self._cascade_grid(report, probes)
            if image is not None:
                loggers.log_image(trainer, "sanity/cascade", image, step=step, caption=(
                    f"{report.mode} randomization ({report.order}); rows: methods per probe, columns: input, original,"
                    " then each randomized stage"))
        loggers.log_figure(trainer, "sanity/similarity", _similarity_figure(report), step=step)
        columns, rows = report.to_table()
        loggers.log_table(trainer, "sanity/verdicts", columns, rows, step=step)
        loggers.log_json(trainer, "sanity/report", report.to_dict(include_per_example=False), step=step)
        scalars: dict[str, float] = {}
        for name, result in report.results.items():
            for metric in result.metrics:
                value = report.final(name, metric)
                if math.isfinite(value):
                    scalars[f"sanity/{name}/{metric}"] = value
            scalars[f"sanity/{name}/verdict"] = _VERDICT_VALUE[result.verdict.outcome]
        # pl_module.log is not allowed in on_fit_end: the sink layer writes straight to the loggers
        loggers.log_scalars(trainer, scalars, step=step)

    def _cascade_grid(self, report: Any, probes: ProbeSet) -> Optional[np.ndarray]:
        from lightning_lens import render

        shown = min(self.grid_probes, len(probes))
        results = [r for r in report.results.values() if r.maps is not None and r.maps.dim() == 4]
        if not results or probes.inputs.dim() != 4:
            return None  # not image maps: the curves and the table still say everything
        cells, labels = [], []
        for i in range(shown):
            tag = f"#{int(probes.indices[i])}" if probes.indices is not None else f"probe {i}"
            for r in results:
                row = [render.to_rgb_uint8(probes.inputs[i].float().clamp(0, 1))]
                row += [render.heatmap(r.maps[s, i], signed=False, vmax=1.0) for s in range(r.maps.shape[0])]
                cells.append(row)
                labels.append(f"{r.name} {tag} ({r.verdict.outcome})")
        return render.image_grid(cells, row_labels=labels, col_labels=["input", "original", *report.stages],
                                 cell_size=self.cell_size)


def _similarity_figure(report: Any) -> Any:
    """One panel per metric: median similarity per stage for each method, IQR band, dashed floor."""
    from lightning_lens import render

    metrics = report.metrics
    fig, axes = render.new_figure(1, len(metrics), figsize=(3.6 * len(metrics), 3.4))
    axes = np.atleast_1d(axes)
    x = np.arange(report.num_stages + 1)
    ticks = ["original", *report.stages]
    colors = [f"C{i % 10}" for i in range(len(report.results))]
    for ax, metric in zip(axes, metrics):
        for color, (name, r) in zip(colors, report.results.items()):
            if metric not in r.similarity:
                continue
            ax.plot(x, report.curve(name, metric).numpy(), marker="o", ms=3, color=color, label=name)
            per_example = r.similarity[metric].float()
            low = torch.cat([torch.tensor([r.ceiling[metric]]), per_example.nanquantile(0.25, dim=1)])
            high = torch.cat([torch.tensor([r.ceiling[metric]]), per_example.nanquantile(0.75, dim=1)])
            ax.fill_between(x, low.numpy(), high.numpy(), color=color, alpha=0.15, linewidth=0)
            if math.isfinite(r.floor[metric]):
                ax.axhline(r.floor[metric], color=color, linestyle="--", linewidth=0.8)
        ax.set_title(metric)
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-1.05 if metric == "spearman_signed" else -0.3, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("similarity to the original maps")
    axes[-1].legend(fontsize=7, loc="best")
    return fig
