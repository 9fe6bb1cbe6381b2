"""The one gather helper of the callbacks: rank-safe sample ids, gathering rows and objects, de-duplication.

Every callback that collects per-sample rows during validation goes through here, so ids never collide across ranks
and the repeats a ``DistributedSampler`` adds are removed the same way everywhere. All functions that communicate are
collectives: call them on every rank, at the same point, never inside a guarded part (see ``_base.LensCallback``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_lens._pl import pl

__all__ = ["SampleIds", "all_reduce_sum", "dedupe_by_id", "gather_objects", "gather_rows"]


class SampleIds:
    """Ids of the samples of the validation batches one rank sees, unique over all ranks.

    With the batch's index key (dataset indices) the ids are those indices. Without it, the ``k``-th sample this rank
    sees (counted from the start of the epoch) gets the id ``k * world_size + rank``: the position a
    ``DistributedSampler(shuffle=False)`` gives it in the dataset, so ids equal dataset indices for unshuffled
    validation loaders with 1 or N processes, and never collide across ranks in any case. Positions past the end of
    the dataset (the repeats the sampler pads with, which come from its start) are folded back with ``% len(dataset)``
    so that :func:`dedupe_by_id` removes them.

    Call :meth:`reset` at the start of every validation epoch and :meth:`next` for every batch.
    """

    def __init__(self) -> None:
        self._seen = 0

    def reset(self) -> None:
        self._seen = 0

    def next(
        self,
        trainer: "pl.Trainer",
        batch_size: int,
        indices: Optional[torch.Tensor] = None,
        dataset_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Ids ``(batch_size,)`` (int64, CPU) of the next batch; ``indices`` from the batch win when given."""
        start = self._seen
        self._seen += int(batch_size)
        if indices is not None:
            return torch.as_tensor(indices).detach().reshape(-1).long().cpu()
        world, rank = max(1, int(trainer.world_size)), int(trainer.global_rank)
        ids = torch.arange(start, start + int(batch_size), dtype=torch.long) * world + rank
        if dataset_size:
            ids = ids % int(dataset_size)
        return ids


def validation_dataset_size(trainer: "pl.Trainer", dataloader_idx: int = 0) -> Optional[int]:
    """``len`` of the validation dataset (None when unknown)."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx] if len(loaders) > dataloader_idx else None
    try:
        return len(loaders.dataset)  # type: ignore[union-attr, arg-type]
    except Exception:
        return None


def gather_rows(trainer: "pl.Trainer", rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows`` (N_r, ...) of every rank along dim 0; a collective.

    Each rank pads to the largest count, ``all_gather`` runs, and the padding is trimmed.
    """
    if trainer.world_size <= 1:
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device)
    counts = trainer.strategy.all_gather(n).reshape(-1).tolist()
    width = max(int(c) for c in counts)
    padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = trainer.strategy.all_gather(padded)  # (world, width, ...)
    return torch.cat([gathered[r, : int(c)] for r, c in enumerate(counts)])


def all_reduce_sum(trainer: "pl.Trainer", tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``tensor`` over all ranks (the tensor itself in a single process). A collective.

    Runs on the strategy's device (NCCL needs CUDA tensors) and returns a tensor on ``tensor``'s device; use float64
    for counts (exact up to 2**53).
    """
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return tensor
    device = getattr(trainer.strategy, "root_device", tensor.device)
    out = tensor.detach().to(device, copy=True)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(tensor.device)


def gather_objects(trainer: "pl.Trainer", obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process. A collective."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, obj)
    return parts


def dedupe_by_id(ids: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the first row of each sample id (a DistributedSampler repeats samples to even out ranks), in id order
    of first appearance."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[first].sort().values
    return (ids[keep], *(c[keep] for c in columns))
