"""``SubgroupErrorSlices``: which subgroups of the validation data the model fails on, every validation epoch."""

from __future__ import annotations

import inspect
import pickle
import time
from collections.abc import Generator
from collections.abc import Callable as CallableABC
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback, log
from lightning_lens.callbacks._gather import SampleIds, all_reduce_sum, gather_objects, validation_dataset_size
from lightning_lens.loggers import log_image, log_json, log_scalars, log_table, logging_step, sanitize_tag
from lightning_lens.slices import Slice, SliceFinder
from lightning_lens.slices.binning import as_column
from lightning_lens.slices.outcomes import EXCLUSION_REASONS, classification_outcomes
from lightning_lens.slices.report import (
    TABLE_COLUMNS,
    TABLE_LEGEND,
    labelled_image_rows,
    slice_table_rows,
    summarize_slices,
)
from lightning_lens.slices.reservoir import Reservoir
from lightning_lens.slices.shards import Gather, Sum
from lightning_lens.slices.tracking import SliceTracker
from lightning_lens.utils import BatchAccessor, preserve_modes, resolve_module
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import (
    check_instance,
    check_int,
    check_optional,
    check_positive_number,
)

__all__ = ["SubgroupErrorSlices"]

MetadataFn = Callable[[Any], Mapping[str, Any]]
# SliceFinder arguments the callback sets itself, and what to pass instead
_OWN_FINDER_ARGS = {
    "time_budget": "pass the search's time budget as max_seconds= (seconds per analysed epoch)",
    "freeze": "the binning is always frozen at the first analysed epoch, so slices keep their names",
}
_FINDER_ARGS = frozenset(inspect.signature(SliceFinder.__init__).parameters) - {"self"}
_EXTRA_FINDER_ARGS = _FINDER_ARGS - set(_OWN_FINDER_ARGS) - {"max_depth", "min_support", "alpha", "min_gap", "seed"}


