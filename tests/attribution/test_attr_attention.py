"""Issue 13: attention capture without changing the model, attention rollout and gradient rollout.

References: the rollout formulas written out per example in float64 (loops, no shared code with the library), applied
to attention maps obtained independently: ``nn.MultiheadAttention(need_weights=True, average_attn_weights=False)``
layer by layer, a hand-written forward of the tiny ViT, and a HuggingFace BERT with the same weights in eager
attention with ``output_attentions=True``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution import AttentionRollout, GradientAttentionRollout, get_method
from lightning_lens.attribution._attention import capture_attention, explicit_attention
from lightning_lens.testing.models import TinyTextTransformer, TinyViT

from _attribution_helpers import bert_batch, tiny_bert


# ------------------------------------------------------------------------------------------------ hand computations
def hand_rollout(maps, fusion="mean", discard=0.0):
    """Abnar & Zuidema per example: fuse heads, discard, + I, row-normalise, R = A_L ... A_1."""
    rows = []
    for b in range(maps[0].shape[0]):
        n = maps[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a in maps:
            heads = a[b].double()
            fused = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}[fusion]
            if discard:
                flat = fused.flatten().clone()
                flat[flat.argsort()[: int(n * n * discard)]] = 0
                fused = flat.view(n, n)
            fused = fused + torch.eye(n, dtype=torch.float64)
            fused = fused / fused.sum(dim=1, keepdim=True)
            r = fused @ r
        rows.append(r)
    return torch.stack(rows)


def hand_gradient_rollout(maps, grads):
    """Chefer et al. per example: R = I; R += mean_h(relu(grad * A)) @ R, layer by layer."""
    rows = []
    for b in range(maps[0].shape[0]):
        n = maps[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in zip(maps, grads):
            r = r + (g[b].double() * a[b].double()).clamp(min=0).mean(0) @ r
        rows.append(r)
    return torch.stack(rows)


def vit_by_hand(vit: TinyViT, x: torch.Tensor):
    """TinyViT's forward written out (pre-norm blocks, explicit per-head softmax): (logits, attention maps)."""
    tokens = vit.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + vit.pos_embed
    maps = []
    for layer in vit.encoder.layers:
        attn = layer.self_attn
        b, n, e = tokens.shape
        d = e // attn.num_heads
        q, k, v = F.linear(layer.norm1(tokens), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, attn.num_heads, d).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
        maps.append(a)
        tokens = tokens + attn.out_proj((a @ v).transpose(1, 2).reshape(b, n, e))
        tokens = tokens + layer.linear2(F.gelu(layer.linear1(layer.norm2(tokens))))
    return vit.head(vit.norm(tokens)[:, 0]), maps


def text_model_maps(model: TinyTextTransformer, ids, mask):
    """Each encoder layer's per-head attention from nn.MultiheadAttention(need_weights=True), layer by layer."""
    pad = mask == 0
    h = model.token_embedding(ids) + model.position_embedding(torch.arange(ids.shape[1]))[None]
    maps = []
    for layer in model.encoder.layers:
        _, a = layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
        maps.append(a)
        h = layer(h, src_key_padding_mask=pad)
    return maps


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return TinyViT(image_size=8, patch_size=2, num_classes=3, dim=16, heads=2, depth=3).eval()


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    return TinyTextTransformer(vocab_size=30, num_classes=3, dim=16, heads=4, layers=2).eval()


def text_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


# -------------------------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "scale", "gqa", "masked_row"])
def test_explicit_attention_equals_sdpa(case):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
        kwargs["attn_mask"][..., 0] = True
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(5, 5, generator=gen)
    elif case == "scale":
        kwargs["scale"] = 0.3
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    elif case == "masked_row":  # a query that may attend to nothing: SDPA returns zeros
        mask = torch.ones(5, 5, dtype=torch.bool)
        mask[2] = False
        kwargs["attn_mask"] = mask
    out, probs = explicit_attention(q, k, v, **kwargs)
    reference = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert torch.allclose(probs.sum(-1)[probs.sum(-1) > 0], torch.ones(()), atol=1e-6)
    if case == "causal":
        assert probs[..., 0, 1:].abs().max() == 0  # the first query sees only the first key


