"""Layer discovery (execution order, MHA, bare parameters, named blocks) and re-initialization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_lens.sanity import find_layers, reinitialize_
from lightning_lens.sanity.layers import ROOT


class OutOfOrder(nn.Module):
    """Registers the head first and the stem last; runs stem -> body -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.stem = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class Attention(nn.Module):
    """A ViT-like toy: a bare positional embedding on the root, MHA, a LayerNorm, a head and an unused module."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))
        self.embed = nn.Linear(2, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))


class Scaled(nn.Module):
    """A custom module with a bare parameter and no reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def _trained(model: nn.Module) -> nn.Module:
    """Move every parameter away from its init (deterministically), as training would."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.37 + 0.01 * i)
    return model


def test_execution_order_not_registration_order():
    model = OutOfOrder()
    layers, skipped = find_layers(model, torch.zeros(2, 1, 6, 6))
    assert [layer.name for layer in layers] == ["stem", "body.0", "head"]
    assert skipped == []
    assert [n for n, _ in layers[1].parameters] == ["body.0.weight", "body.0.bias"]


def test_mha_root_parameters_and_unused_modules():
    model = Attention()
    layers, skipped = find_layers(model, torch.zeros(2, 4, 2))
    names = [layer.name for layer in layers]
    assert names == [ROOT, "embed", "attn", "norm", "head"]
    attn = layers[names.index("attn")]
    # out_proj never runs as a module (its weight is used functionally): it belongs to the attention layer
    assert sorted(n for n, _ in attn.parameters) == [
        "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight"]
    assert [n for n, _ in layers[0].parameters] == ["pos"]
    assert skipped == ["unused"]
    # every parameter that can affect the output is in exactly one layer
    in_layers = [n for layer in layers for n, _ in layer.parameters]
    assert sorted(in_layers) == sorted(n for n, _ in model.named_parameters() if not n.startswith("unused"))


def test_reinitialize_changes_every_parameter_of_the_layer_and_nothing_else():
    model = _trained(Attention())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers, _ = find_layers(model, torch.zeros(2, 4, 2))
    attn = next(layer for layer in layers if layer.name == "attn")
    rng = torch.get_rng_state()
    reinitialize_(attn, torch.Generator().manual_seed(0))
    assert torch.equal(rng, torch.get_rng_state())  # reset_parameters ran inside a forked, seeded global RNG
    assert attn.fallback == []  # MHA's _reset_parameters and out_proj.reset_parameters cover everything
    randomized = {n for n, _ in attn.parameters}
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in randomized), name
    # MHA's init: xavier-uniform in-projection, zero biases
    assert model.attn.in_proj_bias.abs().sum().item() == 0.0
    bound = (6 / (8 + 24)) ** 0.5
    assert model.attn.in_proj_weight.abs().max().item() <= bound


def test_bare_parameters_get_the_documented_fallback():
    model = _trained(Scaled())
    trained_scale = model.scale.detach().clone()
    layers, _ = find_layers(nn.Sequential(model), torch.zeros(2, 3))
    # the module owning the bare parameter starts running before its child: it comes first
    assert [(layer.name, [n for n, _ in layer.parameters]) for layer in layers] == [
        ("0", ["0.scale"]), ("0.lin", ["0.lin.weight", "0.lin.bias"])]
    layer = layers[0]
    reinitialize_(layer, torch.Generator().manual_seed(0))
    assert layer.fallback == ["0.scale"]
    assert not torch.equal(model.scale, trained_scale)
    # N(0, rms^2) with the rms of the trained values, drawn from the private generator
    rms = trained_scale.square().mean().sqrt()
    expected = _after_one_seed_draw(0) * rms
    torch.testing.assert_close(model.scale.detach(), expected)
    custom = []
    reinitialize_(layer, torch.Generator().manual_seed(1), init_fn=lambda n, p, g: custom.append(n) or p.zero_())
    assert custom == ["0.scale"] and model.scale.abs().sum().item() == 0.0


def _after_one_seed_draw(seed: int) -> torch.Tensor:
    """The private generator's state after reinitialize_ drew one module seed, then the fallback's normal draw."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(0, 2**62, (1,), generator=gen)
    return torch.randn(3, generator=gen)


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_batchnorm_policy(policy):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1)
    _trained(model)
    model.eval()
    mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    layers, _ = find_layers(model, torch.zeros(2, 1, 6, 6))
    bn = next(layer for layer in layers if layer.name == "1")
    reinitialize_(bn, torch.Generator().manual_seed(0), batchnorm=policy)
    assert torch.equal(model[1].weight, torch.ones(3)) and torch.equal(model[1].bias, torch.zeros(3))
    if policy == "keep":
        assert torch.equal(model[1].running_mean, mean) and torch.equal(model[1].running_var, var)
    else:
        assert torch.equal(model[1].running_mean, torch.zeros(3)) and torch.equal(model[1].running_var, torch.ones(3))
    with pytest.raises(ValueError, match="batchnorm must be"):
        reinitialize_(bn, torch.Generator(), batchnorm="drop")


def test_named_blocks_are_ordered_by_execution_and_must_not_overlap():
    model = OutOfOrder()
    layers, _ = find_layers(model, torch.zeros(2, 1, 6, 6), layers=["head", "body", "stem"])
    assert [layer.name for layer in layers] == ["stem", "body", "head"]
    assert [n for n, _ in layers[1].parameters] == ["body.0.weight", "body.0.bias"]
    with pytest.raises(ValueError, match="overlap"):
        find_layers(model, torch.zeros(2, 1, 6, 6), layers=["body", "body.0"])
    with pytest.raises(ValueError, match="layers='bdy' is not a module"):
        find_layers(model, torch.zeros(2, 1, 6, 6), layers=["bdy"])
    with pytest.raises(ValueError, match="no parameters"):
        find_layers(model, torch.zeros(2, 1, 6, 6), layers=["body.1"])


def test_reinitialization_is_deterministic_per_seed():
    a = _trained(OutOfOrder())
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        for layer in find_layers(model, torch.zeros(1, 1, 6, 6))[0]:
            reinitialize_(layer, torch.Generator().manual_seed(seed))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_each_module_draws_from_its_own_seed_and_the_global_rng_is_untouched():
    # the values re-drawn are pinned: module by module, a seed from the private generator, reset_parameters under
    # torch's global RNG seeded with it (forked); a custom init_fn drawing from the global RNG leaves it alone too
    model = _trained(OutOfOrder())
    expected = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    reference = torch.Generator().manual_seed(3)
    layers = find_layers(model, torch.zeros(1, 1, 6, 6))[0]
    expected_layers = find_layers(expected, torch.zeros(1, 1, 6, 6))[0]
    rng = torch.get_rng_state()
    for layer, twin in zip(layers, expected_layers):
        reinitialize_(layer, generator, init_fn=lambda name, p, g: p.normal_())
        for _, module in twin.modules:
            seed = int(torch.randint(0, 2**62, (1,), generator=reference))
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                module.reset_parameters()
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters()))
    # a parameter no reset covers goes to init_fn, whose global-RNG draws stay inside the fork as well
    scaled = _trained(Scaled())
    rng = torch.get_rng_state()
    fallback = []
    for layer in find_layers(scaled, torch.zeros(2, 3))[0]:
        reinitialize_(layer, torch.Generator().manual_seed(0), init_fn=lambda name, p, g: p.normal_())
        fallback += layer.fallback
    assert fallback == ["scale"]
    assert torch.equal(rng, torch.get_rng_state())
