"""Keeps a :class:`~lightning_lens.interpretable_models.KNNHead`'s memory in step with the encoder it follows."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback
from lightning_lens.interpretable_models.knn import KNNClassifier, KNNHead
from lightning_lens.utils import BatchAccessor, preserve_modes
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_instance, check_int, check_key, check_optional

__all__ = ["KNNMemoryRefresh", "check_embed", "knn_parts", "reencode_loader", "training_dataloader"]

Embed = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def knn_parts(pl_module: nn.Module, embed: Optional[Embed]) -> tuple[KNNHead, Embed]:
    """The module's KNN head and a function ``embed(pl_module, inputs) -> embeddings``.

    Without ``embed``, the module must contain exactly one :class:`KNNClassifier`, whose encoder is used.
    """
    heads = [m for m in pl_module.modules() if isinstance(m, KNNHead)]
    if len(heads) != 1:
        raise ValueError(
            f"the LightningModule must contain exactly one KNNHead (lightning_lens.interpretable_models), found"
            f" {len(heads)}; the kNN callbacks explain and refresh that head"
        )
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


def check_embed(pl_module: nn.Module, embed: Embed, head: KNNHead, inputs: torch.Tensor) -> None:
    """Dry run of ``embed`` on (at most) two inputs: it must give ``(n, head.embedding_dim)``; raises ``ValueError``
    naming ``embed`` otherwise. Eval mode, no gradient: the module is left as it was."""
    x = inputs[:2].to(getattr(pl_module, "device", inputs.device))
    try:
        with torch.no_grad(), preserve_modes(pl_module, mode=False):
            out = embed(pl_module, x)
    except Exception as err:
        raise ValueError(
            f"embed failed on two inputs of shape {tuple(x.shape[1:])} with {type(err).__name__}: {err}; pass"
            " embed=lambda pl_module, x: <the embeddings the KNNHead sees> (or set input_key)"
        ) from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (x.shape[0], head.embedding_dim):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"embed must return (batch, embedding_dim={head.embedding_dim}) embeddings for the KNNHead, got {got}"
            " on two inputs; pass embed=lambda pl_module, x: <the embeddings the head sees>"
        )


def training_dataloader(trainer: "pl.Trainer") -> Any:
    """The training dataloader: ``trainer.train_dataloader`` once the fit loop has set it up, before that (at
    ``on_fit_start``, before the sanity pass) the one the datamodule, the module or ``fit``'s arguments give."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)  # a private API: may move
        if source is not None and source.is_defined():
            loader = source.dataloader()
    return loader


def reencode_loader(trainer: "pl.Trainer", dataloader: Optional[DataLoader]) -> DataLoader:
    """An unshuffled loader over the training data (a fresh one, so the training sampler's RNG is not consumed)."""
    if dataloader is not None:
        return dataloader
    train = training_dataloader(trainer)
    if not isinstance(train, DataLoader):
        raise ValueError("the training dataloader is not a single DataLoader; pass dataloader= to re-encode from")
    return DataLoader(train.dataset, batch_size=train.batch_size or 256, shuffle=False, collate_fn=train.collate_fn)


@contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Iterating a DataLoader draws its base seed from the global generator: restore it, so that a refresh does not
    change the shuffling of the training data that follows."""
    with torch.random.fork_rng(devices=[]):
        yield


class KNNMemoryRefresh(LensCallback):
    """Re-encode the training set into the KNN head's memory at the start of fit and every ``every_n_epochs`` epochs.

    Needed by ``refresh="reencode"`` (and fills an ``"in_place"`` memory before the first batch). The first fill
    happens at ``on_fit_start``, before Lightning's validation sanity pass, so the default ``Trainer`` validates
    against a full memory. Each rank re-encodes the whole, unsharded training set, so memories agree across DDP ranks
    without communication. The configuration (one ``KNNHead``, labels and dataset indices in the training batches,
    ``embed`` giving the head's embedding size, ``memory_size`` covering the training set) is checked on one training
    batch before the first training step. The global RNG is left as it was.

    The refresh is part of the training algorithm, not monitoring: a ``"reencode"`` head votes with the memory it is
    given, so skipping a refresh to save time would change what the model trains against. Hence
    ``max_overhead=None`` (no budget) by default; its cost is the price of the head (see ``benchmarks/knn.py``). A
    refresh that fails is reported once and retried at the next epoch start; training continues with the memory it
    has (``strict=True`` raises instead).

    Args:
        every_n_epochs: epochs between refreshes; ``0`` fills the memory once, at the start of fit.
        dataloader: what to encode (default: the training dataset, unshuffled, same batch size and collate).
        embed: ``embed(pl_module, inputs) -> embeddings``; default: the encoder of the module's ``KNNClassifier``.
        input_key, target_key, index_key: where inputs, labels and dataset indices are in a batch.
        max_overhead: a time budget as a fraction of fit time (None: none; see above).
        strict: raise the refresh's exceptions instead of reporting them.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: refresh failures in a row after which it is switched off.

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
        max_overhead: Optional[float] = None,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
    ) -> None:
        # the base's every_n_epochs is the due rule of validation-time work, which this callback does not have
        super().__init__(
            every_n_epochs=None, max_overhead=max_overhead, strict=strict, verbose=verbose, max_failures=max_failures
        )
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=0)
        self.dataloader = check_optional(check_instance, dataloader, "dataloader", DataLoader)
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be a callable (pl_module, inputs) -> embeddings, got {type(embed).__name__}")
        self.embed = embed
        self.accessor = BatchAccessor(
            check_key(input_key, "input_key"), check_key(target_key, "target_key"), check_key(index_key, "index_key")
        )
        self.refreshed_at_epoch: Optional[int] = None
        self._filled_at_fit_start = False

    def _state_key_fields(self) -> dict[str, Any]:
        return {}  # one per module: the module holds exactly one KNNHead

    # ----------------------------------------------------------------------------------------------------------- setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        if trainer.state.fn != "fit":
            return
        head, embed = knn_parts(pl_module, self.embed)
        if head.refresh == "queue":
            raise ValueError(
                "KNNMemoryRefresh re-encodes by dataset index, but the KNNHead uses refresh='queue', which is filled"
                " by enqueue: remove KNNMemoryRefresh or use refresh='reencode'/'in_place'"
            )
        loader = reencode_loader(trainer, self.dataloader)
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, Sized) and len(dataset) > head.memory_size:
            raise ValueError(
                f"the training set has {len(dataset)} examples but KNNHead(memory_size={head.memory_size}) addresses"
                f" memory rows by dataset index: set memory_size={len(dataset)}"
            )
        with global_rng_untouched():
            first = next(iter(loader), None)
        if first is None:
            raise ValueError("KNNMemoryRefresh has nothing to encode: the training dataloader is empty")
        x, labels, ids = self._read(first)
        if int(ids.min()) < 0 or int(ids.max()) >= head.memory_size:
            raise ValueError(
                f"index_key gives ids in [{int(ids.min())}, {int(ids.max())}], outside the memory's rows"
                f" [0, {head.memory_size}): batches must carry dataset indices (set index_key) and"
                " KNNHead(memory_size=...) must be the training set size"
            )
        check_embed(pl_module, embed, head, x)

    def _read(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        try:
            x = self.accessor.inputs(batch)
            labels, ids = self.accessor.targets(batch), self.accessor.indices(batch)
        except KeyError as err:
            raise ValueError(err.args[0] if err.args else str(err)) from err
        if labels is None:
            raise ValueError("KNNMemoryRefresh needs labels in the training batches: set target_key")
        if ids is None:
            raise ValueError(
                "KNNMemoryRefresh needs dataset indices in the training batches (memory rows are addressed by them):"
                " return them from the dataset and set index_key"
            )
        return x, labels, ids

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # before the sanity pass, which would otherwise validate against an empty memory; not on resume (the
        # checkpoint restored the memory and refreshed_at_epoch)
        if self.refreshed_at_epoch is None:
            self._filled_at_fit_start = self._refresh_part(trainer, pl_module)

    # ---------------------------------------------------------------------------------------------------------- epochs
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch
        if self._filled_at_fit_start:  # the encoder has not changed since: the memory is fresh
            self._filled_at_fit_start = False
            self.refreshed_at_epoch = epoch
            return
        due = self.refreshed_at_epoch is None or (
            self.every_n_epochs > 0 and epoch - self.refreshed_at_epoch >= self.every_n_epochs
        )
        if due and self._refresh_part(trainer, pl_module):
            self.refreshed_at_epoch = epoch

    def _refresh_part(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
        written = self.run_part(
            trainer, "refresh", self.refresh, trainer, pl_module,
            hint="check embed, the keys and the dataloader; the memory keeps its previous entries until then",
        )
        return written is not None

    def refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> int:
        """Re-encode now; returns the number of entries written."""
        head, embed = knn_parts(pl_module, self.embed)
        if head.refresh == "queue":
            raise ValueError("KNNMemoryRefresh re-encodes by dataset index; a refresh='queue' head fills by enqueue")
        loader = reencode_loader(trainer, self.dataloader)
        device = pl_module.device
        written = 0
        with torch.no_grad(), preserve_modes(pl_module, mode=False), global_rng_untouched():
            for batch in loader:
                x, labels, ids = self._read(batch)
                head.write(embed(pl_module, x.to(device)), labels.to(device), ids.to(device))
                written += int(ids.numel())
        return written

    # ----------------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "refreshed_at_epoch": self.refreshed_at_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.refreshed_at_epoch = state_dict.get("refreshed_at_epoch")
