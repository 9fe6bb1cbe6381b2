"""Vision-transformer tokens as an image grid: ``(B, N, D)`` tokens -> ``(B, D, h, w)`` after dropping the prefix tokens
([CLS], register or distillation tokens), as pytorch-grad-cam's ``reshape_transform`` does by hand."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lightning_lens.utils.checks import check_int

__all__ = ["AUTO_PREFIXES", "check_token_grid", "grid_shape", "tokens_to_grid", "upsample_tokens"]

#: the prefix lengths tried when neither ``token_grid`` nor ``prefix_tokens`` is given: none, or one [CLS] token.
AUTO_PREFIXES = (0, 1)


def check_token_grid(token_grid: Optional[tuple[int, int]], prefix_tokens: Optional[int]) -> None:
    """Validate ``token_grid=(h, w)`` and ``prefix_tokens=`` arguments (both optional).

    Example:
        >>> check_token_grid((4, 4), 1)
        >>> check_token_grid((4,), None)
        Traceback (most recent call last):
        ...
        ValueError: token_grid must be a pair (h, w) of positive ints, e.g. token_grid=(14, 14), got (4,)
    """
    if token_grid is not None:
        if (not isinstance(token_grid, (tuple, list)) or len(token_grid) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in token_grid)):
            kind = ValueError if isinstance(token_grid, (tuple, list)) else TypeError
            raise kind(
                f"token_grid must be a pair (h, w) of positive ints, e.g. token_grid=(14, 14), got {token_grid!r}"
            )
    if prefix_tokens is not None:
        check_int(prefix_tokens, "prefix_tokens", minimum=0)


def grid_shape(
    tokens: int, token_grid: Optional[tuple[int, int]] = None, prefix_tokens: Optional[int] = None
) -> tuple[int, int, int]:
    """``(h, w, prefix)`` for ``tokens`` tokens: given, or the one ``prefix`` in :data:`AUTO_PREFIXES` that leaves a
    perfect square of patch tokens.

    Raises:
        ValueError: the numbers do not add up, or the automatic rule finds no grid or two.

    Example:
        >>> grid_shape(17), grid_shape(16), grid_shape(20, token_grid=(4, 4)), grid_shape(10, prefix_tokens=1)
        ((4, 4, 1), (4, 4, 0), (4, 4, 4), (3, 3, 1))
    """
    if token_grid is not None:
        h, w = token_grid
        prefix = tokens - h * w if prefix_tokens is None else prefix_tokens
        if prefix < 0 or prefix + h * w != tokens:
            raise ValueError(
                f"token_grid={tuple(token_grid)} and prefix_tokens={prefix_tokens} do not fit {tokens} tokens: h * w +"
                f" prefix_tokens must equal the number of tokens; pass the grid of patches and the number of [CLS] /"
                f" register tokens in front of them"
            )
        return h, w, prefix
    if prefix_tokens is not None:
        side = math.isqrt(max(tokens - prefix_tokens, 0))
        if tokens <= prefix_tokens or side * side != tokens - prefix_tokens:
            raise ValueError(
                f"{tokens} tokens minus prefix_tokens={prefix_tokens} is not a square grid of patches; pass"
                f" token_grid=(h, w)"
            )
        return side, side, prefix_tokens
    found = [(math.isqrt(tokens - p), p) for p in AUTO_PREFIXES if tokens - p > 0
             and math.isqrt(tokens - p) ** 2 == tokens - p]
    if len(found) != 1:
        why = "no" if not found else "more than one"
        raise ValueError(
            f"cannot tell the patch grid of {tokens} tokens: {why} choice of {AUTO_PREFIXES} prefix ([CLS]) tokens"
            " leaves a square number of patches; pass token_grid=(h, w) and prefix_tokens= (e.g. token_grid=(14, 14),"
            " prefix_tokens=1 for a ViT-B/16 at 224 pixels)"
        )
    side, prefix = found[0]
    return side, side, prefix


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int, prefix: int) -> torch.Tensor:
    """``(B, N, D)`` tokens -> ``(B, D, h, w)`` patch features, the first ``prefix`` tokens dropped (row-major
    patches, as a patch-embedding convolution flattened with ``flatten(2).transpose(1, 2)`` orders them).

    Example:
        >>> t = torch.arange(10.0).view(1, 5, 2)  # [CLS] + 2 x 2 patches, 2 features
        >>> tokens_to_grid(t, 2, 2, 1)[0, 0].tolist()
        [[2.0, 4.0], [6.0, 8.0]]
    """
    b, _, d = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(b, d, h, w)


def upsample_tokens(relevance: torch.Tensor, size: tuple[int, ...], token_grid: Optional[tuple[int, int]] = None,
                    prefix_tokens: Optional[int] = None) -> torch.Tensor:
    """``(B, N)`` per-token relevance -> ``(B, 1, H, W)`` over the image (prefix dropped, bilinear upsampling).

    Example:
        >>> upsample_tokens(torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0]]), (4, 4))[0, 0, 0].tolist()
        [1.0, 1.25, 1.75, 2.0]
    """
    h, w, prefix = grid_shape(relevance.shape[1], token_grid, prefix_tokens)
    grid = tokens_to_grid(relevance.unsqueeze(-1), h, w, prefix)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
