"""Occlusion (Zeiler and Fergus, 2014): the drop of the target score when a sliding window is replaced by a baseline."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, logits_in_blocks, resolve_batch_size
from lightning_lens.attribution.base import Attribution, OutputFn, Target, forward_logits, target_scores
from lightning_lens.utils import resolve_target

Size = Union[int, Sequence[int]]


def _per_dim(value: Size, shape: Sequence[int], argument: str, channel_value: int) -> tuple[int, ...]:
    """Expand a checked int or tuple to one entry per dim of an example of ``shape``.

    An int or a tuple of ``len(shape) - 1`` entries covers the spatial dims, with ``channel_value`` for the first
    (channel) dim; a tuple of ``len(shape)`` entries gives every dim. 1-D examples have no channel dim.
    """
    d = len(shape)
    if isinstance(value, int):
        return (value,) * d if d == 1 else (channel_value,) + (value,) * (d - 1)
    if len(value) == d:
        return tuple(value)
    if len(value) == d - 1 and d > 1:
        return (channel_value,) + tuple(value)
    expected = f"{d - 1} (spatial dims, all channels at once) or {d} (every dim)" if d > 1 else "1"
    raise ValueError(
        f"{argument}={tuple(value)} has {len(value)} entries, but examples of shape {tuple(shape)} need {expected}"
    )


def _check_size(value: Size, argument: str) -> Size:
    """An int >= 1 or a non-empty tuple of them (the shape is checked against the inputs on each call)."""
    values = [value] if isinstance(value, int) else value
    if (
        isinstance(value, bool)
        or not isinstance(values, Sequence)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    ):
        raise ValueError(f"{argument} must be a positive int or a tuple of positive ints, got {value!r}")
    return value if isinstance(value, int) else tuple(value)


class Occlusion(Attribution):
    """Occlusion: how much the target score drops when a window of the input is replaced by a baseline.

    Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014. A window slides over each
    example with the given stride; window positions start at ``0, stride, 2 stride, ...`` and the last one may be
    cut off by the border, so every feature is covered (Captum's convention). A feature's attribution is the mean,
    over the windows covering it, of ``S_c(x) - S_c(x with the window occluded)``; positive values mark evidence for
    the class. The target class is resolved on the un-occluded input. Forward passes only, without autograd.

    Args:
        model: the classifier.
        window: window size. An int covers all channels and ``window`` along each spatial dim of a ``(C, H, W)``
            example (or ``window`` features of a 1-D example); a tuple gives the spatial sizes (all channels) or one
            size per dim of an example. Sizes are clipped to the input's. Default 8.
        stride: an int or tuple like ``window``; default half the window (rounded down, at least 1).
        baseline: the occluding value: a float (default 0) or a tensor broadcastable to the inputs.
        batch_size: most rows per forward pass; ``None`` picks whole window positions of the batch within a budget
            of ``2**17`` input elements per pass. Results do not depend on it.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(2, 3)
        >>> torch.allclose(Occlusion(model, window=1).attribute(x, target=0), x * model.weight[0])
        True
    """

    name = "occlusion"

    def __init__(
        self,
        model: nn.Module,
        window: Size = 8,
        stride: Optional[Size] = None,
        baseline: Union[float, torch.Tensor] = 0.0,
        batch_size: Optional[int] = None,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        self.window = _check_size(window, "window")
        self.stride = None if stride is None else _check_size(stride, "stride")
        self.baseline = self._check_baseline(baseline)
        self.batch_size = check_batch_size(batch_size)

    @staticmethod
    def _check_baseline(baseline: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float, torch.Tensor)):
            raise TypeError(f"baseline must be a float or a tensor, got {type(baseline).__name__}")
        return baseline

    def geometry(self, example_shape: Sequence[int], window: Optional[Size] = None,
                 stride: Optional[Size] = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(window, stride, positions per dim)`` for examples of ``example_shape``."""
        shape = tuple(example_shape)
        size = self.window if window is None else _check_size(window, "window")
        win = _per_dim(size, shape, "window", shape[0])
        win = tuple(min(w, n) for w, n in zip(win, shape))
        step = self.stride if stride is None else _check_size(stride, "stride")
        if step is None:
            strides = tuple(max(1, w // 2) for w in win)
        else:
            strides = _per_dim(step, shape, "stride", 1)
        counts = tuple(math.ceil((n - w) / s) + 1 for n, w, s in zip(shape, win, strides))
        return win, strides, counts

    call_options = ("window", "stride", "baseline", "batch_size")

    def _check_option(self, key: str, value: object) -> object:
        if key in ("window", "stride"):
            return _check_size(value, key)  # type: ignore[arg-type]
        if key == "baseline":
            return self._check_baseline(value)  # type: ignore[arg-type]
        return check_batch_size(value)  # type: ignore[arg-type]

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        window: Optional[Size] = None,
        stride: Optional[Size] = None,
        baseline: Union[float, torch.Tensor, None] = None,
        batch_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Occlusion attributions shaped like ``inputs``; keyword options override the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, window=window, stride=stride, baseline=baseline,
                                 batch_size=batch_size)

    def _attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target,
        *,
        window: Size,
        stride: Optional[Size],
        baseline: Union[float, torch.Tensor],
        batch_size: Optional[int],
    ) -> torch.Tensor:
        x = inputs.detach()
        win, strides, counts = self.geometry(x.shape[1:], window, stride)
        # no whole-batch copies besides the result (issue 19): x is only read (each forward gets a copy), the fill is
        # a broadcast view
        with torch.no_grad():
            if isinstance(baseline, torch.Tensor):
                try:
                    fill = torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape)
                except RuntimeError:
                    raise ValueError(
                        f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape"
                        f" {tuple(x.shape)}"
                    ) from None
            else:
                fill = torch.full((), float(baseline), dtype=x.dtype, device=x.device).expand(x.shape)
            batch = x.shape[0]
            rows = resolve_batch_size(batch_size, batch, x[0].numel())
            # clones each slice: the model may modify its input
            logits = logits_in_blocks(self.model, x, rows, self.output_fn)
            resolved = resolve_target(target, logits)
            clean = target_scores(logits, resolved)
            windows = [
                tuple(slice(k * s, k * s + w) for k, s, w in zip(pos, strides, win))
                for pos in itertools.product(*(range(c) for c in counts))
            ]
            total = torch.zeros_like(x)
            covered = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
            for blk in blocks(len(windows), batch, rows):
                part, part_fill = x[blk.b0 : blk.b1], fill[blk.b0 : blk.b1]
                k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
                occluded = torch.empty((k, *part.shape), dtype=x.dtype, device=x.device)  # the block, built in place
                for j, p in enumerate(range(blk.s0, blk.s1)):
                    region = (slice(None),) + windows[p]
                    occluded[j] = part
                    occluded[j][region] = part_fill[region]
                scores = target_scores(forward_logits(self.model, occluded.view(k * width, *part.shape[1:]),
                                                      self.output_fn),
                                       resolved[blk.b0 : blk.b1].repeat(k)).view(k, width)
                drop = clean[blk.b0 : blk.b1] - scores
                for j, p in enumerate(range(blk.s0, blk.s1)):
                    region = (slice(None),) + windows[p]
                    total[blk.b0 : blk.b1][region] += drop[j].view(width, *([1] * (x.dim() - 1)))
                    if blk.b0 == 0:
                        covered[windows[p]] += 1
            return total.div_(covered)
