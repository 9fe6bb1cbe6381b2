r"""
Permutation importance
^^^^^^^^^^^^^^^^^^^^^^

Every ``n`` epochs, shuffle each feature of (a fixed subset of) the validation rows across examples and log how much
the model's score drops (:func:`lightning_lens.importance.permutation_importance`; Breiman 2001, Fisher, Rudin &
Dominici 2019), so a feature the model starts to lean on, such as a leaky column, shows up as a rising curve.

Tags written (``<prefix>`` is ``log_prefix``, default ``importance``):

====================================  ================================================================================
``<prefix>/permutation``              image: bar chart of the ``top_k`` features' mean importance with ``std`` error
                                      bars (over ``n_repeats`` shuffles)
``<prefix>/<feature>``                scalar: mean importance of every feature that has been among the ``top_k``
                                      (once tracked, a feature is logged at every later run, so its curve continues)
``<prefix>/baseline_score``           scalar: the metric on the unshuffled rows
``<prefix>/permutation`` (JSON)       every feature's mean, std and repeats, the metric and the number of rows
``lens_errors/PermutationImportanceMonitor``  text: a failure of one part
====================================  ================================================================================
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback
from lightning_lens.callbacks._gather import SampleIds, dedupe_by_id, gather_rows, validation_dataset_size
from lightning_lens.utils import BatchAccessor
from lightning_lens.utils.batch import Inputs, Key, input_batch_size, input_leaves, map_inputs
from lightning_lens.utils.checks import check_callable, check_instance, check_int, check_optional, check_str_list

__all__ = ["PermutationImportanceMonitor"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
_METRICS = ("accuracy", "neg_log_loss", "neg_mse")
_DRY_RUN_ROWS = 4


class PermutationImportanceMonitor(LensCallback):
    """Log the permutation importance of every feature on the validation data during training.

    **Rows.** On a due epoch the callback keeps the validation rows (inputs and labels) of a fixed subset of the
    validation set: the ``max_rows`` samples that come first in a permutation of the dataset positions drawn with
    ``seed`` (by the batch's index key, else by the position a ``DistributedSampler(shuffle=False)`` gives each
    sample). Under DDP every rank keeps its share, the rows are gathered (:func:`~lightning_lens.callbacks._gather.
    gather_rows`, a collective), the sampler's repeats removed and the rows sorted by sample id, so 1 and N processes
    explain the same rows in the same order and log the same values. Without a known dataset size (a stream) each rank
    keeps its first ``max_rows`` rows.

    **Work.** Rank zero computes :func:`~lightning_lens.importance.permutation_importance` of the LightningModule (in
    eval mode, without gradients: training is never changed, and it works under ``trainer.validate()``) with
    ``n_repeats`` shuffles per feature from a private generator seeded by ``seed``, then logs the chart, the scalars
    and the JSON. Cost: ``1 + n_features * n_repeats`` forward passes over at most ``max_rows`` rows, within
    ``max_overhead`` like every lens callback (the first and last epoch of a fit always run).

    Args:
        every_n_epochs: run on every n-th epoch of fit (``trainer.validate()`` always runs).
        n_repeats: shuffles per feature.
        metric: ``"accuracy"`` (default for classifiers), ``"neg_log_loss"``, ``"neg_mse"`` or a callable
            ``(outputs, targets) -> float`` (higher is better); see :func:`~lightning_lens.importance.
            permutation_importance`.
        feature_names: one name per feature (column of ``(batch, features)`` inputs, or group of ``feature_mask``);
            default ``x0, x1, ...`` for one tensor, ``<input>/<index>`` for several inputs.
        feature_mask: integer group ids broadcastable to one example: features shuffled together; for several inputs
            a dict / tuple of masks mirroring them.
        features: which features to shuffle (input keys, or ``(key, index)`` pairs); default every feature of every
            floating-point input. Token ids are shuffled (one position at a time) only when selected here, e.g.
            ``features=["input_ids"]``.
        top_k: features in the chart, and the number newly tracked as scalar curves per run.
        max_rows: validation rows used (a fixed subset, see above).
        seed: seed of the row subset and of the shuffles.
        input_key, target_key, index_key: where the batch holds inputs, labels and dataset indices (see
            :class:`~lightning_lens.utils.BatchAccessor`; as in :class:`SaliencyMapCallback`, a tuple of keys selects
            several inputs and a text batch gives a dict of ``input_ids`` and ``attention_mask``).
        log_prefix: first part of every tag.
        output_fn: maps the LightningModule's output to ``(batch, classes)`` (or ``(batch,)``) scores, e.g.
            ``lambda out: out["scores"]``; not needed for a tensor, a tuple (its first element) or a mapping /
            HuggingFace ``ModelOutput`` with ``"logits"`` (see :func:`~lightning_lens.attribution.base.model_scores`).
        max_overhead: the callback's share of the fit's time; None: no limit.
        strict: raise exceptions from the callback's own work instead of reporting them and continuing.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: failures in a row after which a part is switched off.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or value; at setup, for inputs without a
            floating-point tensor when ``features`` selects nothing else, missing labels, ``feature_names`` that do
            not match the features, or a model output the metric cannot score.

    Example::

        from lightning_lens.callbacks import PermutationImportanceMonitor
        from lightning_lens.datasets import LeakyTabular

        names = LeakyTabular("train").feature_names
        trainer = Trainer(max_epochs=10, callbacks=[PermutationImportanceMonitor(feature_names=names, top_k=5)])
        # Scalars tab: importance/leak rises as the model learns the leaky column
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        n_repeats: int = 5,
        metric: Union[str, Metric] = "accuracy",
        feature_names: Optional[Sequence[str]] = None,
        feature_mask: Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]], Mapping[str, Optional[torch.Tensor]]
                            ] = None,
        top_k: int = 10,
        max_rows: int = 512,
        seed: int = 0,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        log_prefix: str = "importance",
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
        features: Optional[Sequence[Any]] = None,
    ) -> None:
        super().__init__(
            every_n_epochs=check_int(every_n_epochs, "every_n_epochs", minimum=1),
            max_overhead=max_overhead,
            strict=strict,
            verbose=verbose,
            max_failures=max_failures,
        )
        from lightning_lens.loggers import sanitize_tag

        self.n_repeats = check_int(n_repeats, "n_repeats", minimum=1)
        if isinstance(metric, str):
            if metric not in _METRICS:
                raise ValueError(f"metric must be one of {list(_METRICS)} or a callable (outputs, targets) -> float,"
                                 f" got {metric!r}")
        elif not callable(metric):
            raise TypeError(
                f"metric must be a str or a callable (outputs, targets) -> float, got {type(metric).__name__}"
            )
        self.metric = metric
        self.feature_names = check_optional(check_str_list, feature_names, "feature_names")
        masks = feature_mask.values() if isinstance(feature_mask, Mapping) else (
            feature_mask if isinstance(feature_mask, (tuple, list)) else [feature_mask])
        for mask in masks:
            if mask is not None:
                check_instance(mask, "feature_mask", torch.Tensor,
                               hint="integer group ids, one per feature (a dict / tuple of them for several inputs)")
                if mask.is_floating_point():
                    raise TypeError(f"feature_mask must hold integer group ids, got dtype {mask.dtype}")
        self.feature_mask = feature_mask
        if features is not None and (isinstance(features, (str, int)) or not isinstance(features, Sequence)):
            raise TypeError(f"features must be a list of input keys or (input key, feature index) pairs, got"
                            f" {type(features).__name__}")
        self.features = None if features is None else list(features)
        self.top_k = check_int(top_k, "top_k", minimum=1)
        self.max_rows = check_int(max_rows, "max_rows", minimum=2)
        self.seed = check_int(seed, "seed")
        check_instance(log_prefix, "log_prefix", str)
        self.log_prefix = sanitize_tag(log_prefix)
        if not self.log_prefix:
            raise ValueError(f"log_prefix {log_prefix!r} has no usable characters; use letters, digits, '_' or '-'")
        self.output_fn = check_optional(check_callable, output_fn, "output_fn",
                                        hint="the model's output -> (batch, classes) scores")
        self.accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._ids = SampleIds()
        self._active = False
        self._rows: list[tuple[Inputs, torch.Tensor, torch.Tensor]] = []
        self._kept = 0
        self._dataset_size: Optional[int] = None
        self._rank_of: Optional[torch.Tensor] = None  # position of each dataset index in the seeded permutation
        self._no_rows: Optional[Inputs] = None  # the inputs' structure with zero rows (a rank that keeps none)
        self._work_seconds = 0.0
        self.tracked: list[str] = []  # features logged as scalars (once in the top k, always)
        self.last_result: Any = None
        self.last_rows = 0

    def _state_key_fields(self) -> dict[str, Any]:
        return {"log_prefix": self.log_prefix}

    # ----------------------------------------------------------------------------------------------------- setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        if batch is None:
            return
        try:
            x, y = self.accessor.inputs(batch), self.accessor.targets(batch)
        except KeyError as err:
            raise ValueError(f"PermutationImportanceMonitor: {err.args[0]}") from None
        if y is None:
            raise ValueError("PermutationImportanceMonitor found no labels in the validation batches; set target_key")
        self._no_rows = map_inputs(lambda t: t[:0].detach().cpu().clone(), x)
        n = min(_DRY_RUN_ROWS, input_batch_size(x))
        try:
            self._compute(pl_module, map_inputs(lambda t: t[:n], x), torch.as_tensor(y)[:n], n_repeats=1)
        except Exception as err:
            kind = type(err) if isinstance(err, (TypeError, ValueError)) else ValueError
            raise kind(
                f"PermutationImportanceMonitor failed on {n} validation rows at setup: {type(err).__name__}: {err};"
                " check features, feature_names, feature_mask, metric, input_key and output_fn"
            ) from err

    # ----------------------------------------------------------------------------------------------------- hooks
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = self.is_due(trainer)  # collective: every rank, every epoch
        self._rows, self._kept, self._work_seconds = [], 0, 0.0
        self._ids.reset()
        if self._active:
            size = validation_dataset_size(trainer)
            if size != self._dataset_size or self._rank_of is None:
                self._dataset_size = size
                self._rank_of = None if size is None else _permutation_ranks(size, self.seed)

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        start = time.perf_counter()
        x, y = self.accessor.inputs(batch), self.accessor.targets(batch)
        if y is None:
            return
        ids = self._ids.next(trainer, input_batch_size(x), self.accessor.indices(batch), self._dataset_size)
        if self._rank_of is not None:
            keep = (ids >= 0) & (ids < len(self._rank_of))
            keep[keep.clone()] = self._rank_of[ids[keep]] < self.max_rows
        else:  # a stream: this rank's first max_rows rows
            keep = torch.arange(ids.shape[0]) < self.max_rows - self._kept
        if bool(keep.any()):
            with torch.inference_mode(False):
                rows = keep.nonzero().squeeze(1)
                self._rows.append((map_inputs(lambda t: t.detach()[rows.to(t.device)].cpu().clone(), x),
                                   torch.as_tensor(y).detach()[rows.to(torch.as_tensor(y).device)].cpu().clone(),
                                   ids[rows].clone()))
            self._kept += int(keep.sum())
        self._work_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        self._active = False
        start = time.perf_counter()
        x, y, ids = self._local_rows()
        device = pl_module.device if getattr(trainer, "world_size", 1) > 1 else torch.device("cpu")
        # collectives on every rank, outside any part (a part may fail on one rank only)
        x = map_inputs(lambda t: gather_rows(trainer, t.to(device)).cpu(), x)
        y, ids = (gather_rows(trainer, t.to(device)).cpu() for t in (y, ids))
        self._rows = []
        if trainer.is_global_zero and ids.numel():
            ids, y, kept = dedupe_by_id(ids, y, torch.arange(ids.shape[0]))
            order = torch.argsort(ids)
            y, kept = y[order], kept[order]
            x = map_inputs(lambda t: t[kept], x)
            result = self.run_part(trainer, "importance", self._compute, pl_module, x, y,
                                   hint="check features, metric, feature_names and feature_mask")
            if result is not None:
                self.last_result, self.last_rows = result, int(y.shape[0])
                self.run_part(trainer, "log", self._log, trainer, result, int(y.shape[0]))
        self.record_run_cost(self._work_seconds + time.perf_counter() - start)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tracked": list(self.tracked)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tracked = list(state_dict.get("tracked", self.tracked))

    # ------------------------------------------------------------------------------------------------------ work
    def _local_rows(self) -> tuple[Inputs, torch.Tensor, torch.Tensor]:
        if self._rows:
            return (_cat_inputs([r[0] for r in self._rows]), torch.cat([r[1] for r in self._rows]),
                    torch.cat([r[2] for r in self._rows]))
        x = self._no_rows if self._no_rows is not None else torch.zeros((0, 0))
        return x, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)

    def _compute(self, pl_module: "pl.LightningModule", x: Inputs, y: torch.Tensor,
                 n_repeats: Optional[int] = None) -> Any:
        from lightning_lens.callbacks.saliency_maps import _model_inputs  # the probes' device and dtype rule
        from lightning_lens.importance import permutation_importance

        inputs = _model_inputs(x, pl_module)
        return permutation_importance(pl_module, inputs, y.to(input_leaves(inputs)[0].device), metric=self.metric,
                                      n_repeats=n_repeats or self.n_repeats, feature_mask=self.feature_mask,
                                      feature_names=self.feature_names, seed=self.seed, output_fn=self.output_fn,
                                      features=self.features)

    def _log(self, trainer: "pl.Trainer", result: Any, n_rows: int) -> None:
        from lightning_lens import loggers, render

        names = list(result.feature_names)
        mean, std = np.asarray(result.importances_mean), np.asarray(result.importances_std)
        top = [names[j] for j in render.top_features(mean, self.top_k)]
        self.tracked += [f for f in top if f not in self.tracked]
        step = loggers.logging_step(trainer)
        epoch = int(trainer.current_epoch)
        image = render.importance_chart(
            mean, std, names, top_k=self.top_k,
            title=f"permutation importance ({result.metric}, {n_rows} rows, {self.n_repeats} repeats), epoch {epoch}",
            xlabel=f"drop in {result.metric} when the feature is shuffled (mean ± std)",
        )
        tag = f"{self.log_prefix}/permutation"
        loggers.log_image(trainer, tag, image, step=step,
                          caption=f"top {self.top_k} features by mean drop of {result.metric}; error bars: std over"
                                  f" {self.n_repeats} shuffles")
        scalars = {f"{self.log_prefix}/{loggers.sanitize_tag(f)}": float(mean[names.index(f)]) for f in self.tracked}
        scalars[f"{self.log_prefix}/baseline_score"] = float(result.baseline_score)
        loggers.log_scalars(trainer, scalars, step=step)
        loggers.log_json(trainer, tag, {
            "metric": result.metric, "rows": n_rows, "n_repeats": self.n_repeats,
            "baseline_score": float(result.baseline_score),
            "features": [{"name": f, "mean": float(mean[j]), "std": float(std[j]),
                          "importances": [float(v) for v in np.asarray(result.importances)[j]]}
                         for j, f in enumerate(names)],
        }, step=step)

    def summary(self) -> Optional[str]:
        """The most important features of the last run (logged at the end of fit)."""
        if self.last_result is None:
            return None
        ranking = ", ".join(f"{name} {value:.3f}" for name, value in self.last_result.ranking()[: min(self.top_k, 5)])
        return (f"PermutationImportanceMonitor: top features by drop of {self.last_result.metric} on {self.last_rows}"
                f" validation rows: {ranking}")


def _cat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """The rows of several batches of model inputs (a tensor, a tuple or a dict of tensors), concatenated."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(len(first)))  # type: ignore[index]


def _permutation_ranks(size: int, seed: int) -> torch.Tensor:
    """``ranks[i]``: the position of dataset index ``i`` in a permutation drawn from ``seed`` (private generator)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
    ranks = torch.empty(size, dtype=torch.long)
    ranks[order] = torch.arange(size)
    return ranks

