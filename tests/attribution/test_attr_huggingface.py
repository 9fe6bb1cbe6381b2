"""Issue 12, engine: a real HuggingFace ``BertForSequenceClassification`` (tiny config, random weights, no download)
called with dict inputs: layer Integrated Gradients equals Captum's ``LayerIntegratedGradients``."""

from __future__ import annotations

import pytest
import torch

from lightning_lens.attribution import Gradient, IntegratedGradients
from lightning_lens.attribution.layer import reduce_tokens

from _attribution_helpers import bert_batch as batch, tiny_bert

pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("attn", ["eager", None])
@pytest.mark.parametrize("layer", ["bert.embeddings.word_embeddings", "bert.embeddings"])
# not riemann_trapezoid: Captum's trapezoid weights are 1/n (sum (n-1)/n, e.g. 0.125, 0.25, 0.25, 0.125 for n=4); ours
# are 1/(n-1), a proper trapezoid rule, so the two differ by the factor n/(n-1)
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_layer_ig_on_bert_with_dict_inputs_equals_captum(attn, layer, method):
    model, inputs = tiny_bert(attn), batch()
    target = torch.tensor([0, 1, 2])
    ours, delta = IntegratedGradients(model, layer=layer, n_steps=16, method=method).attribute(
        inputs, target=target, return_convergence_delta=True
    )
    module = model.get_submodule(layer)
    lig = captum_attr.LayerIntegratedGradients(
        lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, module
    )
    ids = inputs["input_ids"]
    reference = lig.attribute(ids, baselines=torch.zeros_like(ids), additional_forward_args=(inputs["attention_mask"],),
                              target=target, n_steps=16, method=method)
    assert ours.shape == reference.shape == (3, 9, 32)
    assert relative_error(ours, reference) <= 1e-4
    assert delta.abs().max() < 0.05 * float(ours.sum((1, 2)).abs().max())  # completeness, up to quadrature
    # the token scores derived from them agree too
    assert relative_error(reduce_tokens(ours), reduce_tokens(reference)) <= 1e-4


def test_layer_gradient_of_a_model_output_equals_autograd_on_the_embeddings():
    model, inputs = tiny_bert("eager"), batch()
    got = Gradient(model, layer="bert.embeddings.word_embeddings").attribute(inputs, target=2)
    emb = model.bert.embeddings.word_embeddings(inputs["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"]).logits
    (expected,) = torch.autograd.grad(logits[:, 2].sum(), emb)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_token_ids_without_layer_name_the_word_embeddings():
    model, inputs = tiny_bert("eager"), batch()
    with pytest.raises(TypeError, match=r"layer='bert.embeddings.word_embeddings'"):
        IntegratedGradients(model).attribute(inputs)
