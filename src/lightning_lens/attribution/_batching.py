"""Chunking for the multi-sample methods (SmoothGrad, Integrated Gradients, Occlusion).

A method that needs ``n`` perturbed copies of a batch of ``B`` examples has ``n * B`` rows to run. They are run in
blocks of at most ``batch_size`` rows, sample-major: a block holds whole samples ``s0:s1`` for all examples when
``batch_size >= B``, otherwise one sample for a slice ``b0:b1`` of the examples. Each method draws or builds the rows
of sample ``s`` the same way whatever the block boundaries are, so chunked results equal unchunked ones.

No block holds more than the budget (or one example, when an example alone is larger), and nothing else grows with the
batch but the result (issue 19): SmoothGrad takes a split batch's noise rows from a :class:`NormalStream` of the
whole draw, Integrated Gradients runs slice by slice (``blocks(..., example_major=True)``), Gradient runs in slices.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._inputs import ModelInputs
from lightning_lens.attribution.base import OutputFn, forward_logits
from lightning_lens.utils.checks import check_int

#: the default cap on the number of input *elements* one block may hold (rows x elements per row), rounded down to
#: whole samples of the batch when one sample of the whole batch fits, else a slice of the batch (at least one
#: example), so a block's memory stays bounded whatever the batch size (issue 19). 2**17 float32 elements are 512 kB of
#: input: for a batch of 32 images of 3x32x32 one sample per forward (32 rows; 2**16 split each sample into 21 + 11
#: rows and was 10-20 % slower than Captum with ``internal_batch_size`` = batch), of 1x32x32 four samples (128 rows),
#: for a single 3x32x32 image 42 rows. Activation memory grows with the input size, so an element budget keeps a
#: block's memory roughly constant across input sizes. On CPU, much larger blocks run *slower* per row (activations
#: fall out of cache): ``benchmarks/attribution.py`` measured SmoothGrad at ~1.1x the efficiency of n plain gradient
#: passes with 64-160 rows per forward, but ~0.8x with 512 (batch of 32, 3x32x32, 4-conv CNN). On a GPU a larger
#: ``batch_size`` may pay off.
DEFAULT_ELEMENT_BUDGET = 2**17


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
        (40, 42)
        >>> resolve_batch_size(None, 4, 3 * 224 * 224), resolve_batch_size(5, 4, 10)
        (1, 5)
    """
    if batch_size is not None:
        return batch_size
    rows = default_rows(elements_per_row)
    return (rows // batch) * batch if rows >= batch else rows


def logits_in_blocks(
    model: nn.Module,
    inputs: Union[torch.Tensor, ModelInputs],
    rows: int,
    output_fn: Optional[OutputFn] = None,
) -> torch.Tensor:
    """``forward_logits(model, inputs)`` run on slices of at most ``rows`` examples (bounded activation memory).

    Each slice is cloned first: the model may modify its input in place.
    """
    if isinstance(inputs, ModelInputs):
        batch = inputs.batch_size
        return torch.cat([
            forward_logits(model, inputs.rows(b0, min(batch, b0 + rows)).cloned(), output_fn)
            for b0 in range(0, batch, rows)
        ])
    if inputs.shape[0] <= rows:
        return forward_logits(model, inputs.clone(), output_fn)
    return torch.cat([
        forward_logits(model, inputs[b0 : b0 + rows].clone(), output_fn) for b0 in range(0, inputs.shape[0], rows)
    ])


def blocks(n_samples: int, batch: int, batch_size: int, *, example_major: bool = False) -> Iterator[Block]:
    """Blocks covering ``n_samples x batch`` rows with at most ``batch_size`` rows each, sample-major.

    With ``example_major`` and ``batch_size < batch``, the blocks of one slice of the examples come one after the
    other (all its samples, in order) before the next slice: a method without random draws then needs per-slice
    state only (Integrated Gradients: the slice's difference to the baseline and its layer outputs).

    Example:
        >>> [tuple(b) for b in blocks(2, 3, 2)]
        [(0, 1, 0, 2), (0, 1, 2, 3), (1, 2, 0, 2), (1, 2, 2, 3)]
        >>> [tuple(b) for b in blocks(2, 3, 2, example_major=True)]
        [(0, 1, 0, 2), (1, 2, 0, 2), (0, 1, 2, 3), (1, 2, 2, 3)]
    """
    if batch_size >= batch:
        per = batch_size // batch
        for s0 in range(0, n_samples, per):
            yield Block(s0, min(n_samples, s0 + per), 0, batch)
    elif example_major:
        for b0 in range(0, batch, batch_size):
            for s in range(n_samples):
                yield Block(s, s + 1, b0, min(batch, b0 + batch_size))
    else:
        for s in range(n_samples):
            for b0 in range(0, batch, batch_size):
                yield Block(s, s + 1, b0, min(batch, b0 + batch_size))


def example_slices(batch: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """The slices ``(b0, b1)`` of the examples that :func:`blocks` uses: the whole batch when ``batch_size >= batch``,
    else consecutive slices of ``batch_size`` examples.

    Example:
        >>> list(example_slices(5, 2)), list(example_slices(5, 8))
        ([(0, 2), (2, 4), (4, 5)], [(0, 5)])
    """
    step = batch if batch_size >= batch else batch_size
    for b0 in range(0, batch, step):
        yield b0, min(batch, b0 + step)


#: dtypes whose CPU ``torch.randn`` fills 16-element groups from consecutive uniforms (see :class:`NormalStream`)
_GROUPED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: most elements :meth:`NormalStream.skip` draws at once
_SKIP_CHUNK = 2**16


class NormalStream:
    """The values of one ``torch.randn(numel, generator=generator)`` draw, handed out in consecutive pieces without
    ever holding the whole draw (issue 19: SmoothGrad's noise for a batch split into blocks).

    On CPU, ``torch.randn`` of ``n >= 16`` contiguous elements draws ``n`` uniforms in order and turns each group of 16
    into normals (Box-Muller), then, if ``n`` is not a multiple of 16, recomputes the last 16 values from 16 more
    uniforms. Pieces drawn at multiples of 16, the last one holding at least the last 16 elements, therefore give the
    same values and leave the generator in the same state as the whole draw; ``tests/attribution/
    test_attr_chunking.py`` checks this against ``torch.randn``. On other devices (Philox offsets) or for fewer than
    16 elements, the whole draw is made at the first :meth:`take` and handed out in pieces.

    Example:
        >>> whole = torch.randn(40, generator=torch.Generator().manual_seed(0))
        >>> stream = NormalStream(40, torch.Generator().manual_seed(0), torch.float32, torch.device("cpu"))
        >>> parts = [torch.empty(n) for n in (3, 30, 7)]
        >>> for part in parts:
        ...     stream.take(part)
        >>> torch.equal(torch.cat(parts), whole)
        True
    """

    def __init__(self, numel: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> None:
        self.numel, self.generator, self.dtype, self.device = numel, generator, dtype, device
        self.grouped = device.type == "cpu" and dtype in _GROUPED_DTYPES and numel >= 16
        self.drawn = 0  # elements drawn from the generator so far: a multiple of 16, or numel
        self.pending = torch.empty(0, dtype=dtype, device=device)  # drawn, not yet handed out

    def _draw_to(self, end: int) -> None:
        """Draw at least up to element ``end`` (the next multiple of 16, or the end)."""
        if end <= self.drawn:
            return
        target = min(self.numel, -(-end // 16) * 16) if self.grouped else self.numel
        if self.numel - target < 16:  # the last piece holds the last 16 elements (recomputed in the whole draw)
            target = self.numel
        fresh = torch.randn(target - self.drawn, generator=self.generator, dtype=self.dtype, device=self.device)
        self.pending = torch.cat([self.pending, fresh]) if self.pending.numel() else fresh
        self.drawn = target

    def take(self, out: torch.Tensor) -> None:
        """Fill ``out`` with the next ``out.numel()`` values of the draw."""
        m = out.numel()
        self._draw_to(self.drawn - self.pending.numel() + m)
        if m > self.pending.numel():
            raise ValueError(f"NormalStream: {m} values asked, {self.pending.numel()} left of {self.numel}")
        out.copy_(self.pending[:m].view(out.shape))
        self.pending = self.pending[m:]

    def skip(self) -> None:
        """Draw the rest of the values without keeping them (the generator ends where the whole draw leaves it)."""
        while self.drawn < self.numel:
            self._draw_to(min(self.numel, self.drawn + _SKIP_CHUNK))
            self.pending = self.pending[:0]
        self.pending = self.pending[:0]


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in the same state as ``generator`` (same device)."""
    out = torch.Generator(device=generator.device)
    out.set_state(generator.get_state())
    return out