def test_mha_with_weights_is_bit_identical_and_probabilities_are_its_own():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    plain, plain_weights = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    with capture_attention() as record:
        captured, weights = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    assert torch.equal(captured, plain) and torch.equal(weights, plain_weights)
    assert len(record) == 1 and torch.equal(record.maps[0], plain_weights)
    assert record.maps[0][0, :, :, 3:].abs().max() == 0  # padding keys get no attention


def test_transformer_encoder_outputs_with_and_without_capture(text_model):
    batch = text_batch()
    # grad enabled: both runs take the slow path; only SDPA's kernel is replaced by the explicit computation
    plain = text_model(**batch)
    with capture_attention() as record:
        captured = text_model(**batch)
    assert len(record) == 2
    assert (captured - plain).abs().max() <= 1e-6
    # no grad, eval: without capture torch takes the fused fast path; capture turns it off (and records anyway)
    with torch.no_grad():
        fast = text_model(**batch)
        with capture_attention() as record:
            slow = text_model(**batch)
    assert len(record) == 2 and (fast - slow).abs().max() <= 1e-5


def test_captured_encoder_maps_equal_multihead_attention_weights(text_model):
    batch = text_batch()
    with capture_attention() as record:
        text_model(**batch)
    reference = text_model_maps(text_model, batch["input_ids"], batch["attention_mask"])
    for got, want in zip(record.maps, reference):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_everything_is_restored_also_after_an_exception(vit):
    before = (F.scaled_dot_product_attention, F.multi_head_attention_forward, F.softmax,
              torch.backends.mha.get_fastpath_enabled())
    with pytest.raises(ZeroDivisionError):
        with capture_attention():
            vit(torch.rand(1, 1, 8, 8))
            raise ZeroDivisionError
    after = (F.scaled_dot_product_attention, F.multi_head_attention_forward, F.softmax,
             torch.backends.mha.get_fastpath_enabled())
    assert all(a is b for a, b in zip(before[:3], after[:3])) and before[3] == after[3]

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ValueError, match="boom"):
        AttentionRollout(Broken()).attribute(torch.rand(1, 1, 8, 8))
    assert F.scaled_dot_product_attention is before[0] and F.softmax is before[2]


# -------------------------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5)])
def test_rollout_equals_hand_computation_on_transformer_encoder(vit, fusion, discard):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, maps = vit_by_hand(vit, x)
        assert torch.allclose(logits, vit(x), atol=1e-5)
    expected = hand_rollout(maps, fusion, discard)
    ours = AttentionRollout(vit, head_fusion=fusion, discard_ratio=discard, upsample=False)
    grid = ours.attribute(x)
    assert grid.shape == (2, 1, 4, 4)
    assert torch.allclose(grid.flatten(1), expected[:, 0, 1:].float(), atol=1e-6)
    # the mean over the queries and another query position
    mean = AttentionRollout(vit, head_fusion=fusion, discard_ratio=discard, query="mean", upsample=False)
    assert torch.allclose(mean.attribute(x).flatten(1), expected.mean(1)[:, 1:].float(), atol=1e-6)
    third = AttentionRollout(vit, head_fusion=fusion, discard_ratio=discard, query=3, upsample=False)
    assert torch.allclose(third.attribute(x).flatten(1), expected[:, 3, 1:].float(), atol=1e-6)
    # upsampled (the default): bilinear on that grid
    up = AttentionRollout(vit, head_fusion=fusion, discard_ratio=discard).attribute(x)
    assert torch.allclose(up, F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False), atol=1e-7)


def test_rollout_with_padding_on_text_encoder(text_model):
    batch = text_batch()
    maps = text_model_maps(text_model, batch["input_ids"], batch["attention_mask"])
    expected = hand_rollout([m.detach() for m in maps])
    cls = get_method("attention_rollout", text_model).attribute(batch)
    assert cls.shape == (3, 7)
    assert torch.allclose(cls, expected[:, 0].float(), atol=1e-6)
    assert cls[1, 4:].abs().max() == 0  # padding gets no relevance
    # mean over the real (non-padding) queries only
    mean = AttentionRollout(text_model, query="mean").attribute(batch)
    valid = batch["attention_mask"].double()
    want = (expected * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True)
    assert torch.allclose(mean, want.float(), atol=1e-6)
    assert torch.allclose(AttentionRollout(text_model, query=2).attribute(batch), expected[:, 2].float(), atol=1e-6)


