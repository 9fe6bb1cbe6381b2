"""Attention rollout (Abnar & Zuidema, 2020) and gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021).

Both read the attention probabilities of every self-attention layer of one forward pass, captured without changing
the model (:func:`lightning_lens.attribution._attention.capture_attention`: ``nn.MultiheadAttention``, including
inside ``nn.TransformerEncoderLayer``, and ``F.scaled_dot_product_attention``, which HuggingFace models call at
their default ``attn_implementation="sdpa"``), and compose them over the layers into one relevance per input token:
the row of the [CLS] token (``query=0``, the default), of another query position, or the mean over the queries.

For a vision transformer explained on images ``(B, C, H, W)`` the relevance of the patch tokens (prefix tokens
dropped, see ``token_grid``/``prefix_tokens``) is returned as a ``(B, 1, H, W)`` map, upsampled bilinearly; for any
other inputs (token ids, dict inputs of a HuggingFace model) it is ``(B, N)``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._attention import AttentionRecord, capture_attention
from lightning_lens.attribution._inputs import ModelInputs
from lightning_lens.attribution._token_grid import check_token_grid, grid_shape, tokens_to_grid, upsample_tokens
from lightning_lens.attribution.base import Attribution, OutputFn, Target, target_scores
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_bool, check_choice, check_fraction

__all__ = ["AttentionRollout", "GradientAttentionRollout", "fuse_heads", "gradient_rollout", "rollout"]

HeadFusion = Literal["mean", "max", "min"]
Query = Union[int, Literal["mean"]]


def fuse_heads(attention: torch.Tensor, how: HeadFusion = "mean") -> torch.Tensor:
    """``(B, heads, N, N)`` -> ``(B, N, N)``: the mean, max or min over the heads.

    Example:
        >>> a = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])  # 1 example, 2 heads, 1 query, 2 keys
        >>> fuse_heads(a, "mean").tolist(), fuse_heads(a, "max").tolist()
        ([[[0.4000000059604645, 0.6000000238418579]]], [[[0.6000000238418579, 0.800000011920929]]])
    """
    if how == "mean":
        return attention.mean(dim=1)
    if how == "max":
        return attention.amax(dim=1)
    if how == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be one of 'mean', 'max', 'min', got {how!r}")


def _discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each example's ``N x N`` entries (jacobgil/vit-explain's ``discard_ratio``)."""
    flat = fused.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    lowest = flat.topk(count, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).view_as(fused)