class SubgroupErrorSlices(LensCallback):
    """Find and follow the validation subgroups where the model errs significantly more than elsewhere.

    During due validation epochs it records, per sample: id, loss, correctness, label, prediction, metadata and
    (optionally) an embedding from a named layer. At the end of the epoch it runs
    :class:`~lightning_lens.slices.SliceFinder` (metadata conjunctions plus embedding clusters, FDR-controlled) and
    logs, through :mod:`lightning_lens.loggers`:

    - ``<prefix>/top``: a table of the top slices (TensorBoard markdown, W&B table, CSV for file loggers);
    - ``<prefix>/acc/<slice>``: accuracy of every slice seen so far, re-measured each analysed epoch with the frozen
      binning (a slice found at epoch 3 keeps its curve; embedding clusters are followed by their member ids), see
      :class:`~lightning_lens.slices.SliceTracker`;
    - ``<prefix>/worst_accuracy`` through ``pl_module.log`` (EarlyStopping / ModelCheckpoint can monitor it): the
      lowest accuracy among the slices reported, or the overall accuracy when none is. In epochs that are not
      analysed the last value is logged again, so monitors always find it;
    - ``<prefix>/excluded``: samples left out because their inputs, logits, loss or embedding hold NaN/inf or their
      label is outside the classes (a data problem is counted, never raised); the table and JSON give the reasons;
    - ``<prefix>/worst_examples``: a grid of the worst slice's misclassified examples (when inputs are images);
    - ``<prefix>/all``: a JSON artifact of every reported slice with its member ids and statistics.

    At the end of fit, rank zero logs a one-line summary of the top slices (``logging.getLogger("lightning_lens")``).

    **Cost**: analysed epochs follow :class:`~lightning_lens.callbacks._base.LensCallback`'s rule (every
    ``every_n_epochs``-th, the first and the last of fit, within ``max_overhead`` of fit time); nothing is collected in
    the others. **No extra forward pass** when ``validation_step`` returns the logits (a ``(B, C)`` tensor, or a dict
    with ``logits_key``, which may also hold ``(B,)`` binary logits); otherwise one no-grad forward per batch in eval
    mode, with a warning. At setup one forward on two validation samples checks the model's output and
    ``embedding_layer``. Embeddings come from a forward hook on ``embedding_layer``, registered only while a validation
    batch runs and removed right after (also on exceptions and at teardown); spatial outputs are average-pooled.

    **Samples** are identified by the batch's index key (``index``/``idx``/``sample_id``, see
    :class:`~lightning_lens.utils.BatchAccessor`), else by :class:`~lightning_lens.callbacks._gather.SampleIds`
    (dataset positions for unshuffled validation loaders, unique across ranks in any case).

    **Under DDP rows never move: ranks count.** Every statistic of the search is a sum over samples, so each rank
    counts its own rows and the counts are all-reduced (:meth:`SliceFinder.find_steps
    <lightning_lens.slices.SliceFinder.find_steps>`); every rank takes the same decisions and ends with the same
    slices and state, equal to those of one process. What crosses ranks: a few scalars; per search level, the
    candidates' count tables; the binning's sample (about ``fit_rows`` = 20,000 rows of metadata, at the first
    analysed epoch only); for ``embedding_layer``, the same sample's embeddings (raw once for the PCA basis, then
    ``n_components`` = 32 PCA coordinates per row each analysed epoch, to fit the clusters, which every rank then
    assigns its rows to); membership counts of the significant slices; the ids of the reported slices' members; and
    the ``4 x num_images`` highest-loss mistakes of the worst slice per rank (for the grid). The repeats a
    ``DistributedSampler`` pads with sit at sampler positions past the dataset's end (the ``k``-th sample of rank
    ``r`` sits at ``k * world_size + r``), so each rank drops them locally; without a ``DistributedSampler`` (e.g.
    ``use_distributed_sampler=False``) the ids alone are gathered and each sample is kept on the first rank that has
    it. Each step of the search runs as a failure-isolated part whose success all ranks agree on before the next
    collective, so a failure on one rank neither hangs nor kills the others.

    **Images of the worst slice** are re-read from the validation dataset by id when ids are positions in a map-style
    dataset (checked: the item read back must carry the same id); otherwise they come from a reservoir of at most
    ``max_stored_inputs`` misclassified inputs kept per rank during the epoch (under DDP, rank zero's own).
    Every rank ends with the same ``last_slices``, ``last_result`` and tracked state; rank zero logs.

    **Metadata**: the tensor/list fields of dict batches (or ``metadata_keys``) plus whatever ``metadata_fn(batch)``
    returns. The binning (quantile bins, top categories) is fitted at the first analysed epoch and frozen, and stored
    in the checkpoint with the tracked slices.

    Args:
        max_depth: most predicates per slice (milliseconds on 10k samples; about a second per million at depth 3).
        min_support: smallest slice: a count, a fraction of the validation set, or None for ``max(30, 0.5% n)``.
        alpha: FDR level (Benjamini-Yekutieli by default, ``correction="bh"`` for Benjamini-Hochberg).
        min_gap: smallest error-rate gap to the rest of the data that is reported.
        metadata_keys: dict-batch key(s) to use as metadata (one string is one key; default: every 1-D per-sample
            field).
        metadata_fn: ``metadata_fn(batch) -> {name: per-sample values}`` for metadata not in the batch.
        embedding_layer: name (``"model.features.8"``) or module whose output is clustered for embedding slices.
        every_n_epochs: analyse every n-th validation epoch of fit (``trainer.validate`` always analyses).
        max_seconds: soft time budget of the search per epoch: deeper levels and the embedding branch are skipped
            once it is spent (the JSON records the depth reached). None: no limit.
        max_table_rows: slices shown in the table.
        num_images: examples in the worst-slice grid (0 disables it).
        max_tracked: slices whose accuracy curves are followed (the first ones seen).
        max_stored_inputs: size of the per-rank reservoir of misclassified inputs (fallback for the image grid).
        input_key, target_key, index_key: where inputs, labels and sample ids are in a batch.
        logits_key: key of the logits in a dict returned by ``validation_step`` (default ``"logits"``). Passing it
            says ``validation_step`` returns them, so the setup check does not require ``model(inputs)`` to work.
        denormalize: undoes input normalisation for display (callable or ``(mean, std)``).
        log_prefix: prefix of every logged name (sanitised: ``..`` and characters unsafe in paths are removed).
        seed: seed of the clustering and the reservoir.
        max_overhead: fraction of fit time the callback may use (None: no limit).
        strict: raise the callback's own failures instead of reporting them and continuing.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: failures in a row after which a part (the search, the table, the grid, ...) is switched off.
        **finder_kwargs: further :class:`~lightning_lens.slices.SliceFinder` arguments (``correction``, ``n_bins``,
            ``n_clusters``, ``cluster_method``, ``score_alpha``, ``max_jaccard``, ``fit_rows``, ...).

    Example:
        >>> trainer = Trainer(callbacks=[SubgroupErrorSlices(max_depth=2),  # doctest: +SKIP
        ...                              EarlyStopping("slices/worst_accuracy", mode="max")])
    """

    def __init__(
        self,
        max_depth: int = 2,
        min_support: Union[int, float, None] = None,
        alpha: float = 0.05,
        min_gap: float = 0.05,
        metadata_keys: Union[str, Sequence[str], None] = None,
        metadata_fn: Optional[MetadataFn] = None,
        embedding_layer: Union[str, nn.Module, None] = None,
        every_n_epochs: int = 1,
        max_seconds: Optional[float] = 30.0,
        max_table_rows: int = 10,
        num_images: int = 16,
        max_tracked: int = 50,
        max_stored_inputs: int = 256,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        logits_key: Optional[str] = None,
        denormalize: Any = None,
        log_prefix: str = "slices",
        seed: int = 0,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
        **finder_kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=check_int(every_n_epochs, "every_n_epochs", minimum=1),
                         max_overhead=max_overhead, strict=strict, verbose=verbose, max_failures=max_failures)
        for name, value in finder_kwargs.items():
            if name in _OWN_FINDER_ARGS:
                raise TypeError(f"SubgroupErrorSlices got {name}={value!r}: {_OWN_FINDER_ARGS[name]}")
            if name not in _EXTRA_FINDER_ARGS:
                raise TypeError(f"SubgroupErrorSlices got an unknown argument {name}={value!r}; the further "
                                f"SliceFinder arguments it takes are {sorted(_EXTRA_FINDER_ARGS)}")
        max_seconds = check_optional(check_positive_number, max_seconds, "max_seconds")
        max_depth = check_int(max_depth, "max_depth", minimum=1, maximum=4)
        self.seed = check_int(seed, "seed")
        self.finder = SliceFinder(max_depth=max_depth, min_support=min_support, alpha=alpha, min_gap=min_gap,
                                  time_budget=max_seconds, seed=self.seed, freeze=True, **finder_kwargs)
        # checks the keys; one metadata key as a string is one key
        self.accessor = BatchAccessor(input_key, target_key, index_key, metadata_keys)
        self.metadata_fn = check_optional(check_instance, metadata_fn, "metadata_fn", CallableABC,
                                          hint="batch -> {name: per-sample values}")
        self.embedding_layer = check_optional(check_instance, embedding_layer, "embedding_layer", (str, nn.Module),
                                              hint="a module name such as 'backbone.layer4', or the module")
        self.max_seconds = max_seconds
        self.max_table_rows = check_int(max_table_rows, "max_table_rows", minimum=1)
        self.num_images = check_int(num_images, "num_images", minimum=0)
        self.max_stored_inputs = check_int(max_stored_inputs, "max_stored_inputs", minimum=0)
        self.logits_key = check_optional(check_instance, logits_key, "logits_key", str)
        if denormalize is not None and not callable(denormalize) and not (
            isinstance(denormalize, Sequence) and not isinstance(denormalize, str) and len(denormalize) == 2
        ):
            raise TypeError(f"denormalize must be a callable or a (mean, std) pair, got {denormalize!r}")
        self.denormalize = denormalize
        check_instance(log_prefix, "log_prefix", str)
        self.log_prefix = sanitize_tag(log_prefix)
        if not self.log_prefix:
            raise ValueError(f"log_prefix={log_prefix!r} has no usable characters; use letters, digits, '_', '-', '/'")
        if self.log_prefix != log_prefix:
            self.warn_once("prefix", f"SubgroupErrorSlices logs under {self.log_prefix!r} (log_prefix={log_prefix!r}"
                                     " sanitised: names stay under the logger's directory)")

        self.tracker = SliceTracker(max_tracked)
        self.last_slices: list[Slice] = []
        self.last_result: dict[str, Any] = {}
        self._reservoir: Reservoir[torch.Tensor] = Reservoir(self.max_stored_inputs, seed=self.seed)
        self._ids = SampleIds()
        self._seen = 0  # samples this rank saw this epoch: their sampler positions
        self._layer: Optional[nn.Module] = None
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None
        self._captured: Optional[torch.Tensor] = None
        self._rows: list[dict[str, Any]] = []
        self._dataset_size: Optional[int] = None
        self._ids_from_batch = True
        self._active = False
        self._work_seconds = 0.0
        self._worst: Optional[float] = None  # the last worst_accuracy, logged again in epochs not analysed
        self._summary: Optional[str] = None

    @property
    def max_tracked(self) -> int:
        return self.tracker.max_tracked

    @property
    def tracked(self) -> dict[str, dict[str, Any]]:
        """Slices followed across epochs: tracking name -> definition (see :class:`SliceTracker`)."""
        return self.tracker.tracked

    def _state_key_fields(self) -> dict[str, Any]:
        layer = self.embedding_layer
        return {"log_prefix": self.log_prefix,
                "embedding_layer": layer if layer is None or isinstance(layer, str) else type(layer).__name__}

    # ------------------------------------------------------------------------------------------------ setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        if self.embedding_layer is not None:
            self._layer = resolve_module(pl_module, self.embedding_layer, argument="embedding_layer")
        if batch is None:
            return
        inputs = _read(self.accessor.inputs, batch, "input_key")
        b = int(inputs.shape[0])
        targets = _read(self.accessor.targets, batch, "target_key")
        if targets is None:
            raise ValueError("SubgroupErrorSlices found no labels in the validation batch; pass target_key= (a key, "
                             "a position or a callable batch -> labels)")
        if targets.numel() != b:
            raise ValueError(f"target_key selects labels of shape {tuple(targets.shape)} for a batch of {b}; "
                             "SubgroupErrorSlices needs one class index per sample (for one-hot labels pass "
                             "target_key=lambda batch: batch[...].argmax(1))")
        indices = _read(self.accessor.indices, batch, "index_key")
        if indices is not None and indices.numel() != b:
            raise ValueError(f"index_key selects {indices.numel()} ids for a batch of {b}; pass index_key= for a "
                             "field with one dataset index per sample")
        meta = self._metadata(batch, b, check=True)
        if not meta and self.embedding_layer is None:
            raise ValueError("SubgroupErrorSlices has nothing to slice on: the validation batch has no per-sample "
                             "metadata; use dict batches with per-sample fields, or pass metadata_fn= or "
                             "embedding_layer=")
        self._check_model_output(pl_module, inputs[:2])
        if self.num_images and self.denormalize is not None and _is_image(inputs):
            from lightning_lens.render import to_rgb_uint8

            try:
                to_rgb_uint8(inputs[0].detach().cpu().float(), denormalize=self.denormalize)
            except Exception as err:
                raise ValueError(f"denormalize={self.denormalize!r} failed on a validation image of shape "
                                 f"{tuple(inputs.shape[1:])} ({type(err).__name__}: {err}); pass (mean, std) with "
                                 f"one value per channel ({inputs.shape[1]}) or a callable image -> image") from err

    def _check_model_output(self, pl_module: "pl.LightningModule", probe: torch.Tensor) -> None:
        """One forward on two samples: the logits are usable and ``embedding_layer`` gives one row per sample."""
        if self.logits_key is not None and self._layer is None:
            return  # validation_step returns the logits: the forward is never needed
        captured: list[Any] = []
        handle = None if self._layer is None else self._layer.register_forward_hook(
            lambda module, args, output: captured.append(output))
        try:
            with torch.no_grad(), preserve_modes(pl_module, mode=False):
                output = pl_module(probe)
        except Exception as err:
            if self.logits_key is not None:
                return  # the logits come from validation_step, the layer runs inside it
            raise ValueError(
                f"SubgroupErrorSlices needs the model's logits, but model(inputs) failed on 2 validation samples "
                f"({type(err).__name__}: {err}); return them from validation_step as {{'logits': logits}} and pass "
                "logits_key='logits', or set input_key= to what forward takes") from err
        finally:
            if handle is not None:
                handle.remove()
        logits = _forward_logits(output, probe.shape[0], self.logits_key or "logits")
        if self.logits_key is None and (logits is None or logits.dim() > 2 or logits.numel() == 0):
            raise ValueError(
                f"SubgroupErrorSlices needs classification logits (B, C) or (B,), but model(inputs) returned "
                f"{_describe(output)}; return them from validation_step as {{'logits': logits}} and pass "
                "logits_key='logits'")
        if self._layer is not None:
            rows = [o for o in captured if isinstance(_first_tensor(o), torch.Tensor)]
            if not rows or _first_tensor(rows[-1]).shape[0] != probe.shape[0]:
                got = "did not run" if not rows else f"gave shape {tuple(_first_tensor(rows[-1]).shape)}"
                raise ValueError(
                    f"embedding_layer={self.embedding_layer!r} {got} during the forward of {probe.shape[0]} "
                    "samples; pick a layer whose output has one row per sample (e.g. the penultimate layer)")

    # ------------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = self.is_due(trainer)  # collective: every rank, every epoch
        self._rows, self._work_seconds, self._ids_from_batch = [], 0.0, True
        self._ids.reset()
        self._seen = 0
        self._reservoir.reset()
        if self._active:
            self._dataset_size = validation_dataset_size(trainer)
            if self.embedding_layer is not None:
                self._layer = resolve_module(pl_module, self.embedding_layer, argument="embedding_layer")

    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active and dataloader_idx == 0 and self._layer is not None:
            self._remove_hook()
            self._captured = None
            self._hook = self._layer.register_forward_hook(self._capture)

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        start = time.perf_counter()
        try:
            if self._active and dataloader_idx == 0:
                inputs = self.accessor.inputs(batch)
                indices = self.accessor.indices(batch)
                self._ids_from_batch &= indices is not None
                b = int(inputs.shape[0])
                ids = self._ids.next(trainer, b, indices, self._dataset_size)
                world, rank = max(1, int(trainer.world_size)), int(trainer.global_rank)
                positions = (np.arange(self._seen, self._seen + b, dtype=np.int64) * world + rank)
                self._seen += b
                self.run_part(trainer, "collect", self._collect, trainer, pl_module, outputs, batch, inputs, ids,
                              positions, hint="check input_key, target_key, metadata_fn and what validation_step "
                                              "returns")
        finally:
            self._remove_hook()
            if self._active:
                self._work_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            self._log_worst(trainer, pl_module)
            return
        self._active = False
        start = time.perf_counter()
        finder_state, tracker_state = self.finder.state_dict(), self.tracker.state_dict()
        result = self._run_steps(trainer, self._analysis_steps(trainer))
        self._rows = []
        if result is None:  # failed on some rank: every rank restores the state it had, so all stay equal
            self.finder.load_state_dict(finder_state)
            self.tracker.load_state_dict(tracker_state)
        else:
            self._apply(result["shared"])
            self.last_slices = result["local"]["slices"]
        self._log_worst(trainer, pl_module)
        if result is not None and trainer.is_global_zero:
            self._report(trainer, result["local"])
        self._reservoir.reset()
        self.record_run_cost(self._work_seconds + time.perf_counter() - start)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hook()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hook()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "finder": self.finder.state_dict(), "tracked": self.tracker.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.finder.load_state_dict(state_dict.get("finder", {}))
        self.tracker.load_state_dict(state_dict.get("tracked", {}))

    # ------------------------------------------------------------------------------------------------ collection
    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        output = _first_tensor(output)
        if isinstance(output, torch.Tensor):
            self._captured = output.detach()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _logits(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                inputs: torch.Tensor) -> torch.Tensor:
        b = inputs.shape[0]
        key = self.logits_key or "logits"
        # A bare tensor counts as logits only when it is (B, C): a (B,) tensor could as well be per-sample losses.
        if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == b:
            return outputs.detach()
        if isinstance(outputs, Mapping) and isinstance(outputs.get(key), torch.Tensor):
            return outputs[key].detach()
        if trainer.is_global_zero:
            self.warn_once("forward", f"validation_step returns no logits (a (B, C) tensor or a dict with {key!r}); "
                                      "SubgroupErrorSlices runs one extra no-grad forward pass per validation batch")
        with torch.no_grad(), preserve_modes(pl_module, mode=False):
            output = pl_module(inputs)
        logits = _forward_logits(output, b, key)
        if logits is None:
            raise ValueError(f"no logits in validation_step's output nor in model(inputs) ({_describe(output)}); "
                             f"return {{{key!r}: logits}} from validation_step")
        return logits

    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                 inputs: torch.Tensor, ids: torch.Tensor, positions: np.ndarray) -> None:
        b = int(inputs.shape[0])
        targets = self.accessor.targets(batch)
        if targets is None:
            raise ValueError("SubgroupErrorSlices found no labels in the validation batch; pass target_key=")
        logits = self._logits(trainer, pl_module, outputs, inputs)
        if logits.shape[0] != b:
            raise ValueError(f"the logits have {logits.shape[0]} rows for a batch of {b}; set logits_key or return "
                             "per-sample logits from validation_step")
        row: dict[str, Any] = classification_outcomes(logits, targets, inputs)
        row["id"] = ids.numpy()
        row["position"] = positions
        row["meta"] = self._metadata(batch, b)
        if self._layer is not None:
            if self._captured is None or self._captured.shape[0] != b:
                raise RuntimeError(
                    f"embedding_layer={self.embedding_layer!r} produced no output with one row per sample during this "
                    "validation batch; pick a layer the forward pass runs on the batch")
            emb = self._captured.float()
            emb = emb.flatten(2).mean(dim=2) if emb.dim() > 2 else emb.reshape(b, -1)
            bad = ~torch.isfinite(emb).all(dim=1).cpu().numpy() & (row["status"] == 0)
            row["status"][bad] = EXCLUSION_REASONS.index("non-finite embedding") + 1
            row["embedding"] = emb.cpu().numpy()
            self._captured = None
        self._rows.append(row)
        if self.num_images and self.max_stored_inputs and _is_image(inputs):
            for j in np.flatnonzero(~row["correct"] & (row["status"] == 0)):
                self._reservoir.offer(int(row["id"][j]), inputs[j].detach().cpu().float().clone())

    def _metadata(self, batch: Any, b: int, check: bool = False) -> dict[str, np.ndarray]:
        keys = self.accessor.metadata_keys
        try:
            meta = dict(self.accessor.metadata(batch))
        except KeyError as err:
            raise ValueError(f"{err.args[0]}; pass metadata_keys= with keys of the batch, or metadata_fn=") from err
        if check and keys is not None:
            if not isinstance(batch, Mapping):
                raise ValueError(f"metadata_keys={list(keys)} needs dict batches, got {type(batch).__name__}; pass "
                                 "metadata_fn=batch -> {name: per-sample values} instead")
            unused = [k for k in keys if k not in meta and not k.endswith("_mask")]
            if unused:
                raise ValueError(f"metadata_keys names {unused}, which hold no per-sample values (a 1-D tensor or a "
                                 f"list of {b}); pass keys of per-sample fields, or metadata_fn=")
        if self.metadata_fn is not None:
            try:
                extra = self.metadata_fn(batch)
            except Exception as err:
                if not check:
                    raise
                raise ValueError(f"metadata_fn raised {type(err).__name__}: {err} on a validation batch; fix it or "
                                 "leave it out") from err
            if not isinstance(extra, Mapping):
                raise TypeError(
                    f"metadata_fn must return a dict of name -> per-sample values, got {type(extra).__name__}")
            meta.update(extra)
        out = {}
        for k, v in meta.items():
            col = _plain_column(as_column(v, str(k)))
            if col.size != b:
                raise ValueError(f"metadata {k!r} has {col.size} values for a batch of {b} samples; metadata_fn and "
                                 "metadata_keys must give one value per sample")
            out[str(k)] = col
        return out

    # ------------------------------------------------------------------------------------------------ analysis
    def _run_steps(self, trainer: "pl.Trainer", steps: Generator) -> Optional[dict[str, Any]]:
        """Drive the analysis: its local work runs as the part "search" (the same on every rank, success agreed by
        all ranks), and its requests are answered with collectives between the parts, on every rank."""
        reply: Any = None
        while True:
            step = self.run_part(trainer, "search", _advance, steps, reply, collective=True,
                                 hint="see the exception; pass strict=True to debug it")
            if step is None:
                steps.close()
                return None
            kind, payload = step
            if kind == "done":
                return payload
            if kind == "sum":
                tensor, layout = payload
                reply = ("sum", (all_reduce_sum(trainer, tensor), layout))
            else:
                reply = ("gather", gather_objects(trainer, payload))

    def _analysis_steps(self, trainer: "pl.Trainer") -> Generator:
        """This rank's rows -> the slices of all ranks' rows (a generator of the sums and gathers it needs)."""
        epoch = int(trainer.current_epoch)
        data = _concat_rows(self._rows)
        world, rank = max(1, int(trainer.world_size)), int(trainer.global_rank)
        data = yield from _drop_repeats(data, world, rank, _distributed_sampler(trainer))
        schema = yield Gather(_schema(data))
        data = _conform(data, schema)
        status = np.bincount(data["status"].astype(np.int64), minlength=len(EXCLUSION_REASONS) + 1)
        usable = np.flatnonzero(data["status"] == 0)
        data = _take(data, usable)
        sums = yield Sum({"status": status.astype(np.float64),
                          "n": np.array([usable.size, np.count_nonzero(data["correct"])], dtype=np.float64)})
        excluded = {reason: int(sums["status"][i + 1]) for i, reason in enumerate(EXCLUSION_REASONS)
                    if sums["status"][i + 1]}
        n, n_correct = int(sums["n"][0]), int(sums["n"][1])
        slices: list[Slice] = []
        accuracy = None
        report: dict[str, Any] = {}
        if n:
            accuracy = n_correct / n
            if data["meta"] or "embedding" in data:
                slices = yield from self.finder.find_steps(~data["correct"], data["meta"] or None,
                                                           losses=data["loss"], embeddings=data.get("embedding"),
                                                           ids=data["id"])
                report = dict(self.finder.last_report_)
            elif trainer.is_global_zero:
                self.warn_once("nothing", "SubgroupErrorSlices has nothing to slice on: use dict batches with "
                                          "per-sample metadata, metadata_fn=, or embedding_layer=")
        names = self.tracker.add(slices, epoch)
        accuracies: dict[str, float] = {}
        if n and self.tracker.tracked:
            counts = yield Sum(self.tracker.counts(data["correct"], data["id"], data["meta"], self.finder.binning_))
            accuracies = self.tracker.accuracies_from_counts(counts)
        worst_rows = None
        if slices and self.num_images:
            worst_slice = min(slices, key=lambda s: s.accuracy)
            shards = yield Gather(_worst_mistakes(data, worst_slice, 4 * self.num_images))
            worst_rows = _merge_mistakes(shards)
        worst = None if accuracy is None else min([accuracy] + [s.accuracy for s in slices])
        shared = {"worst_accuracy": worst, "accuracy": accuracy, "n_samples": n, "excluded": sum(excluded.values()),
                  "excluded_by_reason": excluded, "slices": [s.name for s in slices], "epoch": epoch}
        local = {"n": n, "slices": slices, "names": names, "accuracies": accuracies, "report": report,
                 "accuracy": accuracy, "excluded": excluded, "epoch": epoch, "worst_rows": worst_rows}
        return {"shared": shared, "local": local}

    def _apply(self, shared: Mapping[str, Any]) -> None:
        """Every rank computed the same result (from the same sums): keep it."""
        self.last_result = dict(shared)
        if shared["worst_accuracy"] is not None:
            self._worst = float(shared["worst_accuracy"])

    def _log_worst(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``worst_accuracy`` through ``pl_module.log`` on every rank (the value is the same everywhere)."""
        if self._worst is None or trainer.sanity_checking:
            return
        pl_module.log(f"{self.log_prefix}/worst_accuracy", self._worst, on_epoch=True,
                      sync_dist=trainer.world_size > 1)

    def _report(self, trainer: "pl.Trainer", local: Mapping[str, Any]) -> None:
        """Rank zero: each output is a part of its own, so a failing one (a logger, ``denormalize``) costs only it."""
        step = logging_step(trainer)
        slices, n, excluded = local["slices"], local["n"], sum(local["excluded"].values())
        self.last_slices = slices
        accuracy = local["accuracy"]
        self._summary = f"epoch {local['epoch']}: " + summarize_slices(slices, n, accuracy or 0.0, excluded)
        scalars = {f"{self.log_prefix}/acc/{k}": v for k, v in local["accuracies"].items()}
        scalars.update({f"{self.log_prefix}/num_slices": len(slices), f"{self.log_prefix}/excluded": excluded})
        if accuracy is not None:
            scalars[f"{self.log_prefix}/overall_accuracy"] = accuracy
        self.run_part(trainer, "scalars", log_scalars, trainer, scalars, step=step)
        first_seen = {k: self.tracker.first_seen(k, local["epoch"]) for k in local["names"]}
        rows = slice_table_rows(slices, names=local["names"], first_seen=first_seen, epoch=local["epoch"],
                                max_rows=self.max_table_rows, n_samples=n, accuracy=accuracy or 0.0,
                                alpha=self.finder.alpha, min_gap=self.finder.min_gap, excluded=excluded)
        self.run_part(trainer, "table", log_table, trainer, f"{self.log_prefix}/top", TABLE_COLUMNS, rows, step=step,
                      legend=TABLE_LEGEND)
        payload = {
            "epoch": local["epoch"], "global_step": step, "n_samples": n, "overall_accuracy": accuracy,
            "excluded": {"total": excluded, **local["excluded"]}, "search": local["report"],
            "tracked_accuracy": local["accuracies"],
            "binning": None if self.finder.binning_ is None else self.finder.binning_.to_dict(),
            "slices": [dict(s.to_dict(), tracked_as=k) for s, k in zip(slices, local["names"])],
        }
        self.run_part(trainer, "json", log_json, trainer, f"{self.log_prefix}/all", payload, step=step)
        if slices and self.num_images and local["worst_rows"] is not None:
            self.run_part(trainer, "worst examples", self._log_worst_examples, trainer,
                          min(slices, key=lambda s: s.accuracy), local["worst_rows"], step,
                          hint="check denormalize (a callable image -> image, or (mean, std) per channel)")

    def _log_worst_examples(self, trainer: "pl.Trainer", s: Slice, rows: Mapping[str, np.ndarray], step: int) -> None:
        """The worst slice's misclassified members (``rows``: from every rank, highest loss first)."""
        images = self._fetch_inputs(trainer, rows["id"])
        if not images:
            return
        from lightning_lens.render import to_rgb_uint8

        position = {int(i): j for j, i in enumerate(rows["id"])}
        cells = [to_rgb_uint8(x, denormalize=self.denormalize) for _, x in images[: self.num_images]]
        labels = [f"#{sid} y={rows['label'][position[sid]]} pred={rows['pred'][position[sid]]}"
                  for sid, _ in images[: self.num_images]]
        caption = (f"{s.name}: accuracy {s.accuracy:.3f} on {s.size} samples "
                   f"(rest {1 - s.rest_rate:.3f}); misclassified members, highest loss first")
        title = (f"slice {s.name} (epoch {trainer.current_epoch}): accuracy {s.accuracy:.3f} on n={s.size},"
                 " misclassified members")
        log_image(trainer, f"{self.log_prefix}/worst_examples", labelled_image_rows(cells, labels, title=title),
                  step=step, caption=caption)

    def _fetch_inputs(self, trainer: "pl.Trainer", ids: np.ndarray) -> list[tuple[int, torch.Tensor]]:
        """Inputs of the given ids: re-read from the validation dataset by index when possible, else the reservoir."""
        wanted = [int(i) for i in ids[: 4 * self.num_images]]
        dataset = _val_dataset(trainer)
        if self._ids_from_batch and dataset is not None and wanted:
            try:
                out = []
                for i in wanted[: self.num_images]:
                    item = _batchify(dataset[i])
                    index = self.accessor.indices(item)
                    if index is None or int(index.reshape(-1)[0]) != i:
                        raise LookupError("the item's own id differs: ids are not positions in the dataset")
                    out.append((i, self.accessor.inputs(item)[0].detach().cpu().float()))
                return out
            except Exception:  # not indexable by id, or items unlike batches: use the reservoir
                pass
        stored = self._reservoir.as_dict()
        return [(i, stored[i]) for i in wanted if i in stored]

    def summary(self) -> Optional[str]:
        """The top slices of the last analysed epoch with their size and accuracy (logged at the end of fit)."""
        return None if self._summary is None else f"{self.name} ({self.log_prefix}): {self._summary}"


# ---------------------------------------------------------------------------------------------------- helpers
def _read(read: Callable[[Any], Any], batch: Any, argument: str) -> Any:
    """``read(batch)`` with a missing key reported as a ValueError naming ``argument``."""
    try:
        return read(batch)
    except KeyError as err:
        raise ValueError(f"{err.args[0] if err.args else err}") from err
    except TypeError as err:
        raise TypeError(f"{argument}: {err}") from err


def _is_image(inputs: torch.Tensor) -> bool:
    return inputs.dim() == 4 and inputs.shape[1] in (1, 3)


def _first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return output


def _forward_logits(output: Any, b: int, key: str) -> Optional[torch.Tensor]:
    """The logits in a forward's output: a tensor, ``output[key]`` of a dict, or the first tensor of a tuple."""
    if isinstance(output, Mapping):
        output = output.get(key)
    elif isinstance(output, (tuple, list)):
        output = _first_tensor(output)
    if isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] == b:
        return output.detach()
    return None


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {list(output)}"
    return f"a {type(output).__name__}"