def test_gradient_rollout_equals_hand_computation_on_transformer_encoder(vit):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 2, 1])
    logits, maps = vit_by_hand(vit, x)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    expected = hand_gradient_rollout([m.detach() for m in maps], grads)
    ours = GradientAttentionRollout(vit, upsample=False).attribute(x, target=target)
    assert torch.allclose(ours.flatten(1), expected[:, 0, 1:].float(), atol=1e-6, rtol=1e-5)
    # the default target is the predicted class
    method = GradientAttentionRollout(vit, upsample=False)
    assert torch.allclose(method.attribute(x), method.attribute(x, target=vit(x).argmax(1)))


def test_rollout_is_not_class_specific_but_gradient_rollout_is(vit):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    raw = AttentionRollout(vit)
    assert torch.equal(raw.attribute(x, target=0), raw.attribute(x, target=2))
    grad = GradientAttentionRollout(vit)
    a, b = grad.attribute(x, target=0), grad.attribute(x, target=2)
    assert float((a - b).abs().sum() / a.abs().sum()) > 0.1


def test_works_under_inference_mode_with_frozen_parameters(vit):
    frozen = TinyViT(image_size=8, patch_size=2, num_classes=3, dim=16, heads=2, depth=3)
    frozen.load_state_dict(vit.state_dict())
    frozen.requires_grad_(False)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = GradientAttentionRollout(vit).attribute(x, target=1)
    with torch.inference_mode():
        got = GradientAttentionRollout(frozen).attribute(x, target=1)
    assert torch.allclose(got, expected, atol=1e-7)
    assert all(p.grad is None for p in vit.parameters())


def test_clear_errors():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="no attention was captured"):
        AttentionRollout(mlp).attribute(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(mlp, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(mlp, discard_ratio=1.0)
    with pytest.raises(TypeError, match="query"):
        AttentionRollout(mlp, query="cls")
    vit = TinyViT(image_size=8, patch_size=2)
    with pytest.raises(ValueError, match="query=40"):
        AttentionRollout(vit, query=40).attribute(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="token_grid"):
        AttentionRollout(vit, token_grid=(5, 5)).attribute(torch.rand(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------ HuggingFace
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def berts():
    sdpa, eager = tiny_bert(None), tiny_bert("eager")
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    return sdpa, eager


def test_bert_at_sdpa_outputs_and_maps_match_eager(berts):
    sdpa, eager = berts
    batch = bert_batch()
    plain = sdpa(**batch).logits
    with capture_attention() as record:
        captured = sdpa(**batch).logits
    reference = eager(**batch, output_attentions=True)
    assert (captured - plain).abs().max() <= 1e-6  # SDPA's kernel vs the explicit computation
    assert len(record) == 2
    for got, want in zip(record.maps, reference.attentions):
        assert torch.allclose(got, want, atol=1e-7, rtol=0)


def test_rollouts_on_bert_at_sdpa_equal_eager_references(berts):
    sdpa, eager = berts
    batch = bert_batch()
    target = torch.tensor([2, 0, 1])
    reference = eager(**batch, output_attentions=True)
    maps = list(reference.attentions)
    grads = torch.autograd.grad(reference.logits.gather(1, target[:, None]).sum(), maps)
    rollout = get_method("rollout", sdpa).attribute(batch)
    assert rollout.shape == (3, 9)
    assert torch.allclose(rollout, hand_rollout([m.detach() for m in maps])[:, 0].float(), atol=1e-6)
    assert rollout[1, 6:].abs().max() == 0
    gradient = get_method("gradient_rollout", sdpa).attribute(batch, target=target)
    expected = hand_gradient_rollout([m.detach() for m in maps], grads)[:, 0].float()
    assert torch.allclose(gradient, expected, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in sdpa.parameters())
