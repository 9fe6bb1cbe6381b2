"""Issue 12, engine: layer attribution (``layer=``) on Gradient, GradientXInput, SmoothGrad/VarGrad and Integrated
Gradients, checked against hand computations on an embedding + linear head, chunked = unchunked, hooks removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import (
    Gradient,
    GradientXInput,
    IntegratedGradients,
    SmoothGrad,
    VarGrad,
    get_method,
)
from lightning_lens.attribution.layer import reduce_tokens

V, N, D, C = 12, 5, 4, 3


class EmbedLinear(nn.Module):
    """Token ids -> embeddings (B, N, D) -> a linear head on the flattened embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(N * D, C)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids).flatten(1))


class EmbedMLP(nn.Module):
    """A nonlinear text model with a mask: masked mean of tanh(embeddings W) -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(input_ids))) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def ids_and_mask(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (batch, N), generator=gen)
    mask = torch.ones(batch, N, dtype=torch.long)
    mask[1, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("layer", ["embed", "module"])
def test_layer_gradient_of_a_linear_head_is_the_head_weights(layer):
    model = EmbedLinear()
    spec = model.embed if layer == "module" else "embed"
    ids, _ = ids_and_mask()
    target = torch.tensor([0, 2, 1, 2])
    w = model.head.weight.detach().view(C, N, D)
    grads = Gradient(model, layer=spec).attribute(ids, target=target)
    torch.testing.assert_close(grads, w[target])
    gxi = GradientXInput(model, layer=spec).attribute(ids, target=target)
    torch.testing.assert_close(gxi, model.embed(ids).detach() * w[target])
    # SmoothGrad on a linear head: every noisy sample has the same gradient; VarGrad is zero
    torch.testing.assert_close(SmoothGrad(model, layer=spec, n_samples=4).attribute(ids, target=target), w[target])
    assert VarGrad(model, layer=spec, n_samples=4).attribute(ids, target=target).abs().max() < 1e-6


def test_layer_ig_of_a_linear_head_is_embedding_difference_times_weights():
    model = EmbedLinear()
    ids, _ = ids_and_mask()
    w = model.head.weight.detach().view(C, N, D)
    emb = model.embed.weight.detach()
    attr, delta = IntegratedGradients(model, layer="embed", n_steps=3).attribute(
        ids, target=1, return_convergence_delta=True
    )
    torch.testing.assert_close(attr, (emb[ids] - emb[0]) * w[1])  # baseline: token id 0
    assert delta.abs().max() < 1e-5
    other = IntegratedGradients(model, layer="embed", n_steps=3).attribute(ids, target=1, baseline=7)
    torch.testing.assert_close(other, (emb[ids] - emb[7]) * w[1])
    # a float input and its layer: the layer's output of a float model (first linear of an MLP)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    got = IntegratedGradients(mlp, layer="0", n_steps=2).attribute(x, target=0)
    h, h0 = mlp[0](x).detach(), mlp[0](torch.zeros(2, 3)).detach()
    torch.testing.assert_close(got, (h - h0) * mlp[1].weight[0].detach())


def test_layer_ig_completeness_and_the_mask_is_not_baselined_in_forward_kwargs():
    model = EmbedMLP()
    ids, mask = ids_and_mask()
    ig = IntegratedGradients(model, layer="embed", n_steps=64)
    attr, delta = ig.attribute(ids, target=0, forward_kwargs={"attention_mask": mask}, return_convergence_delta=True)
    assert attr.shape == (4, N, D) and delta.abs().max() < 1e-4
    # masked tokens do not reach the output: no attribution
    assert attr[1, 3:].abs().max() == 0
    # the same inputs as a dict: the mask is zero in the default baseline, but the embedding output does not
    # depend on it, so the attributions are the same
    as_dict = ig.attribute({"input_ids": ids, "attention_mask": mask}, target=0)
    torch.testing.assert_close(as_dict, attr)


@pytest.mark.parametrize("cls,kw", [(SmoothGrad, {"n_samples": 5}), (VarGrad, {"n_samples": 4}),
                                    (IntegratedGradients, {"n_steps": 6}), (Gradient, {})])
def test_layer_methods_chunked_equal_unchunked_with_dict_inputs(cls, kw):
    model = EmbedMLP()
    ids, mask = ids_and_mask(5)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if cls is Gradient:  # one forward: the batch = a loop over examples
        ref = cls(model, layer="embed").attribute(inputs)
        loop = torch.cat([cls(model, layer="embed").attribute({"input_ids": ids[i : i + 1],
                                                               "attention_mask": mask[i : i + 1]}) for i in range(5)])
        torch.testing.assert_close(ref, loop)
        return
    ref = cls(model, layer="embed", batch_size=10_000, **kw).attribute(inputs)
    assert ref.shape == (5, N, D) and ref.abs().max() > 0
    for batch_size in (1, 2, 5, 7):
        got = cls(model, layer="embed", batch_size=batch_size, **kw).attribute(inputs)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_layer_smoothgrad_adds_noise_at_the_layer_output():
    """With noise on the embeddings the map differs from the plain layer gradient of a nonlinear model, is seeded,
    and noise_level=0 gives the layer gradient exactly."""
    model = EmbedMLP()
    ids, mask = ids_and_mask()
    kw = {"forward_kwargs": {"attention_mask": mask}, "target": 1}
    plain = Gradient(model, layer="embed").attribute(ids, **kw)
    torch.testing.assert_close(SmoothGrad(model, layer="embed", n_samples=3, noise_level=0.0).attribute(ids, **kw),
                               plain)
    noisy = SmoothGrad(model, layer="embed", n_samples=3, noise_level=0.5, seed=1)
    a, b = noisy.attribute(ids, **kw), noisy.attribute(ids, **kw)
    torch.testing.assert_close(a, b)
    assert (a - plain).abs().max() > 1e-4


def test_layer_hooks_removed_modes_restored_and_inference_mode():
    model = EmbedMLP().train()
    ids, mask = ids_and_mask()
    with torch.inference_mode():
        out = IntegratedGradients(model, layer=model.embed, n_steps=4).attribute(
            {"input_ids": ids.clone(), "attention_mask": mask.clone()}, target=0)
    assert out.shape == (4, N, D) and not out.is_inference()
    assert model.training and not model.embed._forward_hooks
    assert all(p.grad is None for p in model.parameters())

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    model.mix.register_forward_hook(broken)
    with pytest.raises(RuntimeError, match="boom"):
        Gradient(model, layer="embed").attribute(ids, forward_kwargs={"attention_mask": mask})
    assert not model.embed._forward_hooks and model.training


def test_layer_errors():
    model = EmbedMLP()
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match=r"layer='embd' is not a module of the model.*'embed'"):
        Gradient(model, layer="embd")
    with pytest.raises(ValueError, match="not a submodule"):
        Gradient(model, layer=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layer must be"):
        Gradient(model, layer=3)  # type: ignore[arg-type]

    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="runs more than once"):
        Gradient(Reused(), layer="lin").attribute(torch.randn(2, 3))

    class Tupled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0][:, -1]

    with pytest.raises(TypeError, match="returns tuple"):
        Gradient(Tupled(), layer="rnn").attribute(torch.randn(2, 4, 3))
    unused = Reused()
    unused.spare = nn.Linear(3, 3)
    unused.forward = lambda x: unused.lin(x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="did not run"):
        IntegratedGradients(unused, layer="spare").attribute(torch.randn(2, 3))
    assert not any(m._forward_hooks for m in (model.embed, unused.spare))


def test_reduce_tokens_sums_or_takes_the_norm_over_hidden():
    model = EmbedLinear()
    ids, _ = ids_and_mask()
    attr = IntegratedGradients(model, layer="embed", n_steps=2).attribute(ids, target=0)
    torch.testing.assert_close(reduce_tokens(attr), attr.sum(-1))
    torch.testing.assert_close(reduce_tokens(attr, how="l2"), attr.pow(2).sum(-1).sqrt())
    with pytest.raises(ValueError, match="how"):
        reduce_tokens(attr, how="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens, hidden"):
        reduce_tokens(attr.sum(-1))


def test_layer_through_the_registry():
    model = EmbedLinear()
    ids, _ = ids_and_mask()
    got = get_method("smoothgrad", model, layer="embed", n_samples=2).attribute(ids, target=0)
    torch.testing.assert_close(got, model.head.weight.detach().view(C, N, D)[0].expand(4, N, D))