def _plain_column(col: np.ndarray) -> np.ndarray:
    """Object columns hold only None, bools, numbers and strings (anything else as its ``str``), so the rows always
    pickle for the gather."""
    if col.dtype.kind != "O":
        return col
    out = np.empty(col.size, dtype=object)
    out[:] = [v if v is None or isinstance(v, (bool, int, float, str)) else
              (v.item() if isinstance(v, np.generic) else str(v)) for v in col]
    return out


def _concat_rows(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    rows = [r for r in rows if r is not None and r["id"].size]
    if not rows:
        return None
    out: dict[str, Any] = {}
    for key in rows[0]:
        if key == "meta":
            names = [k for k in rows[0]["meta"] if all(k in r["meta"] for r in rows)]
            out["meta"] = {k: _cat_column([r["meta"][k] for r in rows]) for k in names}
        elif all(key in r for r in rows):
            out[key] = np.concatenate([r[key] for r in rows])
    return out


def _advance(steps: Generator, reply: Any) -> tuple[str, Any]:
    """One step of the analysis on this rank: unpack the last answer, run to the next request, pack it.

    Packing (flattening sums into one float64 tensor, pickling gathers) happens here, inside the failure-isolated
    part, so the collective that follows gets a payload that cannot fail on one rank only."""
    if reply is not None:
        kind, payload = reply
        if kind == "sum":
            tensor, layout = payload
            flat = tensor.cpu().numpy()
            reply, start = {}, 0
            for key, shape, size in layout:
                reply[key] = flat[start:start + size].reshape(shape)
                start += size
        else:
            reply = [pickle.loads(p) for p in payload]
    try:
        request = steps.send(reply)
    except StopIteration as stop:
        return "done", stop.value
    if isinstance(request, Sum):
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in request.arrays.items()}
        layout = [(k, v.shape, v.size) for k, v in arrays.items()]
        flat = np.concatenate([v.ravel() for v in arrays.values()]) if arrays else np.zeros(0)
        return "sum", (torch.from_numpy(flat), layout)
    if isinstance(request, Gather):
        return "gather", pickle.dumps(request.obj)
    raise TypeError(f"the analysis yielded {type(request).__name__}; expected Sum or Gather")


