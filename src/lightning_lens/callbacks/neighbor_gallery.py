"""Shows, for a fixed probe set, each probe beside the training examples a kNN head retrieved for it."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import default_collate

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback, check_displayable
from lightning_lens.callbacks._gather import SampleIds, dedupe_by_id, gather_objects, validation_dataset_size
from lightning_lens.callbacks._probes import ProbeCollector
from lightning_lens.callbacks.knn_memory import Embed, check_embed, knn_parts, training_dataloader
from lightning_lens.interpretable_models.knn import KNNHead, Neighbors
from lightning_lens.interpretable_models.knn_evaluation import (
    KNNEvaluation,
    evaluate_knn,
    knn_linear_probe,
    neighbor_gallery_image,
)
from lightning_lens.loggers import log_image, log_scalars, sanitize_tag
from lightning_lens.utils import BatchAccessor, ProbeSet, preserve_modes
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_bool, check_instance, check_int, check_key, check_optional

__all__ = ["NeighborGallery"]

Denormalize = Union[Callable[[torch.Tensor], torch.Tensor], tuple, list, None]


class NeighborGallery(LensCallback):
    """Log each probe next to its k nearest training examples, and how well the kNN head's evidence holds up.

    Each logged validation epoch writes (``knn`` is ``log_prefix``):

    - image ``knn/gallery``: one row per probe (label, prediction, DkNN credibility), then its neighbours, each
      column titled with the neighbour's class and cosine similarity in the row label;
    - scalars ``knn/accuracy`` (the head on the validation embeddings), ``knn/linear_probe_accuracy`` (a logistic
      regression fit on the memory's embeddings, evaluated on the same validation embeddings),
      ``knn/neighbor_label_agreement`` (share of the k neighbours carrying the predicted class),
      ``knn/neighbor_true_label_agreement`` (carrying the true class), ``knn/mean_credibility``,
      ``knn/eval_samples`` and the memory's fill and age (``knn/memory/*``).

    Credibility (Papernot & McDaniel 2018) is calibrated on a held-out half of the validation embeddings and
    reported for the other half and the probes. The calibration scores are the callback's own
    (:attr:`calibration_scores`): the head's buffers, hence the checkpoint, are never written. The computations live
    in :mod:`lightning_lens.interpretable_models.knn_evaluation`; this callback collects and logs.

    Validation rows are gathered from every rank with rank-safe ids (the batch's dataset indices, else positions in
    the validation set), de-duplicated, sorted by id and capped at ``max_eval_samples``, so 1 and N processes evaluate
    the same rows. Rows with NaN or inf embeddings are left out and counted.

    Args:
        num_probes: probes shown (drawn once from validation data; shared with other explanation callbacks).
        k: neighbours shown per probe (default: the head's k).
        every_n_epochs: log every N-th epoch (counted from one; the first and last epoch of fit always).
        train_dataset: where neighbour images come from, indexed by dataset index (default: the training
            dataloader's dataset).
        embed: ``embed(pl_module, inputs) -> embeddings``; default: the module's ``KNNClassifier`` encoder.
        input_key, target_key, index_key: where inputs, labels, ids are in batches (see ``BatchAccessor``).
        denormalize: maps a model input to a displayable image in [0, 1] (or a ``(mean, std)`` pair).
        max_eval_samples: validation embeddings evaluated per epoch (one extra no-grad encoder pass per validation
            batch until there are that many).
        linear_probe: fit the linear probe (scikit-learn logistic regression).
        probe_seed: seed of the probe draw.
        probes: a ready probe set (then none is drawn).
        log_prefix: first component of every logged tag.
        max_overhead: the callback's time as a fraction of fit time (None: no limit).
        strict: raise the callback's exceptions instead of reporting them and continuing.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: failures in a row after which a part (the gallery, the linear probe, ...) is switched off.

    Example:
        >>> Trainer(callbacks=[KNNMemoryRefresh(), NeighborGallery(num_probes=8)])  # doctest: +SKIP
    """

    def __init__(
        self,
        num_probes: int = 8,
        k: Optional[int] = None,
        every_n_epochs: int = 1,
        train_dataset: Any = None,
        embed: Optional[Embed] = None,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        denormalize: Denormalize = None,
        max_eval_samples: int = 5000,
        linear_probe: bool = True,
        probe_seed: int = 0,
        probes: Optional[ProbeSet] = None,
        log_prefix: str = "knn",
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, max_overhead=max_overhead, strict=strict, verbose=verbose,
            max_failures=max_failures,
        )
        self.k = check_optional(check_int, k, "k", minimum=1)
        if train_dataset is not None and not hasattr(train_dataset, "__getitem__"):
            raise TypeError(
                f"train_dataset must be indexable by dataset index (a Dataset), got {type(train_dataset).__name__}"
            )
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be a callable (pl_module, inputs) -> embeddings, got {type(embed).__name__}")
        if denormalize is not None and not callable(denormalize) and not (
            isinstance(denormalize, (tuple, list)) and len(denormalize) == 2
        ):
            raise TypeError(
                f"denormalize must be a callable input -> image in [0, 1] or a (mean, std) pair, got"
                f" {type(denormalize).__name__}"
            )
        self.train_dataset = train_dataset
        self.embed = embed
        self.accessor = BatchAccessor(
            check_key(input_key, "input_key"), check_key(target_key, "target_key"), check_key(index_key, "index_key")
        )
        self.denormalize = denormalize
        self.max_eval_samples = check_int(max_eval_samples, "max_eval_samples", minimum=2)
        self.linear_probe = check_bool(linear_probe, "linear_probe")
        self.log_prefix = sanitize_tag(check_instance(log_prefix, "log_prefix", str))
        if not self.log_prefix:
            raise ValueError(f"log_prefix must contain letters or digits, got {log_prefix!r}")
        self._collector = ProbeCollector(
            num_probes, self.accessor, seed=check_int(probe_seed, "probe_seed"), probes=probes, owner=self
        )
        #: DkNN calibration scores of the last evaluation (the callback's, not the head's)
        self.calibration_scores: Optional[torch.Tensor] = None
        self.last_metrics: dict[str, float] = {}
        self.last_evaluation: Optional[KNNEvaluation] = None
        self.last_neighbors: Optional[Neighbors] = None  # the probes' neighbours in the last gallery
        self.excluded_nonfinite = 0  # validation rows left out (NaN/inf embeddings), over the fit
        self._ids = SampleIds()
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._count = 0
        self._collecting = False
        self._collect_seconds = 0.0
        self._dataset_size: Optional[int] = None
        self._fit_train_dataset: Any = None

    @property
    def probes(self) -> Optional[ProbeSet]:
        return self._collector.probes

    def _state_key_fields(self) -> dict[str, Any]:
        return {"log_prefix": self.log_prefix}

    # ----------------------------------------------------------------------------------------------------------- setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        head, embed = knn_parts(pl_module, self.embed)
        if self.linear_probe:
            try:
                import sklearn  # noqa: F401
            except ImportError as err:
                raise ValueError("linear_probe=True needs scikit-learn: pip install scikit-learn, or pass"
                                 " linear_probe=False") from err
        if trainer.state.fn == "fit":
            self._fit_train_dataset = getattr(training_dataloader(trainer), "dataset", None)
        dataset = self._neighbor_dataset()
        if dataset is None:
            raise ValueError(
                "NeighborGallery shows training images beside each probe but cannot find the training dataset"
                " (trainer.validate() without a fit in this process, or a training dataloader that is not one"
                " DataLoader): pass NeighborGallery(train_dataset=...)"
            )
        if batch is None:
            return
        try:
            x, labels = self.accessor.inputs(batch), self.accessor.targets(batch)
            if self.accessor.index_key is not None:
                self.accessor.indices(batch)
            neighbor = self._neighbor_input(dataset, 0)
        except KeyError as err:
            raise ValueError(err.args[0] if err.args else str(err)) from err
        if labels is None:
            raise ValueError("NeighborGallery needs labels in the validation batches: set target_key")
        check_embed(pl_module, embed, head, x)
        for what, image in (("a validation input", x[0]), ("train_dataset[0]'s input", neighbor)):
            check_displayable("NeighborGallery", what, image, self.denormalize)

    def _neighbor_dataset(self) -> Any:
        return self.train_dataset if self.train_dataset is not None else self._fit_train_dataset

    def _neighbor_input(self, dataset: Any, index: int) -> torch.Tensor:
        return self.accessor.inputs(default_collate([dataset[index]]))[0]

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # kept so that a later trainer.validate() can still show neighbour images
        self._fit_train_dataset = getattr(trainer.train_dataloader, "dataset", self._fit_train_dataset)

    # ------------------------------------------------------------------------------------------------------ collection
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._collecting = self.is_due(trainer)  # a collective: first, on every rank
        self._rows, self._count, self._collect_seconds = [], 0, 0.0
        self._ids.reset()
        self._dataset_size = validation_dataset_size(trainer)

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collector.update(trainer, batch, dataloader_idx)
        if not self._collecting or dataloader_idx != 0:
            return
        start = time.perf_counter()
        try:
            x = self.accessor.inputs(batch)
            ids = self._ids.next(trainer, x.shape[0], self.accessor.indices(batch), self._dataset_size)
            # each rank keeps its share; the union holds the max_eval_samples smallest ids (see on_validation_epoch_end)
            if self._count < math.ceil(self.max_eval_samples / max(1, trainer.world_size)):
                rows = self.run_part(trainer, "embed", self._embed_rows, pl_module, batch, x, ids)
                if rows is not None:
                    self._rows.append(rows)
                    self._count += int(rows[0].numel())
        finally:
            self._collect_seconds += time.perf_counter() - start

    def _embed_rows(
        self, pl_module: "pl.LightningModule", batch: Any, x: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = self.accessor.targets(batch)
        if labels is None:
            raise ValueError("NeighborGallery needs labels in the validation batches: set target_key")
        _, embed = knn_parts(pl_module, self.embed)
        with torch.no_grad(), preserve_modes(pl_module, mode=False):
            emb = embed(pl_module, x)
        with torch.inference_mode(False):  # plain CPU tensors, also under trainer.validate()'s inference mode
            return ids.clone(), emb.detach().float().cpu().clone(), labels.detach().reshape(-1).long().cpu().clone()

    def _local_rows(self) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self._rows:
            return None
        ids, emb, labels = (torch.cat(c) for c in zip(*self._rows))
        return ids, emb, labels

    # ------------------------------------------------------------------------------------------------------- reporting
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        probes = self._collector.finalize(trainer)  # a collective while the probes are drawn
        if not self._collecting:
            return
        start = time.perf_counter()
        try:
            local = self.run_part(trainer, "collect", self._local_rows)
            self._rows = []
            gathered = gather_objects(trainer, local)  # a collective, on every rank
            if trainer.is_global_zero:
                self._report(trainer, pl_module, [g for g in gathered if g is not None], probes)
        finally:
            self.record_run_cost(self._collect_seconds + time.perf_counter() - start)

    def _report(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", parts: list, probes: Optional[ProbeSet]
    ) -> None:
        head, embed = knn_parts(pl_module, self.embed)
        metrics: dict[str, float] = {}
        if parts:
            ids, emb, labels = (torch.cat(c) for c in zip(*parts))
            ids, emb, labels = dedupe_by_id(ids, emb, labels)
            keep = torch.argsort(ids)[: self.max_eval_samples]
            emb, labels = emb[keep].to(head.memory_keys.device), labels[keep].to(head.memory_keys.device)
            evaluation = self.run_part(
                trainer, "evaluate", evaluate_knn, head, emb, labels,
                hint="fill the kNN memory (KNNMemoryRefresh) and give the validation set at least 2 finite samples",
            )
            if evaluation is not None:
                self.last_evaluation, self.calibration_scores = evaluation, evaluation.calibration_scores
                metrics.update(evaluation.metrics)
                if evaluation.excluded_nonfinite:
                    self.excluded_nonfinite += evaluation.excluded_nonfinite
                    self.warn_once(
                        "nonfinite",
                        f"{self.name}: {evaluation.excluded_nonfinite} validation embeddings held NaN or inf and were"
                        f" left out at epoch {trainer.current_epoch} (counted in excluded_nonfinite)",
                    )
                if self.linear_probe:
                    test = evaluation.test_rows.to(emb.device)
                    accuracy = self.run_part(trainer, "linear_probe", knn_linear_probe, head, emb[test], labels[test])
                    if accuracy is not None:
                        metrics["linear_probe_accuracy"] = accuracy
        if probes is not None:
            extra = self.run_part(
                trainer, "gallery", self._gallery, trainer, pl_module, head, embed, probes,
                hint="check denormalize and train_dataset (indexed by the memory's dataset indices)",
            )
            metrics.update(extra or {})
        self.last_metrics = metrics
        if metrics:
            scalars = {f"{self.log_prefix}/{k}": v for k, v in metrics.items()}
            self.run_part(trainer, "log", log_scalars, trainer, scalars)

    @torch.no_grad()
    def _gallery(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", head: KNNHead, embed: Embed, probes: ProbeSet
    ) -> dict[str, float]:
        dataset = self._neighbor_dataset()
        if dataset is None:
            raise ValueError(
                "NeighborGallery shows training images beside each probe but has no training dataset here: pass"
                " NeighborGallery(train_dataset=...)"
            )
        with preserve_modes(pl_module, mode=False):
            emb = embed(pl_module, probes.inputs.to(pl_module.device))
            nb = head.explain(emb, k=self.k, calibration_scores=self.calibration_scores)
            predictions = head(emb).argmax(1)
        image = neighbor_gallery_image(
            probes.inputs, nb, predictions, lambda i: self._neighbor_input(dataset, i), probes.targets,
            self.denormalize, title=f"nearest training neighbours of the probes (epoch {trainer.current_epoch})",
        )
        log_image(trainer, f"{self.log_prefix}/gallery", image)
        self.last_neighbors = nb
        return {"probe_mean_credibility": float(nb.credibility.mean())} if nb.credibility is not None else {}

    # ----------------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._collector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._collector.load_state_dict(state_dict)

    def summary(self) -> Optional[str]:
        """The kNN head's headline numbers at the last evaluated epoch (logged at the end of fit)."""
        from lightning_lens.report.summaries import knn_summary

        if not self.last_metrics:
            return None
        return knn_summary(self.last_metrics, self.run_epochs[-1] if self.run_epochs else None, title=self.name)
