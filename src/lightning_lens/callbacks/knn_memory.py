"""Keeps a :class:`~lightning_lens.interpretable_models.KNNHead`'s memory in step with the encoder it follows."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import Callback, pl
from lightning_lens.interpretable_models.knn import KNNClassifier, KNNHead
from lightning_lens.utils import BatchAccessor, preserve_modes
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_int

Embed = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def knn_parts(pl_module: nn.Module, embed: Optional[Embed]) -> tuple[KNNHead, Embed]:
    """The module's KNN head and a function ``embed(pl_module, inputs) -> embeddings``.

    Without ``embed``, the module must contain exactly one :class:`KNNClassifier`, whose encoder is used.
    """
    heads = [m for m in pl_module.modules() if isinstance(m, KNNHead)]
    if len(heads) != 1:
        raise ValueError(f"the LightningModule must contain exactly one KNNHead, found {len(heads)}")
    if embed is not None:
        return heads[0], embed
    classifiers = [m for m in pl_module.modules() if isinstance(m, KNNClassifier)]
    if len(classifiers) != 1:
        raise ValueError(
            "cannot tell how to embed inputs: wrap encoder and head in a KNNClassifier, or pass "
            "embed=lambda pl_module, x: pl_module.encoder(x)"
        )
    encoder = classifiers[0].encoder
    return heads[0], lambda _module, x: encoder(x)


def reencode_loader(trainer: "pl.Trainer", dataloader: Optional[DataLoader]) -> DataLoader:
    """An unshuffled loader over the training data (a fresh one, so the training sampler's RNG is not consumed)."""
    if dataloader is not None:
        return dataloader
    train = trainer.train_dataloader
    if not isinstance(train, DataLoader):
        raise ValueError("the training dataloader is not a single DataLoader; pass dataloader= to re-encode from")
    return DataLoader(train.dataset, batch_size=train.batch_size or 256, shuffle=False, collate_fn=train.collate_fn)


class KNNMemoryRefresh(Callback):
    """Re-encode the training set into the KNN head's memory before training and every ``every_n_epochs`` epochs.

    Needed by ``refresh="reencode"`` (and to fill an ``"in_place"`` memory before the first batch). Each rank
    re-encodes the whole, unsharded training set, so memories agree across DDP ranks without communication.

    Args:
        every_n_epochs: epochs between refreshes; ``0`` fills the memory once, before the first epoch.
        dataloader: what to encode (default: the training dataset, unshuffled, same batch size and collate).
        embed: ``embed(pl_module, inputs) -> embeddings``; default: the encoder of the module's ``KNNClassifier``.
        input_key, target_key, index_key: where inputs, labels and dataset indices are in a batch.

    Example:
        >>> trainer = Trainer(callbacks=[KNNMemoryRefresh(every_n_epochs=1)])  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        dataloader: Optional[DataLoader] = None,
        embed: Optional[Embed] = None,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
    ) -> None:
        check_int(every_n_epochs, "every_n_epochs", minimum=0)
        self.every_n_epochs = every_n_epochs
        self.dataloader = dataloader
        self.embed = embed
        self.accessor = BatchAccessor(input_key, target_key, index_key)
        self.refreshed_at_epoch: Optional[int] = None

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch
        due = self.refreshed_at_epoch is None or (
            self.every_n_epochs > 0 and epoch - self.refreshed_at_epoch >= self.every_n_epochs
        )
        if due:
            self.refresh(trainer, pl_module)
            self.refreshed_at_epoch = epoch

    @torch.no_grad()
    def refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Re-encode now."""
        head, embed = knn_parts(pl_module, self.embed)
        if head.refresh == "queue":
            raise ValueError("KNNMemoryRefresh re-encodes by dataset index; a refresh='queue' head fills by enqueue")
        loader = reencode_loader(trainer, self.dataloader)
        with preserve_modes(pl_module, mode=False):
            for batch in loader:
                ids = self.accessor.indices(batch)
                labels = self.accessor.targets(batch)
                if ids is None or labels is None:
                    raise ValueError("batches must carry labels and dataset indices; set target_key and index_key")
                x = self.accessor.inputs(batch).to(pl_module.device)
                head.write(embed(pl_module, x), labels.to(pl_module.device), ids.to(pl_module.device))

    def state_dict(self) -> dict[str, Any]:
        return {"refreshed_at_epoch": self.refreshed_at_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshed_at_epoch = state_dict.get("refreshed_at_epoch")
