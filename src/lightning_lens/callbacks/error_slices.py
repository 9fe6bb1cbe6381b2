"""``SubgroupErrorSlices``: which subgroups of the validation data the model fails on, every validation epoch."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens._pl import Callback, pl, rank_zero_warn
from lightning_lens.loggers import log_image, log_json, log_scalars, log_table, logging_step
from lightning_lens.slices import Slice, SliceFinder
from lightning_lens.slices.binning import as_column
from lightning_lens.utils import BatchAccessor, preserve_modes, resolve_module
from lightning_lens.utils.batch import Key

__all__ = ["SubgroupErrorSlices"]

MetadataFn = Callable[[Any], Mapping[str, Any]]
_TABLE_COLUMNS = ["rank", "slice", "kind", "n", "share", "accuracy", "error [95% CI]", "rest error", "gap", "ratio",
                  "mean loss", "q", "score", "first seen"]


class SubgroupErrorSlices(Callback):
    """Find and follow the validation subgroups where the model errs significantly more than elsewhere.

    During validation it records, per sample: id, loss, correctness, label, prediction, metadata and (optionally) an
    embedding from a named layer. At the end of every ``every_n_epochs``-th validation epoch it runs
    :class:`~lightning_lens.slices.SliceFinder` (metadata conjunctions plus embedding clusters, FDR-controlled) and
    logs, through :mod:`lightning_lens.loggers`:

    - ``<prefix>/top``: a table of the top slices (TensorBoard markdown, W&B table, CSV for file loggers);
    - ``<prefix>/acc/<slice>``: accuracy of every slice seen so far, re-measured each epoch with the frozen binning
      (a slice found at epoch 3 keeps its curve; embedding clusters are followed by their member ids);
    - ``<prefix>/worst_accuracy`` through ``pl_module.log`` (EarlyStopping / ModelCheckpoint can monitor it): the
      lowest accuracy among the slices reported this epoch, or the overall accuracy when none is;
    - ``<prefix>/worst_examples``: a grid of the worst slice's misclassified examples (when inputs are images);
    - ``<prefix>/all``: a JSON artifact of every reported slice with its member ids and statistics.

    **No extra forward pass** when ``validation_step`` returns the logits (a ``(B, C)`` tensor, or a dict with
    ``logits_key``, which may also hold ``(B,)`` binary logits);
    otherwise the callback runs one no-grad forward per batch in eval mode and warns once. Embeddings come from a
    forward hook on ``embedding_layer``, registered only while a validation batch runs and removed right after
    (also on exceptions and at teardown); outputs with spatial dimensions are average-pooled to ``(B, C)``.

    **Samples** are identified by the batch's index key (``index``/``idx``/``sample_id``, see
    :class:`~lightning_lens.utils.BatchAccessor`). Under DDP every rank's rows are gathered (``all_gather_object``,
    which handles ranks with different sizes and string metadata), and the repeats a ``DistributedSampler`` adds are
    removed by id; rank zero computes and logs, and broadcasts the result so every rank logs the same
    ``worst_accuracy`` and keeps the same state. Without an index key, ids are positions in the (unshuffled) order a
    ``DistributedSampler`` interleaves, which is exact only for ``shuffle=False`` validation loaders.

    **Images of the worst slice** are re-read from the validation dataset by id when ids are positions in a map-style
    dataset (checked: the item read back must carry the same id); otherwise they come from a reservoir of at most
    ``max_stored_inputs`` misclassified inputs kept per rank during the epoch (under DDP, rank zero's own).
    Results (``last_slices``) live on rank zero; every rank gets ``last_result`` and the tracked state.

    **Metadata**: the tensor/list fields of dict batches (or ``metadata_keys``) plus whatever ``metadata_fn(batch)``
    returns. The binning (quantile bins, top categories) is fitted at the first analysed epoch and frozen, and stored
    in the checkpoint with the tracked slices.

    Args:
        max_depth: most predicates per slice (2 is milliseconds on 10k samples; 3 costs ~10x).
        min_support: smallest slice: a count, a fraction of the validation set, or None for ``max(30, 0.5% n)``.
        alpha: FDR level (Benjamini-Yekutieli by default, ``correction="bh"`` for Benjamini-Hochberg).
        min_gap: smallest error-rate gap to the rest of the data that is reported.
        metadata_keys: dict-batch keys to use as metadata (default: every 1-D per-sample field).
        metadata_fn: ``metadata_fn(batch) -> {name: per-sample values}`` for metadata not in the batch.
        embedding_layer: name (``"model.features.8"``) or module whose output is clustered for embedding slices.
        every_n_epochs: analyse every n-th validation epoch (``trainer.validate`` always analyses).
        max_seconds: soft time budget of the search per epoch: deeper levels and the embedding branch are skipped
            once it is spent (the JSON records the depth reached).
        max_table_rows: slices shown in the table.
        num_images: examples in the worst-slice grid (0 disables it).
        max_tracked: slices whose accuracy curves are followed (the first ones seen).
        max_stored_inputs: size of the per-rank reservoir of misclassified inputs (fallback for the image grid).
        input_key, target_key, index_key: where inputs, labels and sample ids are in a batch.
        logits_key: key of the logits in a dict returned by ``validation_step``.
        denormalize: undoes input normalisation for display (callable or ``(mean, std)``).
        log_prefix: prefix of every logged name.
        seed: seed of the clustering and the reservoir.
        **finder_kwargs: further :class:`~lightning_lens.slices.SliceFinder` arguments (``correction``, ``n_bins``,
            ``n_clusters``, ``cluster_method``, ``score_alpha``, ``max_jaccard``, ...).

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
        metadata_keys: Optional[Sequence[str]] = None,
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
        logits_key: str = "logits",
        denormalize: Any = None,
        log_prefix: str = "slices",
        seed: int = 0,
        **finder_kwargs: Any,
    ) -> None:
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("max_table_rows", max_table_rows, 1),
                                 ("num_images", num_images, 0), ("max_tracked", max_tracked, 0),
                                 ("max_stored_inputs", max_stored_inputs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if metadata_fn is not None and not callable(metadata_fn):
            raise TypeError(f"metadata_fn must be a callable batch -> dict, got {type(metadata_fn).__name__}")
        if embedding_layer is not None and not isinstance(embedding_layer, (str, nn.Module)):
            raise TypeError(
                f"embedding_layer must be a module name or an nn.Module, got {type(embedding_layer).__name__}"
            )
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"log_prefix must be a non-empty string, got {log_prefix!r}")
        if "time_budget" in finder_kwargs:
            raise ValueError("pass the time budget as max_seconds=")
        self.finder = SliceFinder(max_depth=max_depth, min_support=min_support, alpha=alpha, min_gap=min_gap,
                                  time_budget=max_seconds, seed=seed, freeze=True, **finder_kwargs)
        self.accessor = BatchAccessor(input_key, target_key, index_key, metadata_keys)
        self.metadata_fn = metadata_fn
        self.embedding_layer = embedding_layer
        self.every_n_epochs = every_n_epochs
        self.max_table_rows = max_table_rows
        self.num_images = num_images
        self.max_tracked = max_tracked
        self.max_stored_inputs = max_stored_inputs
        self.logits_key = logits_key
        self.denormalize = denormalize
        self.log_prefix = log_prefix
        self.seed = seed

        self.tracked: dict[str, dict[str, Any]] = {}  # scalar name -> definition, first epoch seen
        self.last_slices: list[Slice] = []
        self.last_result: dict[str, Any] = {}
        self._layer: Optional[nn.Module] = None
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None
        self._captured: Optional[torch.Tensor] = None
        self._rows: list[dict[str, Any]] = []
        self._reservoir: list[tuple[int, torch.Tensor]] = []
        self._reservoir_seen = 0
        self._rng = np.random.default_rng(seed)
        self._positions_seen = 0
        self._ids_from_batch = True
        self._warned_forward = False
        self._active = False

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.embedding_layer is not None:
            self._layer = resolve_module(pl_module, self.embedding_layer, argument="embedding_layer")

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = self._is_active(trainer)
        self._rows, self._reservoir, self._reservoir_seen, self._positions_seen = [], [], 0, 0
        self._ids_from_batch = True

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
        try:
            if self._active and dataloader_idx == 0:
                self._collect(trainer, pl_module, outputs, batch)
        finally:
            self._remove_hook()

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        self._active = False
        data = self._gathered(trainer)
        result = None
        if trainer.is_global_zero:
            try:
                result = self._analyse(trainer, data)
            except Exception as err:  # other ranks wait in the broadcast below: tell them instead of hanging
                if trainer.world_size <= 1:
                    raise
                result = {"error": f"{type(err).__name__}: {err}"}
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        if "error" in result:
            raise RuntimeError(f"SubgroupErrorSlices failed on rank 0: {result['error']}")
        self.tracked = result["tracked"]
        self.finder.load_state_dict(result["finder"])
        self.last_result = {k: v for k, v in result.items() if k not in ("tracked", "finder")}
        if result["worst_accuracy"] is not None:
            # Every rank holds the broadcast value; syncing averages identical numbers (and keeps Lightning quiet).
            pl_module.log(f"{self.log_prefix}/worst_accuracy", float(result["worst_accuracy"]), on_epoch=True,
                          sync_dist=trainer.world_size > 1)
        self._rows, self._reservoir = [], []

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hook()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hook()

    def state_dict(self) -> dict[str, Any]:
        return {"finder": self.finder.state_dict(), "tracked": self.tracked}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finder.load_state_dict(state_dict.get("finder", {}))
        self.tracked = dict(state_dict.get("tracked", {}))

    # ------------------------------------------------------------------------------------------------ collection
    def _is_active(self, trainer: "pl.Trainer") -> bool:
        if trainer.sanity_checking:
            return False
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn == "validate":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = next((o for o in output if isinstance(o, torch.Tensor)), None)
        if isinstance(output, torch.Tensor):
            self._captured = output.detach()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _logits(self, pl_module: "pl.LightningModule", outputs: Any, inputs: torch.Tensor) -> torch.Tensor:
        # A bare tensor counts as logits only when it is (B, C): a (B,) tensor could as well be per-sample losses.
        if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == inputs.shape[0]:
            return outputs.detach()
        if isinstance(outputs, Mapping) and isinstance(outputs.get(self.logits_key), torch.Tensor):
            return outputs[self.logits_key].detach()
        if not self._warned_forward:
            self._warned_forward = True
            rank_zero_warn(
                f"validation_step returns no logits (a tensor or a dict with {self.logits_key!r}); "
                "SubgroupErrorSlices runs one extra no-grad forward pass per validation batch"
            )
        with torch.no_grad(), preserve_modes(pl_module, mode=False):
            return pl_module(inputs).detach()

    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any) -> None:
        inputs = self.accessor.inputs(batch)
        targets = self.accessor.targets(batch)
        if targets is None:
            raise ValueError("SubgroupErrorSlices found no labels in the validation batch; pass target_key=")
        logits = self._logits(pl_module, outputs, inputs).float()
        b = inputs.shape[0]
        if logits.shape[0] != b:
            raise ValueError(f"the logits have {logits.shape[0]} rows for a batch of {b}; set logits_key or return "
                             "per-sample logits from validation_step")
        targets = targets.to(logits.device)
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            z = logits.reshape(b)
            loss = F.binary_cross_entropy_with_logits(z, targets.float().reshape(b), reduction="none")
            pred = (z > 0).long()
            conf = torch.sigmoid(z).where(pred == 1, 1 - torch.sigmoid(z))
        elif logits.dim() == 2:
            loss = F.cross_entropy(logits, targets.long().reshape(b), reduction="none")
            prob = logits.softmax(dim=1)
            conf, pred = prob.max(dim=1)
        else:
            raise ValueError(
                f"SubgroupErrorSlices needs classification logits (B, C) or (B,), got {tuple(logits.shape)}"
            )
        ids = self.accessor.indices(batch)
        if ids is None:
            self._ids_from_batch = False
            pos = torch.arange(self._positions_seen, self._positions_seen + b)
            ids = trainer.global_rank + trainer.world_size * pos
            self._positions_seen += b
        row: dict[str, Any] = {
            "id": ids.detach().cpu().long().numpy().reshape(b),
            "loss": loss.detach().cpu().double().numpy(),
            "correct": (pred == targets.long().reshape(b)).cpu().numpy(),
            "label": targets.detach().cpu().long().numpy().reshape(b),
            "pred": pred.detach().cpu().long().numpy(),
            "confidence": conf.detach().cpu().double().numpy(),
            "meta": self._metadata(batch, b),
        }
        if self._layer is not None:
            if self._captured is None or self._captured.shape[0] != b:
                raise RuntimeError(
                    f"embedding_layer={self.embedding_layer!r} produced no output with one row per sample during this "
                    "validation batch; pick a layer the forward pass runs on the batch"
                )
            emb = self._captured
            if emb.dim() > 2:
                emb = emb.flatten(2).mean(dim=2)
            row["embedding"] = emb.float().cpu().numpy()
            self._captured = None
        self._rows.append(row)
        if self.num_images and inputs.dim() == 4 and inputs.shape[1] in (1, 3):
            self._remember_errors(inputs, row)

    def _metadata(self, batch: Any, b: int) -> dict[str, np.ndarray]:
        meta = dict(self.accessor.metadata(batch))
        if self.metadata_fn is not None:
            extra = self.metadata_fn(batch)
            if not isinstance(extra, Mapping):
                raise TypeError(
                    f"metadata_fn must return a dict of name -> per-sample values, got {type(extra).__name__}"
                )
            meta.update(extra)
        out = {}
        for k, v in meta.items():
            col = as_column(v, str(k))
            if col.size != b:
                raise ValueError(f"metadata {k!r} has {col.size} values for a batch of {b} samples")
            out[str(k)] = col
        return out

    def _remember_errors(self, inputs: torch.Tensor, row: dict[str, Any]) -> None:
        """Reservoir sampling (Algorithm R) of misclassified inputs, bounded by ``max_stored_inputs``."""
        for j in np.flatnonzero(~row["correct"]):
            self._reservoir_seen += 1
            item = (int(row["id"][j]), inputs[j].detach().cpu().float().clone())
            if len(self._reservoir) < self.max_stored_inputs:
                self._reservoir.append(item)
            else:
                slot = int(self._rng.integers(0, self._reservoir_seen))
                if slot < self.max_stored_inputs:
                    self._reservoir[slot] = item

    def _gathered(self, trainer: "pl.Trainer") -> Optional[dict[str, Any]]:
        """This epoch's rows from every rank, deduplicated by id and sorted by id (None on ranks > 0 under DDP)."""
        local = _concat_rows(self._rows)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
            if not trainer.is_global_zero:
                return None
            local = _concat_rows([p for p in parts if p is not None and p["id"].size])
        if local is None or local["id"].size == 0:
            return local
        ids = local["id"]
        if not self._ids_from_batch and trainer.world_size > 1:
            size = _dataset_size(trainer)
            if size is not None:
                local = _take(local, np.flatnonzero(ids < size))
                ids = local["id"]
        _, first = np.unique(ids, return_index=True)  # sorted unique ids, first occurrence of each
        return _take(local, first)

    # ------------------------------------------------------------------------------------------------ analysis
    def _analyse(self, trainer: "pl.Trainer", data: Optional[dict[str, Any]]) -> dict[str, Any]:
        epoch, step = trainer.current_epoch, logging_step(trainer)
        if data is None or data["id"].size == 0:
            return {"tracked": self.tracked, "finder": self.finder.state_dict(), "worst_accuracy": None,
                    "n_samples": 0, "slices": []}
        errors = ~data["correct"]
        accuracy = float(data["correct"].mean())
        metadata = data["meta"]
        start = time.perf_counter()
        if metadata or "embedding" in data:
            slices = self.finder.find(errors, metadata or None, losses=data["loss"], embeddings=data.get("embedding"),
                                      ids=data["id"])
        else:
            slices = []
            rank_zero_warn("SubgroupErrorSlices has nothing to slice on: use dict batches with per-sample metadata, "
                           "metadata_fn=, or embedding_layer=")
        report = dict(self.finder.last_report_)
        report["elapsed_s"] = time.perf_counter() - start
        self.last_slices = slices

        # Track new slices under stable names, then measure every tracked slice on this epoch's data.
        names = []
        for s in slices:
            key = self._track(s, epoch)
            names.append(key)
        accuracies = {}
        for key, spec in self.tracked.items():
            mask = self._tracked_mask(spec, data)
            if mask is not None and mask.any():
                accuracies[key] = float(data["correct"][mask].mean())
        log_scalars(trainer, {f"{self.log_prefix}/acc/{k}": v for k, v in accuracies.items()}
                    | {f"{self.log_prefix}/overall_accuracy": accuracy, f"{self.log_prefix}/num_slices": len(slices)},
                    step=step)
        rows = []
        for rank, (s, key) in enumerate(zip(slices[: self.max_table_rows], names)):
            first = self.tracked.get(key, {}).get("first_seen", epoch)
            rows.append([rank + 1, s.name, s.kind, s.size, f"{s.fraction:.1%}", round(s.accuracy, 4),
                         f"{s.error_rate:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]", round(s.rest_rate, 4),
                         round(s.difference, 4), round(s.ratio, 3) if math.isfinite(s.ratio) else "inf",
                         None if s.mean_loss is None else round(s.mean_loss, 4), f"{s.q_value:.2g}",
                         round(s.score, 3), first])
        if not rows:
            none = f"no slice with q <= {self.finder.alpha} and gap >= {self.finder.min_gap}"
            rows.append(["-", none, "", len(errors), "100%", round(accuracy, 4), "", "", "", "", "", "", "", ""])
        log_table(trainer, f"{self.log_prefix}/top", _TABLE_COLUMNS, rows, step=step)
        log_json(trainer, f"{self.log_prefix}/all", {
            "epoch": epoch, "global_step": step, "n_samples": int(errors.size), "overall_accuracy": accuracy,
            "search": report, "tracked_accuracy": accuracies,
            "binning": None if self.finder.binning_ is None else self.finder.binning_.to_dict(),
            "slices": [dict(s.to_dict(), tracked_as=k) for s, k in zip(slices, names)],
        }, step=step)
        worst = min([accuracy] + [s.accuracy for s in slices])
        if slices and self.num_images:
            self._log_worst_examples(trainer, min(slices, key=lambda s: s.accuracy), data, step)
        return {"tracked": self.tracked, "finder": self.finder.state_dict(), "worst_accuracy": worst,
                "n_samples": int(errors.size), "slices": [s.name for s in slices]}

    def _track(self, s: Slice, epoch: int) -> str:
        if s.kind == "metadata":
            key = _scalar_name(s.name)
        else:
            key = f"cluster{s.cluster}@epoch{epoch}"
        if key not in self.tracked and len(self.tracked) < self.max_tracked:
            spec: dict[str, Any] = {"kind": s.kind, "name": s.name, "first_seen": epoch}
            if s.kind == "metadata":
                spec["predicates"] = [p.to_dict() for p in s.predicates]
            else:
                spec["ids"] = [int(i) for i in s.indices]
            self.tracked[key] = spec
        return key

    def _tracked_mask(self, spec: Mapping[str, Any], data: Mapping[str, Any]) -> Optional[np.ndarray]:
        if spec["kind"] != "metadata":
            return np.isin(data["id"], np.asarray(spec["ids"], dtype=np.int64))
        binning = self.finder.binning_
        if binning is None:
            return None
        mask = np.ones(data["id"].size, dtype=bool)
        for p in spec["predicates"]:
            attr = p["attribute"]
            if attr not in binning.attributes or attr not in data["meta"]:
                return None
            mask &= binning.attributes[attr].codes(data["meta"][attr]) == int(p["code"])
        return mask

    def _log_worst_examples(self, trainer: "pl.Trainer", s: Slice, data: Mapping[str, Any], step: int) -> None:
        members = np.isin(data["id"], s.indices)
        wrong = members & ~data["correct"]
        order = np.flatnonzero(wrong)[np.argsort(-data["loss"][wrong], kind="stable")]
        images = self._fetch_inputs(trainer, data["id"][order])
        if not images:
            return
        from lightning_lens.render import image_grid, to_rgb_uint8

        by_id = {int(i): j for i, j in zip(data["id"], range(data["id"].size))}
        cells, labels = [], []
        for sid, x in images[: self.num_images]:
            j = by_id[sid]
            cells.append(to_rgb_uint8(x, denormalize=self.denormalize))
            labels.append(f"#{sid} y={data['label'][j]} pred={data['pred'][j]}")
        per_row = 8
        rows = [image_grid([cells[i : i + per_row]], col_labels=labels[i : i + per_row], cell_size=64)
                for i in range(0, len(cells), per_row)]
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                               for r in rows])
        caption = (f"{s.name}: accuracy {s.accuracy:.3f} on {s.size} samples "
                   f"(rest {1 - s.rest_rate:.3f}); misclassified members, highest loss first")
        log_image(trainer, f"{self.log_prefix}/worst_examples", grid, step=step, caption=caption)

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
        stored = dict(self._reservoir)
        return [(i, stored[i]) for i in wanted if i in stored]


# ---------------------------------------------------------------------------------------------------- helpers
def _scalar_name(name: str) -> str:
    """A logger-safe, stable key for a slice name: ``digit=3 & thickness=2`` -> ``digit=3&thickness=2``."""
    return re.sub(r"[^\w=.<>&\-]+", "_", name.replace(" & ", "&")).strip("_")


def _concat_rows(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
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


def _dataset_size(trainer: "pl.Trainer") -> Optional[int]:
    dataset = _val_dataset(trainer)
    try:
        return None if dataset is None else len(dataset)
    except TypeError:
        return None


def _batchify(item: Any) -> Any:
    """A one-sample batch from a dataset item, so the batch accessor reads it like a collated batch."""
    if isinstance(item, torch.Tensor):
        return item.unsqueeze(0)
    if isinstance(item, Mapping):
        return {k: _batchify(v) if isinstance(v, torch.Tensor) else [v] for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_batchify(v) if isinstance(v, torch.Tensor) else [v] for v in item)
    return item
