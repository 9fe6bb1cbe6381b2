"""Chunking for the multi-sample methods (SmoothGrad, Integrated Gradients, Occlusion).

A method that needs ``n`` perturbed copies of a batch of ``B`` examples has ``n * B`` rows to run. They are run in
blocks of at most ``batch_size`` rows, sample-major: a block holds whole samples ``s0:s1`` for all examples when
``batch_size >= B``, otherwise one sample for a slice ``b0:b1`` of the examples. Each method draws or builds the rows
of sample ``s`` the same way whatever the block boundaries are, so chunked results equal unchunked ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Optional

import torch
from torch import nn

from lightning_lens.attribution.base import forward_logits
from lightning_lens.utils.checks import check_int

#: the default cap on the number of input *elements* one block may hold (rows x elements per row), rounded down to
#: whole samples of the batch when one sample of the whole batch fits, else a slice of the batch (at least one
#: example), so a block's memory stays bounded whatever the batch size (issue 19). 2**16 float32 elements are 256 kB of
#: input: for a batch of 32 images of 3x32x32 one sample per forward (32 rows), of 1x32x32 two samples (64 rows), for
#: a single 3x32x32 image 21 rows. Activation memory grows with the input size, so an element budget keeps a block's
#: memory roughly constant across input sizes. On CPU, larger blocks run *slower* per row (activations fall out of
#: cache): ``benchmarks/attribution.py`` measured SmoothGrad at ~1.0x the cost of n plain gradient passes with 32-64
#: rows per forward, but ~0.8x with 160 rows and ~0.5x with 1600 (batch of 32, 3x32x32, 4-conv CNN). On a GPU a
#: larger ``batch_size`` may pay off.
DEFAULT_ELEMENT_BUDGET = 2**16


class Block(NamedTuple):
    """Samples ``s0:s1`` of examples ``b0:b1``."""

    s0: int
    s1: int
    b0: int
    b1: int


def check_batch_size(batch_size: Optional[int], argument: str = "batch_size") -> Optional[int]:
    """Validate a user's ``batch_size`` (``None`` = automatic)."""
    return None if batch_size is None else check_int(batch_size, argument, minimum=1)


def default_rows(elements_per_row: int) -> int:
    """Rows per forward that fit the element budget (at least one)."""
    return max(1, DEFAULT_ELEMENT_BUDGET // max(1, elements_per_row))


def resolve_batch_size(batch_size: Optional[int], batch: int, elements_per_row: int) -> int:
    """Rows per forward: ``batch_size`` if given, else the element budget's rows.

    The budget's rows are rounded down to whole samples of the batch when at least one sample of the whole batch fits;
    otherwise they are fewer than the batch and each block holds one sample of a slice of the examples, so no block
    exceeds the budget (except a single row larger than it) however large the batch.

    Example:
        >>> resolve_batch_size(None, 8, 3 * 32 * 32), resolve_batch_size(None, 64, 3 * 32 * 32)
        (16, 21)
        >>> resolve_batch_size(None, 4, 3 * 224 * 224), resolve_batch_size(5, 4, 10)
        (1, 5)
    """
    if batch_size is not None:
        return batch_size
    rows = default_rows(elements_per_row)
    return (rows // batch) * batch if rows >= batch else rows


def logits_in_blocks(model: nn.Module, inputs: torch.Tensor, rows: int) -> torch.Tensor:
    """``forward_logits(model, inputs)`` run on slices of at most ``rows`` examples (bounded activation memory).

    Each slice is cloned first: the model may modify its input in place.
    """
    if inputs.shape[0] <= rows:
        return forward_logits(model, inputs.clone())
    return torch.cat([forward_logits(model, inputs[b0 : b0 + rows].clone()) for b0 in range(0, inputs.shape[0], rows)])


def blocks(n_samples: int, batch: int, batch_size: int) -> Iterator[Block]:
    """Blocks covering ``n_samples x batch`` rows with at most ``batch_size`` rows each, sample-major."""
    if batch_size >= batch:
        per = batch_size // batch
        for s0 in range(0, n_samples, per):
            yield Block(s0, min(n_samples, s0 + per), 0, batch)
    else:
        for s in range(n_samples):
            for b0 in range(0, batch, batch_size):
                yield Block(s, s + 1, b0, min(batch, b0 + batch_size))
