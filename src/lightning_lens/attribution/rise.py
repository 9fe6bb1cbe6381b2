"""RISE (Petsiuk et al., 2018): the class score averaged over random masks, as a map of where it comes from."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, logits_in_blocks, resolve_batch_size
from lightning_lens.attribution.base import Attribution, OutputFn, Target, forward_logits, target_scores
from lightning_lens.utils.rng import check_seed, private_generator
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_bool, check_float, check_int

__all__ = ["RISE"]


class RISE(Attribution):
    """Randomized Input Sampling for Explanation: a weighted sum of random masks, each weighted by the class score
    of the input seen through it.

    Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018. Each
    mask ``M_i`` is a random binary ``s x s`` grid (each cell 1 with probability ``p``) upsampled bilinearly to
    ``(s + 1) * cell`` pixels per side (``cell = ceil(H / s)``) and cropped to ``H x W`` at a random shift in
    ``[0, cell)`` per axis, so masks are smooth and not aligned to the grid. The saliency of class ``c`` is the
    paper's Monte-Carlo estimate (its Eq. 6, normalized by the expected mask value ``p``)::

        S_c = 1 / (N p) * sum_i f_c(x * M_i) M_i

    with ``f_c`` the softmax probability of ``c`` (``softmax=True``, the paper; the sigmoid of a model with a single
    score per example, whose softmax would be 1 whatever the mask) or its logit. The same ``N`` masks
    (drawn from a private generator, ``seed``) serve every example of a call; the target class is resolved on the
    unmasked inputs. Forward passes only. Maps are ``(B, 1, H, W)`` (one value per pixel, all channels masked
    together). Cost: ``N`` forward passes per example, in blocks within the element budget.

    Args:
        model: the classifier of ``(B, C, H, W)`` images.
        n_masks: ``N`` (default 4000, the paper's setting for ResNet-50).
        grid_size: ``s``, cells per side of the low-resolution grid (default 7, the paper's).
        probability: ``p``, the probability that a cell is kept (default 0.5, the paper's).
        softmax: weight masks by the class probability (``True``, the paper) or by the logit.
        batch_size: most masked rows per forward pass; ``None`` picks whole masks of the batch within a budget of
            ``2**17`` input elements per pass. Results do not depend on it.
        seed: mask seed; ``None`` draws fresh masks from OS entropy on each call. The global RNG is never used.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`); the softmax is taken over those scores.
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> RISE(model, n_masks=50).attribute(torch.rand(3, 1, 4, 4), target=0).shape
        torch.Size([3, 1, 4, 4])
    """

    name = "rise"
    produces_map = True
    call_options = ("n_masks", "batch_size", "seed")

    def __init__(
        self,
        model: nn.Module,
        n_masks: int = 4000,
        grid_size: int = 7,
        probability: float = 0.5,
        softmax: bool = True,
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        self.n_masks = check_int(n_masks, "n_masks", minimum=1)
        self.grid_size = check_int(grid_size, "grid_size", minimum=1)
        self.probability = check_float(probability, "probability", minimum=0.0, maximum=1.0, open_min=True)
        self.softmax = check_bool(softmax, "softmax")
        self.batch_size = check_batch_size(batch_size)
        self.seed = check_seed(seed)

    def _check_option(self, key: str, value: object) -> object:
        if key == "n_masks":
            return check_int(value, "n_masks", minimum=1)
        if key == "batch_size":
            return check_batch_size(value)  # type: ignore[arg-type]
        return check_seed(value)  # type: ignore[arg-type]

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        n_masks: Optional[int] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        """RISE maps ``(B, 1, H, W)``; keyword options override the constructor's for this call."""
        return super().attribute(inputs, target, abs=abs, n_masks=n_masks, batch_size=batch_size, seed=seed)

    def masks(self, n_masks: int, height: int, width: int, seed: Optional[int] = None,
              device: Optional[torch.device] = None) -> "_Masks":
        """The ``n_masks`` masks of a call with ``seed`` for ``height x width`` images (built lazily, in slices)."""
        return _Masks(n_masks, self.grid_size, self.probability, height, width, seed, device or torch.device("cpu"))

    def _attribute(  # type: ignore[override]
        self, inputs: torch.Tensor, target: Target, *, n_masks: int, batch_size: Optional[int], seed: Optional[int]
    ) -> torch.Tensor:
        x = inputs.detach()
        if x.dim() != 4:
            missing = (
                "; add the missing dimension (inputs.unsqueeze(1) for a batch of one-channel images,"
                " inputs.unsqueeze(0) for a single image)" if x.dim() == 3 else ""
            )
            raise ValueError(
                "inputs: RISE masks images, so inputs must have shape (batch, channels, height, width), got"
                f" {tuple(x.shape)}{missing}"
            )
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        rows = resolve_batch_size(batch_size, batch, x[0].numel())
        masks = self.masks(n_masks, height, width, seed, x.device)
        with torch.no_grad():
            logits = logits_in_blocks(self.model, x, rows, self.output_fn)
            resolved = resolve_target(target, logits)
            total = torch.zeros(batch, height, width, dtype=x.dtype, device=x.device)
            for blk in blocks(n_masks, batch, rows):
                k, part = blk.s1 - blk.s0, x[blk.b0 : blk.b1]
                m = masks.slice(blk.s0, blk.s1).to(x.dtype)  # (k, H, W)
                masked = (m[:, None, None] * part[None]).reshape(k * part.shape[0], *x.shape[1:])
                out = forward_logits(self.model, masked, self.output_fn)
                if self.softmax:  # one score per example (a binary classifier's logit): its probability
                    out = out.sigmoid() if out.shape[1] == 1 else out.softmax(dim=1)
                scores = target_scores(out, resolved[blk.b0 : blk.b1].repeat(k)).view(k, part.shape[0])
                total[blk.b0 : blk.b1] += torch.einsum("kb,khw->bhw", scores, m)
        return (total / (n_masks * self.probability)).unsqueeze(1)


class _Masks:
    """RISE's masks: the low-resolution grids and shifts are drawn up front (the same for every block split), the
    full-resolution masks are built per slice."""

    def __init__(self, n: int, grid: int, p: float, height: int, width: int, seed: Optional[int],
                 device: torch.device) -> None:
        gen = private_generator(seed, torch.device("cpu"))  # CPU draws: the same masks on every device
        self.grids = (torch.rand(n, grid, grid, generator=gen) < p).float()
        self.cell = (math.ceil(height / grid), math.ceil(width / grid))
        self.shift_h = torch.randint(0, self.cell[0], (n,), generator=gen).tolist()
        self.shift_w = torch.randint(0, self.cell[1], (n,), generator=gen).tolist()
        self.size, self.grid, self.device = (height, width), grid, device

    def slice(self, s0: int, s1: int) -> torch.Tensor:
        """Masks ``s0:s1`` as a ``(s1 - s0, H, W)`` tensor in [0, 1]."""
        up_size = ((self.grid + 1) * self.cell[0], (self.grid + 1) * self.cell[1])
        up = torch.nn.functional.interpolate(self.grids[s0:s1, None].to(self.device), size=up_size, mode="bilinear",
                                             align_corners=False)[:, 0]
        h, w = self.size
        return torch.stack([up[j, dh : dh + h, dw : dw + w]
                            for j, (dh, dw) in enumerate(zip(self.shift_h[s0:s1], self.shift_w[s0:s1]))])
