"""Model-independent control "attributions": an edge detector and random maps.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, compare saliency methods with an edge detector: a
method whose maps stay the same when the model's weights are randomized explains the input, not the model. Both
controls ignore the model (and the target), so a sound sanity check must flag them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution.base import Attribution, OutputFn, Target
from lightning_lens.utils.rng import check_seed, private_generator


class EdgeDetector(Attribution):
    """Sobel gradient magnitude of the input image, per channel; the model is ignored.

    Each channel of a ``(B, C, H, W)`` input is filtered with the 3x3 Sobel kernels ``[[-1, 0, 1], [-2, 0, 2],
    [-1, 0, 1]]`` (horizontal) and its transpose (vertical), with the border replicated, and the result is
    ``sqrt(gx^2 + gy^2)`` per channel, so the output has the input's shape (a vertical unit step gives 4 on the two
    columns next to it). Sum or average over channels when displaying, as for any attribution.

    Args:
        model: ignored (accepted so that every method is built as ``Method(model)``).
        output_fn, eval_mode: ignored, accepted as every method takes them (so one set of keyword arguments builds
            any method).

    Example:
        >>> x = torch.zeros(1, 1, 4, 4); x[..., 2:] = 1.0
        >>> EdgeDetector().attribute(x)[0, 0, 0].tolist()
        [0.0, 4.0, 4.0, 0.0]
    """

    name = "edge"
    requires_model = False

    def __init__(
        self, model: Optional[nn.Module] = None, *, output_fn: Optional[OutputFn] = None, eval_mode: bool = True
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        """Sobel magnitudes shaped like ``inputs`` (``(B, C, H, W)``); ``target`` and ``abs`` change nothing."""
        if inputs.dim() != 4:
            raise ValueError(
                f"inputs: EdgeDetector needs images of shape (batch, channels, height, width), got"
                f" {tuple(inputs.shape)}"
            )
        with torch.no_grad():
            x = inputs.detach().clone()
            channels = x.shape[1]
            kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
            kernels = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
            padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
            g = F.conv2d(padded, kernels, groups=channels).view(x.shape[0], channels, 2, *x.shape[2:])
            return g.square().sum(dim=2).sqrt()


class RandomMap(Attribution):
    """Standard-normal noise shaped like the input; the model is ignored.

    Args:
        model: ignored.
        output_fn, eval_mode: ignored, accepted as every method takes them.
        seed: with an int, every call returns the same maps for the same input shape (a fixed control, so a
            randomization sanity check sees it unchanged and must flag it); ``None`` draws fresh maps from OS
            entropy on each call. Always drawn from a private ``torch.Generator``: the global RNG is untouched.

    Example:
        >>> a = RandomMap(seed=1).attribute(torch.zeros(2, 3))
        >>> torch.equal(a, RandomMap(seed=1).attribute(torch.zeros(2, 3)))
        True
    """

    name = "random"
    requires_model = False

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        seed: Optional[int] = 0,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        self.seed = check_seed(seed)

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        """Random maps shaped like ``inputs`` (``abs=True``: half-normal)."""
        gen = private_generator(self.seed, inputs.device)
        return torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype, device=inputs.device)