def _distributed_sampler(trainer: "pl.Trainer") -> Optional[torch.utils.data.DistributedSampler]:
    """The validation loader's ``DistributedSampler`` (Lightning's default under DDP), None if it has none."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    for sampler in (getattr(loaders, "sampler", None), getattr(getattr(loaders, "batch_sampler", None), "sampler",
                                                               None)):
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            return sampler
    return None


def _drop_repeats(data: Optional[dict[str, Any]], world: int, rank: int,
                  sampler: Optional[torch.utils.data.DistributedSampler]) -> Generator:
    """This rank's rows without the samples another row (here or on another rank) already stands for.

    With a ``DistributedSampler`` the padding repeats are the rows at sampler positions past the dataset's end (it
    pads the end of its index list and deals positions round-robin), dropped locally; without one (several ranks may
    see the same samples), the ids are gathered and a sample is kept on the first rank that has it. Repeated ids on
    one rank keep their first row."""
    ids = np.zeros(0, dtype=np.int64) if data is None else data["id"]
    keep = np.ones(ids.size, dtype=bool)
    if world > 1 and sampler is not None:
        if data is not None:
            keep &= data["position"] < len(sampler.dataset)
    elif world > 1:
        shards = yield Gather(ids)
        earlier = np.concatenate([np.asarray(p, dtype=np.int64) for p in shards[:rank]] + [np.zeros(0, np.int64)])
        keep &= ~np.isin(ids, earlier)
    _, first = np.unique(ids, return_index=True)
    once = np.zeros(ids.size, dtype=bool)
    once[first] = True
    keep &= once
    if data is None or keep.all():
        return data
    return _take(data, np.flatnonzero(keep))


def _schema(data: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """What this rank's rows hold (None without rows): metadata names and dtypes, embedding width."""
    if data is None:
        return None
    return {"meta": [(k, v.dtype.str) for k, v in data["meta"].items()],
            "embedding": None if "embedding" not in data else int(data["embedding"].shape[1])}


