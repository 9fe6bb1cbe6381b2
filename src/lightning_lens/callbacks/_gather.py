"""Gathering per-sample rows from every rank, with uneven counts (the last batch is often smaller)."""

from __future__ import annotations

import torch

from lightning_lens._pl import pl


def gather_rows(trainer: "pl.Trainer", rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows`` (N_r, ...) of every rank along dim 0; call it on all ranks (it is a collective).

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


def dedupe_by_id(ids: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the first row of each sample id (a DistributedSampler repeats samples to even out ranks)."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[first].sort().values
    return (ids[keep], *(c[keep] for c in columns))
