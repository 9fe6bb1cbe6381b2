"""Shows, for a fixed probe set, each probe beside the training examples a kNN head retrieved for it."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lightning_lens._pl import Callback, pl
from lightning_lens.callbacks._gather import dedupe_by_id, gather_rows
from lightning_lens.callbacks._probes import ProbeCollector
from lightning_lens.callbacks.knn_memory import Embed, knn_parts
from lightning_lens.loggers import log_image, log_scalars
from lightning_lens.utils import BatchAccessor, ProbeSet, preserve_modes
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_int


class NeighborGallery(Callback):
    """Log each probe next to its k nearest training examples, and how well the kNN head's evidence holds up.

    Each logged validation epoch writes:

    - image ``knn/gallery``: one row per probe (label, prediction, DkNN credibility), then its neighbours, each
      column titled with the neighbour's class and cosine similarity in the row label;
    - scalars ``knn/accuracy`` (the head on the validation embeddings), ``knn/linear_probe_accuracy`` (a logistic
      regression fit on the memory's embeddings, evaluated on the same validation embeddings),
      ``knn/neighbor_label_agreement`` (share of the k neighbours carrying the predicted class),
      ``knn/neighbor_true_label_agreement`` (carrying the true class), ``knn/mean_credibility`` and the memory's
      fill and age (``knn/memory/*``).

    Credibility (Papernot & McDaniel 2018) is calibrated on a held-out half of the validation embeddings and
    reported for the other half and the probes.

    Args:
        num_probes: probes shown (drawn once from validation data; shared with other explanation callbacks).
        k: neighbours shown per probe (default: the head's k).
        every_n_epochs: log every N validation epochs.
        train_dataset: where neighbour images come from, indexed by dataset index (default: the training
            dataloader's dataset).
        embed: ``embed(pl_module, inputs) -> embeddings``; default: the module's ``KNNClassifier`` encoder.
        input_key, target_key, index_key: where inputs, labels, ids are in batches (see ``BatchAccessor``).
        denormalize: maps a model input to a displayable image in [0, 1].
        max_eval_samples: validation embeddings kept per epoch for the scalars (one extra no-grad encoder pass per
            validation batch).
        linear_probe: fit the linear probe (scikit-learn logistic regression).

    Example:
        >>> Trainer(callbacks=[KNNMemoryRefresh(), NeighborGallery(num_probes=8)])  # doctest: +SKIP
    """

    def __init__(
        self,
        num_probes: int = 8,
        k: Optional[int] = None,
        every_n_epochs: int = 1,
        train_dataset: Optional[Dataset] = None,
        embed: Optional[Embed] = None,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        denormalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        max_eval_samples: int = 5000,
        linear_probe: bool = True,
        probe_seed: int = 0,
    ) -> None:
        check_int(every_n_epochs, "every_n_epochs", minimum=1)
        if k is not None:
            check_int(k, "k", minimum=1)
        check_int(max_eval_samples, "max_eval_samples", minimum=2)
        self.k = k
        self.every_n_epochs = every_n_epochs
        self.train_dataset = train_dataset
        self.embed = embed
        self.accessor = BatchAccessor(input_key, target_key, index_key)
        self.denormalize = denormalize
        self.max_eval_samples = max_eval_samples
        self.linear_probe = linear_probe
        self._collector = ProbeCollector(num_probes, self.accessor, seed=probe_seed, owner=self)
        self._emb: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._count = 0
        self._fit_train_dataset: Optional[Dataset] = None

    @property
    def probes(self) -> Optional[ProbeSet]:
        return self._collector.probes

    def _due(self, trainer: "pl.Trainer") -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # kept so that a later trainer.validate() can still show neighbour images
        self._fit_train_dataset = getattr(trainer.train_dataloader, "dataset", None)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._emb, self._labels, self._ids, self._count = [], [], [], 0

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collector.update(trainer, batch, dataloader_idx)
        if not self._due(trainer) or dataloader_idx != 0 or self._count >= self.max_eval_samples:
            return
        _, embed = knn_parts(pl_module, self.embed)
        labels = self.accessor.targets(batch)
        if labels is None:
            raise ValueError("NeighborGallery needs labels in validation batches; set target_key")
        ids = self.accessor.indices(batch)
        x = self.accessor.inputs(batch)
        with preserve_modes(pl_module, mode=False):
            emb = embed(pl_module, x).detach()
        self._emb.append(emb)
        self._labels.append(labels.to(emb.device))
        offset = batch_idx * x.shape[0]
        self._ids.append(ids.to(emb.device) if ids is not None else torch.arange(offset, offset + x.shape[0]))
        self._count += x.shape[0]

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        probes = self._collector.finalize(trainer)
        if not self._due(trainer) or not self._emb:
            return
        head, embed = knn_parts(pl_module, self.embed)
        emb = gather_rows(trainer, torch.cat(self._emb))
        labels = gather_rows(trainer, torch.cat(self._labels))
        ids = gather_rows(trainer, torch.cat(self._ids).to(emb.device))
        if trainer.world_size > 1:
            ids, emb, labels = dedupe_by_id(ids, emb, labels)
        metrics = self._evaluate(head, emb, labels)  # on every rank: calibration writes a buffer DDP keeps in sync
        if not trainer.is_global_zero:
            return
        if probes is not None:
            metrics.update(self._log_gallery(trainer, pl_module, head, embed, probes))
        log_scalars(trainer, metrics)
        self._emb, self._labels, self._ids = [], [], []

    def _evaluate(self, head: Any, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        half = emb.shape[0] // 2
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(emb.shape[0], generator=gen).to(emb.device)
        cal, test = order[:half], order[half:]
        head.calibrate(emb[cal], labels[cal])
        nb = head.explain(emb[test])
        pred = head(emb[test]).argmax(1)
        found = nb.labels >= 0
        metrics = {
            "knn/accuracy": float((pred == labels[test]).float().mean()),
            "knn/neighbor_label_agreement": float(((nb.labels == pred[:, None]) & found).float().sum()
                                                   / found.sum().clamp_min(1)),
            "knn/neighbor_true_label_agreement": float(((nb.labels == labels[test][:, None]) & found).float().sum()
                                                        / found.sum().clamp_min(1)),
            "knn/mean_credibility": float(nb.credibility.mean()),
        }
        metrics.update({f"knn/memory/{k}": v for k, v in head.memory_summary().items()})
        if self.linear_probe:
            metrics["knn/linear_probe_accuracy"] = linear_probe_accuracy(
                head.memory_keys[head.filled], head.memory_labels[head.filled], emb[test], labels[test]
            )
        return metrics

    def _log_gallery(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", head: Any, embed: Embed, probes: ProbeSet
    ) -> dict[str, float]:
        from lightning_lens.render import image_grid, to_rgb_uint8

        dataset = self.train_dataset or self._fit_train_dataset
        if dataset is None:
            raise ValueError(
                "NeighborGallery shows training images beside each probe but has no training dataset here "
                "(trainer.validate() without a fit in this process): pass NeighborGallery(train_dataset=...)"
            )
        x = probes.inputs.to(pl_module.device)
        with preserve_modes(pl_module, mode=False):
            emb = embed(pl_module, x)
        nb = head.explain(emb, k=self.k)
        pred = head(emb).argmax(1)
        rows, row_labels = [], []
        for i in range(len(probes)):
            cells = [to_rgb_uint8(probes.inputs[i], denormalize=self.denormalize)]
            names = []
            for j in range(nb.indices.shape[1]):
                idx = int(nb.indices[i, j])
                if idx < 0:
                    continue
                item = default_collate([dataset[idx]])
                cells.append(to_rgb_uint8(self.accessor.inputs(item)[0], denormalize=self.denormalize))
                names.append(f"{int(nb.labels[i, j])}({float(nb.similarities[i, j]):.2f})")
            true = "" if probes.targets is None else f"y={int(probes.targets[i])} "
            cred = "" if nb.credibility is None else f" cred={float(nb.credibility[i]):.2f}"
            row_labels.append(f"{true}pred={int(pred[i])}{cred} | nn: " + " ".join(names))
            rows.append(cells)
        width = max(len(r) for r in rows)
        blank = np.zeros_like(rows[0][0])
        rows = [r + [blank] * (width - len(r)) for r in rows]
        col_labels = ["probe"] + [f"neighbour {j + 1}" for j in range(width - 1)]
        log_image(trainer, "knn/gallery", image_grid(rows, row_labels=row_labels, col_labels=col_labels))
        return {"knn/probe_mean_credibility": float(nb.credibility.mean())} if nb.credibility is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self._collector.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._collector.load_state_dict(state_dict)


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Accuracy of a logistic regression fit on ``train_x`` (L2-normalised, as the head sees them) on ``test_x``."""
    from sklearn.linear_model import LogisticRegression

    def prep(t: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(t.float(), dim=1).cpu().numpy()

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(prep(train_x), train_y.cpu().numpy())
    return float((clf.predict(prep(test_x)) == test_y.cpu().numpy()).mean())