def rollout(
    attentions: list[torch.Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Abnar & Zuidema's rollout ``R = Â_L ... Â_2 Â_1`` of ``(B, heads, N, N)`` attention maps (layer order), with
    ``Â = rownorm(fuse_heads(A) + I)`` (after discarding the lowest ``discard_ratio`` of the fused entries). Returns
    ``(B, N, N)``: row ``i`` is how much of token ``i``'s last-layer representation flows from each input token.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # every query attends to token 0
        >>> rollout([a]).tolist()  # (A + I) / row sums
        [[[1.0, 0.0], [0.5, 0.5]]]
    """
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(b, n, n)
    result = eye
    for attention in attentions:
        fused = fuse_heads(attention, head_fusion)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = fused @ result  # later layers on the left (the paper's order)
    return result


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.'s rule ``R <- R + mean_heads(relu(dy/dA * A)) R``, starting from ``R = I``, over the layers in
    order. ``attentions`` and ``gradients`` are ``(B, heads, N, N)``; returns ``(B, N, N)``.

    Example:
        >>> a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
        >>> g = torch.tensor([[[[2.0, 1.0], [-1.0, 4.0]]]])
        >>> gradient_rollout([a], [g]).tolist()  # I + [[2, 0], [0, 2]]
        [[[3.0, 0.0], [0.0, 3.0]]]
    """
    b, _, n, _ = attentions[0].shape
    result = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(b, n, n)
    for attention, grad in zip(attentions, gradients):
        weighted = (grad * attention).clamp(min=0).mean(dim=1)
        result = result + weighted @ result
    return result


class _Rollout(Attribution):
    """What both rollouts share: capture, checks, the query row and the output shape."""

    supports_structured = True
    needs_float_inputs = False
    produces_map = True
    call_options = ("query",)

    def __init__(
        self,
        model: nn.Module,
        query: Query = 0,
        token_grid: Optional[tuple[int, int]] = None,
        prefix_tokens: Optional[int] = None,
        upsample: bool = True,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self.query = self._check_option("query", query)
        check_token_grid(token_grid, prefix_tokens)
        self.token_grid = None if token_grid is None else tuple(token_grid)
        self.prefix_tokens = prefix_tokens
        self.upsample = check_bool(upsample, "upsample")

    def _check_option(self, key: str, value: Any) -> Any:
        if value == "mean":
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"query must be a token position (int, 0 for [CLS]) or 'mean', got {value!r}")
        return value

    def _captured(self, record: AttentionRecord, batch: int) -> list[torch.Tensor]:
        if not len(record):
            raise ValueError(
                f"{type(self).__name__}: no attention was captured in the model's forward. Rollout reads the"
                " probabilities of nn.MultiheadAttention and torch.nn.functional.scaled_dot_product_attention calls"
                " (HuggingFace models: keep attn_implementation='sdpa', the default; 'eager' and fused kernels are"
                " not seen); a model with another attention must expose it through one of these"
            )
        maps = record.maps
        shapes = [tuple(m.shape) for m in maps]
        n = shapes[0][-1]
        if any(s[0] != batch or s[2] != n or s[3] != n for s in shapes):
            raise ValueError(
                f"{type(self).__name__} needs self-attention over the same {n} tokens in every layer, one map per"
                f" example; captured shapes (batch, heads, queries, keys): {shapes}"
            )
        return maps

    def _read(self, relevance: torch.Tensor, maps: list[torch.Tensor], query: Query,
              inputs: ModelInputs) -> torch.Tensor:
        """The query row of ``(B, N, N)`` relevance, shaped for the inputs."""
        n = relevance.shape[-1]
        if query == "mean":
            # padding keys get no attention from any query in the first layer: leave their rows out of the mean
            valid = (maps[0].detach().sum(dim=(1, 2)) > 0).to(relevance.dtype)
            row = (relevance * valid[:, :, None]).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            if not -n <= query < n:
                raise ValueError(f"query={query} is outside the {n} tokens the attention runs over")
            row = relevance[:, query]
        row = row.detach()
        image = inputs.structure == "tensor" and inputs.leaves[0].dim() == 4 and inputs.leaves[0].is_floating_point()
        if not image:
            return row
        size = tuple(inputs.leaves[0].shape[2:])
        if self.upsample:
            return upsample_tokens(row, size, self.token_grid, self.prefix_tokens)
        h, w, prefix = grid_shape(n, self.token_grid, self.prefix_tokens)
        return tokens_to_grid(row.unsqueeze(-1), h, w, prefix)


class AttentionRollout(_Rollout):
    """Attention rollout: how much attention flows from a query token (the [CLS] token by default) to each input
    token, composed over all layers.

    Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020. Per layer the heads are fused
    (``head_fusion``), the lowest ``discard_ratio`` of the fused entries are set to zero (the option of
    jacobgil/vit-explain), the identity is added for the residual path and the rows are renormalised; the layers are
    composed with later layers on the left, ``R = Â_L ... Â_1``, and the ``query`` row of ``R`` is read. Not
    class-specific: ``target`` is ignored (the map is the same for every class).

    Args:
        model: a transformer classifier (any inputs the model takes: images, token ids, a dict for HuggingFace).
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over the heads.
        discard_ratio: fraction of each layer's lowest fused attentions set to zero, in ``[0, 1)``.
        query: the token whose row is read (0: [CLS]), or ``"mean"`` over the (non-padding) queries.
        token_grid: ``(h, w)`` patch grid for image inputs; default: automatic (see ``prefix_tokens``).
        prefix_tokens: tokens before the patches ([CLS], registers); default: 0 or 1, whichever leaves a square grid.
        upsample: image inputs: return ``(B, 1, H, W)`` (default) rather than the ``(B, 1, h, w)`` token grid.
        output_fn, eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> from lightning_lens.testing.models import TinyViT
        >>> vit = TinyViT(image_size=8, patch_size=2, num_classes=3)
        >>> AttentionRollout(vit).attribute(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "attention_rollout"

    def __init__(
        self,
        model: nn.Module,
        head_fusion: HeadFusion = "mean",
        discard_ratio: float = 0.0,
        query: Query = 0,
        token_grid: Optional[tuple[int, int]] = None,
        prefix_tokens: Optional[int] = None,
        upsample: bool = True,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, query, token_grid, prefix_tokens, upsample, output_fn=output_fn, eval_mode=eval_mode)
        self.head_fusion = check_choice(head_fusion, "head_fusion", ("mean", "max", "min"))
        self.discard_ratio = check_fraction(discard_ratio, "discard_ratio", allow_zero=True, allow_one=False)

    def _attribute(  # type: ignore[override]
        self, inputs: ModelInputs, target: Target, *, query: Query
    ) -> torch.Tensor:
        with torch.no_grad(), capture_attention() as record:
            self.logits(inputs)
        maps = self._captured(record, inputs.batch_size)
        return self._read(rollout(maps, self.head_fusion, self.discard_ratio), maps, query, inputs)


class GradientAttentionRollout(_Rollout):
    """Gradient-weighted attention rollout: class-specific relevance of each input token.

    Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
    Transformers", ICCV 2021 (their rule for self-attention). Starting from ``R = I``, each layer in order updates
    ``R <- R + mean_heads(relu(dy_t/dA * A)) R``, with ``A`` the layer's attention probabilities and ``y_t`` the
    target logit; the ``query`` row of ``R`` is read. One forward and one backward pass for the whole batch (rows are
    independent in eval mode). Arguments as :class:`AttentionRollout` (without the head fusion options).

    Example:
        >>> from lightning_lens.testing.models import TinyViT
        >>> vit = TinyViT(image_size=8, patch_size=2, num_classes=3)
        >>> GradientAttentionRollout(vit).attribute(torch.rand(2, 1, 8, 8), target=1).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "gradient_rollout"

    def _attribute(  # type: ignore[override]
        self, inputs: ModelInputs, target: Target, *, query: Query
    ) -> torch.Tensor:
        with capture_attention(requires_grad=True) as record:
            logits = self.logits(inputs)
        maps = self._captured(record, inputs.batch_size)
        resolved = resolve_target(target, logits)
        score = target_scores(logits, resolved).sum()
        grads = torch.autograd.grad(score, record.raw, allow_unused=True) if score.requires_grad else None
        if grads is None or all(g is None for g in grads):
            raise RuntimeError("the model's output does not depend on its attention probabilities through autograd")
        grad_maps = [torch.zeros(shape, dtype=raw.dtype, device=raw.device) if g is None else g.reshape(shape)
                     for g, raw, shape in zip(grads, record.raw, record.shapes)]
        detached = [m.detach() for m in maps]
        return self._read(gradient_rollout(detached, grad_maps), detached, query, inputs)
