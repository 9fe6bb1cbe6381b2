"""Capture attention probabilities without changing the model.

:func:`capture_attention` is a context manager. While it is active, every attention computation of a forward pass
records its probabilities ``A`` (shape ``(B, heads, queries, keys)``) as the very tensor the output is computed from
(``out = A @ V``), so ``torch.autograd.grad(score, A)`` works (gradient rollout needs it). It covers:

* ``nn.MultiheadAttention`` however it is called. ``torch.nn.functional.multi_head_attention_forward`` is wrapped:
  with ``need_weights=True`` (the default of a direct call) the function runs unchanged and only its ``softmax`` is
  observed, so the output is bit-identical; with ``need_weights=False`` (``nn.TransformerEncoderLayer``) it calls
  ``scaled_dot_product_attention``, which is intercepted as below. MHA's and the encoder layer's fused fast path
  (eval mode, no grad) is switched off while capturing (``torch.backends.mha.set_fastpath_enabled(False)``).
* ``torch.nn.functional.scaled_dot_product_attention`` (HuggingFace models at their default SDPA attention, timm-style
  blocks calling ``F.scaled_dot_product_attention``): replaced by the explicit computation
  ``softmax(Q K^T * scale + mask) @ V`` with SDPA's semantics (boolean masks: ``True`` attends; additive float
  masks; ``is_causal`` upper-left aligned; ``scale``; ``dropout_p``; ``enable_gqa``). The output equals SDPA's to
  float rounding (about 1e-7 relative in float32), not bit for bit: SDPA's fused kernels sum in another order.

Everything is restored when the context exits, also after an exception. Code that imported the function object
itself (``from torch.nn.functional import scaled_dot_product_attention``) before capturing is not seen; the error of
:class:`AttentionRecord` users then says no attention was captured.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["AttentionRecord", "capture_attention", "explicit_attention"]

_LOCK = threading.RLock()  # patching module attributes is process-wide: one capture at a time (nesting allowed)
#: the position of ``need_weights`` among the parameters of ``F.multi_head_attention_forward``
_NEED_WEIGHTS = list(inspect.signature(F.multi_head_attention_forward).parameters).index("need_weights")


@dataclass
class AttentionRecord:
    """The attention probabilities of one forward pass, in the order the attention layers ran.

    Attributes:
        raw: the probability tensors exactly as the forward used them (in the autograd graph), e.g.
            ``(B * heads, queries, keys)`` inside ``nn.MultiheadAttention``; differentiate with respect to these.
        shapes: ``(B, heads, queries, keys)`` of each entry of :attr:`raw`.
    """

    raw: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[int, int, int, int]] = field(default_factory=list)
    requires_grad: bool = False

    def add(self, probs: torch.Tensor, batch: int) -> None:
        if self.requires_grad and torch.is_grad_enabled() and not probs.requires_grad:
            probs.requires_grad_(True)  # a leaf: nothing before it needs grad, so nothing else changes
        queries, keys = probs.shape[-2], probs.shape[-1]
        self.raw.append(probs)
        self.shapes.append((batch, probs.numel() // max(batch * queries * keys, 1), queries, keys))

    @property
    def maps(self) -> list[torch.Tensor]:
        """Each layer's probabilities as ``(B, heads, queries, keys)`` (views of :attr:`raw`)."""
        return [t.reshape(shape) for t, shape in zip(self.raw, self.shapes)]

    def __len__(self) -> int:
        return len(self.raw)


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    observe: Optional[Callable[[torch.Tensor], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, probabilities)`` of ``F.scaled_dot_product_attention`` computed step by step (same arguments);
    ``observe(probabilities)`` is called before they are used.

    Example:
        >>> q = k = v = torch.randn(2, 3, 5, 4)
        >>> out, probs = explicit_attention(q, k, v, is_causal=True)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
        >>> probs.shape, float(probs[0, 0, 0, 1])  # the first query sees only the first key
        (torch.Size([2, 3, 5, 5]), 0.0)
    """
    queries, keys = query.shape[-2], key.shape[-2]
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if scores.dtype in (torch.float16, torch.bfloat16):  # SDPA accumulates the softmax in float32
        probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    masked_rows = scores.isneginf().all(dim=-1, keepdim=True)
    if bool(masked_rows.any()):  # SDPA gives zeros (not NaN) for a query that may attend to no key
        probs = probs.masked_fill(masked_rows, 0.0)
    if observe is not None:
        observe(probs)
    used = F.dropout(probs, dropout_p, training=True) if dropout_p > 0 else probs
    return used @ value, probs


@contextlib.contextmanager
def capture_attention(disable_fastpath: bool = True, requires_grad: bool = False) -> Iterator[AttentionRecord]:
    """While active, record the attention probabilities of every attention computation (see the module docstring).

    Args:
        disable_fastpath: switch off the fused ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path
            while capturing (it computes attention inside one kernel; without it nothing can be recorded in eval
            mode under ``torch.no_grad()``).
        requires_grad: make every recorded probability tensor part of the autograd graph even when nothing before
            it requires grad (frozen parameters, token-id inputs), so it can be differentiated; only when grad is
            enabled.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> with capture_attention() as record:
        ...     out = layer(x)
        >>> [tuple(m.shape) for m in record.maps], torch.allclose(out, layer(x), atol=1e-6)
        ([(3, 2, 5, 5)], True)
        >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 3, 4)
        >>> with capture_attention() as record:
        ...     out, weights = mha(x, x, x)
        >>> torch.equal(record.maps[0].mean(1), weights)  # need_weights=True: the very tensor MHA computed
        True
    """
    record = AttentionRecord(requires_grad=requires_grad)
    original_sdpa = F.scaled_dot_product_attention
    original_mha = F.multi_head_attention_forward
    original_softmax = F.softmax
    inside_mha: list[int] = []  # the batch size of the nn.MultiheadAttention call running now (nesting: a stack)

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
             enable_gqa: bool = False) -> torch.Tensor:
        def observe(probs: torch.Tensor) -> None:
            record.add(probs, probs.shape[0] if probs.dim() >= 3 else 1)

        return explicit_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, observe)[0]

    def mha(*args: Any, **kwargs: Any) -> Any:
        query = args[0] if args else kwargs["query"]
        batched = query.dim() == 3
        # inside the function the query is (queries, batch, dim): batch_first modules transpose before calling
        inside_mha.append(query.shape[1] if batched else 1)
        need_weights = kwargs.get("need_weights", args[_NEED_WEIGHTS] if len(args) > _NEED_WEIGHTS else True)
        try:
            if not need_weights:
                return original_mha(*args, **kwargs)  # calls scaled_dot_product_attention: intercepted above
            setattr(F, "softmax", observed_softmax)
            try:
                return original_mha(*args, **kwargs)
            finally:
                setattr(F, "softmax", original_softmax)
        finally:
            inside_mha.pop()

    def observed_softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
        probs = original_softmax(*args, **kwargs)
        if inside_mha:
            record.add(probs, inside_mha[-1])
        return probs

    fastpath: Optional[bool] = None
    with _LOCK:
        try:
            if disable_fastpath:
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            setattr(F, "scaled_dot_product_attention", sdpa)
            setattr(F, "multi_head_attention_forward", mha)
            yield record
        finally:
            setattr(F, "scaled_dot_product_attention", original_sdpa)
            setattr(F, "multi_head_attention_forward", original_mha)
            setattr(F, "softmax", original_softmax)
            if fastpath is not None:
                torch.backends.mha.set_fastpath_enabled(fastpath)