def _conform(data: Optional[dict[str, Any]], schemas: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """Rows with the metadata every rank has (first rank's order) and an embedding only if all ranks have one; a
    rank without rows gets empty columns of the first rank's dtypes, so every rank asks the same questions."""
    known = [s for s in schemas if s is not None]
    if not known:
        names, width = [], None
    else:
        names = [k for k, _ in known[0]["meta"] if all(k in dict(s["meta"]) for s in known)]
        widths = {s["embedding"] for s in known}
        if len(widths) > 1 and None not in widths:
            raise ValueError(f"embedding_layer gives {sorted(widths)} features on different ranks")
        width = widths.pop() if len(widths) == 1 else None  # a rank without embeddings: none this epoch
    if data is None:
        dtypes = dict(known[0]["meta"]) if known else {}
        data = {"id": np.zeros(0, np.int64), "position": np.zeros(0, np.int64), "loss": np.zeros(0),
                "pred": np.zeros(0, np.int64), "label": np.zeros(0, np.int64), "confidence": np.zeros(0),
                "correct": np.zeros(0, bool), "status": np.zeros(0, np.int8),
                "meta": {k: np.zeros(0, dtype=np.dtype(dtypes[k])) for k in names}}
        if width is not None:
            data["embedding"] = np.zeros((0, width), dtype=np.float32)
        return data
    data = dict(data, meta={k: data["meta"][k] for k in names})
    if width is None:
        data.pop("embedding", None)
    return data


def _worst_mistakes(data: Mapping[str, Any], s: Slice, k: int) -> dict[str, np.ndarray]:
    """This rank's ``k`` misclassified members of ``s`` with the highest loss (ties: lower id first)."""
    wrong = np.isin(data["id"], s.indices) & ~data["correct"]
    order = np.flatnonzero(wrong)[np.lexsort((data["id"][wrong], -data["loss"][wrong]))][:k]
    return {key: data[key][order] for key in ("id", "loss", "label", "pred")}


def _merge_mistakes(shards: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = {key: np.concatenate([s[key] for s in shards]) for key in ("id", "loss", "label", "pred")}
    order = np.lexsort((rows["id"], -rows["loss"]))
    return {key: v[order] for key, v in rows.items()}


def _cat_column(parts: list[np.ndarray]) -> np.ndarray:
    if any(p.dtype.kind == "O" for p in parts):
        return np.concatenate([p.astype(object) for p in parts])
    return np.concatenate(parts)


def _take(data: dict[str, Any], index: np.ndarray) -> dict[str, Any]:
    out = {k: v[index] for k, v in data.items() if k != "meta"}
    out["meta"] = {k: v[index] for k, v in data.get("meta", {}).items()}
    return out


def _val_dataset(trainer: "pl.Trainer") -> Any:
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    dataset = getattr(loaders, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    return dataset


def _batchify(item: Any) -> Any:
    """A one-sample batch from a dataset item, so the batch accessor reads it like a collated batch."""
    if isinstance(item, torch.Tensor):
        return item.unsqueeze(0)
    if isinstance(item, Mapping):
        return {k: _batchify(v) if isinstance(v, torch.Tensor) else [v] for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_batchify(v) if isinstance(v, torch.Tensor) else [v] for v in item)
    return item
