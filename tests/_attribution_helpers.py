"""Helpers of the attribution tests: chunking of the multi-sample methods, a tiny HuggingFace BERT."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def conv_model_5x5() -> nn.Module:
    """A seeded conv net for (B, 2, 5, 5) inputs, in eval mode."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()


def rows_of_every_forward(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``run()``'s result and the number of rows of every forward of ``model`` during it."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        return run(), rows
    finally:
        handle.remove()


def tiny_bert(attn: str | None = None) -> nn.Module:
    """A seeded 2-layer ``BertForSequenceClassification`` (vocabulary 100, 3 labels) in eval mode; ``attn`` is its
    ``attn_implementation`` (None: the default, sdpa). Needs transformers (skip with ``pytest.importorskip``)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=32, num_labels=3, **({} if attn is None else {"attn_implementation": attn}),
    )
    return transformers.BertForSequenceClassification(config).eval()


def bert_batch() -> dict[str, torch.Tensor]:
    """Three sequences of 9 token ids for :func:`tiny_bert`, the second padded after 6 tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask}
