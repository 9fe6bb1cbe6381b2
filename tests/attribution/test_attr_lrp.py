"""LRP: hand-computed rules on a toy net, LRP-0 = Gradient x Input, conservation, canonization, Captum's LRP, and
the contracts every method keeps (for LRP, Excitation Backprop, RISE and CGI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution import LRP, GradientXInput, get_method
from lightning_lens.utils.canonize import fold_batchnorm

# ---------------------------------------------------------------------------------------------------------------------
# A toy net with hand-computable relevances: x = (1, 2) -> Linear(2, 2) -> ReLU -> Linear(2, 1)
#   layer 1: w = [[1, -0.5], [2, 1]], b = [0.5, -1]  ->  z1 = [1 - 1 + 0.5, 2 + 2 - 1] = [0.5, 3], a = [0.5, 3]
#   layer 2: w = [[1, 2]], b = 0                      ->  logit = 0.5 + 6 = 6.5
# contributions x_i w_ij: unit 0 gets [1, -1] (+ bias 0.5), unit 1 gets [2, 2] (+ bias -1); top gets [0.5, 6].
# ---------------------------------------------------------------------------------------------------------------------


def toy_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -0.5], [2.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
    return net


X = torch.tensor([[1.0, 2.0]])


def lrp(rule: str, **kwargs) -> torch.Tensor:
    return LRP(toy_net(), rule=rule, **kwargs).attribute(X, target=0)[0]


def test_epsilon_rule_by_hand():
    eps = 0.5
    top = torch.tensor([0.5, 6.0]) * 6.5 / (6.5 + eps)  # R_j = a_j w_j * R / (z + eps), R = z = 6.5
    expected = torch.tensor([1.0, -1.0]) * top[0] / (0.5 + eps) + torch.tensor([2.0, 2.0]) * top[1] / (3.0 + eps)
    torch.testing.assert_close(lrp("epsilon", epsilon=eps), expected)


def test_zplus_rule_by_hand():
    top = torch.tensor([0.5, 6.0])  # both contributions positive: R_j = a_j w_j / 6.5 * 6.5
    # unit 0: positive parts [1, 0] of [1, -1], no bias; unit 1: [2, 2] / 4
    expected = torch.tensor([1.0, 0.0]) * top[0] / 1.0 + torch.tensor([2.0, 2.0]) * top[1] / 4.0
    torch.testing.assert_close(lrp("zplus"), expected)  # = [3.5, 3.0]
    torch.testing.assert_close(expected, torch.tensor([3.5, 3.0]))


def test_gamma_rule_by_hand():
    g = 0.25
    # top: w + g w+ = [1.25, 2.5]: q = [0.625, 7.5], sum 8.125
    top = torch.tensor([0.625, 7.5]) / 8.125 * 6.5
    # unit 0: w' = [1.25, -0.5], b' = 0.5 + 0.125: q = [1.25, -1], z' = 0.875
    # unit 1: w' = [2.5, 1.25], b' = -1 (negative bias not boosted): q = [2.5, 2.5], z' = 4
    expected = torch.tensor([1.25, -1.0]) * top[0] / 0.875 + torch.tensor([2.5, 2.5]) * top[1] / 4.0
    torch.testing.assert_close(lrp("gamma", gamma=g), expected)


def test_alpha_beta_rule_by_hand():
    # alpha=2, beta=1. top: positive q = [0.5, 6] (sum 6.5), no negative q: R = 2 * [0.5, 6]
    top = 2.0 * torch.tensor([0.5, 6.0])
    # unit 0: q+ = [1, 0], den+ = 1 + b+ 0.5 = 1.5; q- = [0, -1], den- = -1 + b- 0 = -1
    unit0 = 2.0 * torch.tensor([1.0, 0.0]) / 1.5 - 1.0 * torch.tensor([0.0, -1.0]) / -1.0
    # unit 1: q+ = [2, 2], den+ = 4 (b+ = 0); q- = [0, 0]: nothing to subtract
    unit1 = 2.0 * torch.tensor([2.0, 2.0]) / 4.0
    expected = unit0 * top[0] + unit1 * top[1]
    torch.testing.assert_close(lrp("alpha_beta", alpha=2.0, beta=1.0), expected)


def test_sign_split_rules_on_signed_inputs_by_hand():
    # one layer w = [-1, 2], x = [-3, -1]: contributions x w = [3, -2], logit 1
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-1.0, 2.0]]))
    x = torch.tensor([[-3.0, -1.0]])
    # z+: only (x w)+ = [3, 0] (the x- w- part), R = [3, 0] / 3 * 1
    torch.testing.assert_close(LRP(net, rule="zplus").attribute(x, target=0)[0], torch.tensor([1.0, 0.0]))
    # alpha 2, beta 1: 2 [3, 0] / 3 - 1 [0, -2] / -2 = [2, -1], summing to the logit
    torch.testing.assert_close(LRP(net, rule="alpha_beta", alpha=2.0, beta=1.0).attribute(x, target=0)[0],
                               torch.tensor([2.0, -1.0]))


def test_zbox_first_layer_by_hand():
    # low = -1, high = 3. unit 0, w = [1, -0.5]: q = x w - low w+ - high w- = [1 + 1, -1 + 1.5] = [2, 0.5], sum 2.5
    # unit 1, w = [2, 1]: q = [2 + 2, 2 + 1] = [4, 3], sum 7. Top layer epsilon with epsilon 0: R = [0.5, 6].
    method = LRP(toy_net(), rule="epsilon", epsilon=0.0, composite={"0": "zbox"}, low=-1.0, high=3.0)
    expected = torch.tensor([2.0, 0.5]) * 0.5 / 2.5 + torch.tensor([4.0, 3.0]) * 6.0 / 7.0
    torch.testing.assert_close(method.attribute(X, target=0)[0], expected)
    # zbox conserves: the relevance of the first layer's outputs sums to 6.5 (no bias in z^B's denominator)
    torch.testing.assert_close(expected.sum(), torch.tensor(6.5))
    # tensor bounds broadcast per feature
    per_feature = LRP(toy_net(), epsilon=0.0, composite={"0": "zbox"}, low=torch.tensor([-1.0, -1.0]),
                      high=torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(per_feature.attribute(X, target=0)[0], expected)


def test_zbox_on_a_flattened_input_and_refused_deeper():
    net = nn.Sequential(nn.Flatten(), toy_net())
    out = LRP(net, epsilon=0.0, composite={"1.0": "zbox"}, low=-1.0, high=3.0).attribute(X.view(1, 1, 2), target=0)
    torch.testing.assert_close(out.view(2), torch.tensor([2.0, 0.5]) * 0.2 + torch.tensor([4.0, 3.0]) * 6.0 / 7.0)
    with pytest.raises(ValueError, match="zbox rule applies only to a layer that takes the model's input"):
        LRP(toy_net(), composite={"2": "zbox"}).attribute(X, target=0)


# ---------------------------------------------------------------------------------------------------------------------
# LRP-0 = Gradient x Input, conservation
# ---------------------------------------------------------------------------------------------------------------------


class PoolNet(nn.Module):
    """Bias-free ReLU CNN with max and average pooling and module, in-place and functional ReLUs."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(24, 8, bias=bias)
        self.fc2 = nn.Linear(8, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.relu1(self.conv1(x)))
        h = self.pool2(self.relu2(self.conv2(h)))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


@pytest.fixture
def pool_net() -> PoolNet:
    torch.manual_seed(0)
    return PoolNet().eval()


def test_lrp0_equals_gradient_x_input_and_conserves_the_logit(pool_net):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0])
    relevance = LRP(pool_net, rule="epsilon", epsilon=0.0).attribute(x, target=target)
    torch.testing.assert_close(relevance, GradientXInput(pool_net).attribute(x, target=target), rtol=1e-6, atol=1e-7)
    logits = pool_net(x).gather(1, target[:, None])[:, 0].detach()
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits, rtol=1e-5, atol=1e-6)


def test_zplus_conserves_the_logit_on_a_bias_free_net(pool_net):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    relevance = LRP(pool_net, rule="zplus").attribute(x, target=1)
    torch.testing.assert_close(relevance.flatten(1).sum(1), pool_net(x)[:, 1].detach(), rtol=1e-4, atol=1e-6)


def test_epsilon_absorbs_relevance_and_a_large_epsilon_shrinks_it(pool_net):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    small = LRP(pool_net, epsilon=1e-6).attribute(x, target=0).flatten(1).sum(1).abs()
    large = LRP(pool_net, epsilon=10.0).attribute(x, target=0).flatten(1).sum(1).abs()
    assert (large < small).all()


# ---------------------------------------------------------------------------------------------------------------------
# Canonization and residual additions
# ---------------------------------------------------------------------------------------------------------------------


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_bn(self.stem(x)))
        h = F.relu(h + self.bn(self.conv(h)), inplace=True)  # residual addition
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.fixture
def resnet() -> ResNetStyle:
    torch.manual_seed(0)
    model = ResNetStyle()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bn in (model.stem_bn, model.bn):
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def test_canonization_keeps_outputs_and_never_touches_the_model(resnet):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    folded, pairs = fold_batchnorm(resnet, x)
    assert pairs == [("stem", "stem_bn"), ("conv", "bn")]
    assert isinstance(folded.bn, nn.Identity) and isinstance(resnet.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), resnet(x), rtol=1e-5, atol=1e-6)
    canonized = LRP(resnet).attribute(x, target=1)
    torch.testing.assert_close(canonized, LRP(folded, canonize=False).attribute(x, target=1))
    assert all(torch.equal(v, state[k]) for k, v in resnet.state_dict().items())
    assert isinstance(resnet.bn, nn.BatchNorm2d)


def test_training_mode_batchnorm_is_not_folded(resnet):
    resnet.bn.train()
    folded, pairs = fold_batchnorm(resnet, torch.rand(1, 1, 8, 8))
    assert pairs == [("stem", "stem_bn")] and isinstance(folded.bn, nn.BatchNorm2d)


def test_residual_additions_split_relevance_in_proportion(resnet):
    # LRP-0 on the canonized model: the residual sum passes relevance in proportion to the summands, which is the
    # gradient x input of the folded (bias-carrying) model; relevance is conserved up to what biases absorb
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    folded, _ = fold_batchnorm(resnet, x)
    lrp0 = LRP(resnet, epsilon=0.0).attribute(x, target=0)
    torch.testing.assert_close(lrp0, GradientXInput(folded).attribute(x, target=0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Captum's LRP
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "zplus"])
def test_equals_captum_lrp_on_a_plain_cnn(rule):
    captum_rules = pytest.importorskip("captum.attr._utils.lrp_rules")
    from captum.attr import LRP as CaptumLRP

    torch.manual_seed(0)
    # Captum keeps the plain bias in the gamma and alpha1-beta0 denominators (we use b + gamma b+ and no bias): compare
    # those rules on a bias-free net; epsilon (identical definitions) with biases.
    model = PoolNet(bias=rule == "epsilon").eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    ours = LRP(model, rule=rule, epsilon=1e-9, gamma=0.25).attribute(x, target=2)
    make = {"epsilon": lambda: captum_rules.EpsilonRule(1e-9), "gamma": lambda: captum_rules.GammaRule(0.25),
            "zplus": captum_rules.Alpha1_Beta0_Rule}[rule]
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        layer.rule = make()
    theirs = CaptumLRP(model).attribute(x.clone().requires_grad_(True), target=2).detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


# ---------------------------------------------------------------------------------------------------------------------
# Composites and options
# ---------------------------------------------------------------------------------------------------------------------


def test_named_composite_equals_its_explicit_mapping(pool_net):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    named = LRP(pool_net, composite="epsilon_gamma_box", low=0.0, high=1.0).attribute(x, target=0)
    explicit = LRP(pool_net, composite={"conv1": "zbox", "conv2": "gamma", nn.Linear: "epsilon"}).attribute(x, target=0)
    by_type_name = LRP(pool_net, composite={"conv1": "zbox", "Conv2d": "gamma"}).attribute(x, target=0)
    torch.testing.assert_close(named, explicit)
    torch.testing.assert_close(named, by_type_name)
    assert not torch.allclose(named, LRP(pool_net).attribute(x, target=0))
    per_layer = LRP(pool_net, composite={"conv2": ("gamma", {"gamma": 0.25}), "conv1": ("zbox", {"low": 0.0})})
    torch.testing.assert_close(per_layer.attribute(x, target=0), named)


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_box", "epsilon_alpha2_beta1"])
def test_other_composites_run_and_differ(pool_net, composite):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    out = LRP(pool_net, composite=composite).attribute(x, target=0)
    assert torch.isfinite(out).all() and not torch.allclose(out, LRP(pool_net).attribute(x, target=0))


def test_registered_by_name_with_options(pool_net):
    method = get_method("lrp", pool_net, rule="gamma", gamma=0.5, composite="epsilon_gamma_box")
    assert method.name == "lrp" and method.default_rule.kind == "gamma" and method.default_rule.gamma == 0.5
    assert type(get_method("layerwise_relevance_propagation", pool_net)) is LRP


def test_bad_options_are_refused(pool_net):
    with pytest.raises(ValueError, match=r"rule must be one of \['epsilon'"):
        LRP(pool_net, rule="z_plus")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        LRP(pool_net, rule="alpha_beta", alpha=2.0, beta=0.5)
    with pytest.raises(ValueError, match="composite key 'conv9' is neither"):
        LRP(pool_net, composite={"conv9": "gamma"})
    with pytest.raises(ValueError, match="composite must be one of"):
        LRP(pool_net, composite="epsilon_gamma")
    with pytest.raises(TypeError, match="composite must be None"):
        LRP(pool_net, composite=3)
    with pytest.raises(TypeError, match="low must be a float or a tensor"):
        LRP(pool_net, low="0")
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        LRP(pool_net, epsilon=-1.0)
    with pytest.raises(ValueError, match="low must be below high"):
        LRP(pool_net, low=1.0, high=0.0)
    with pytest.raises(TypeError, match="unknown rule option"):
        LRP(pool_net, composite={"conv1": ("gamma", {"gama": 0.1})})


def test_a_model_without_layers_warns():
    with pytest.warns(UserWarning, match="no nn.Linear or nn.Conv"):
        LRP(nn.Flatten()).attribute(torch.rand(2, 3), target=0)


# ---------------------------------------------------------------------------------------------------------------------
# Contracts of the new methods (the shared contract tests list the older methods)
# ---------------------------------------------------------------------------------------------------------------------

NEW = {
    "lrp": {},
    "lrp_composite": {"composite": "epsilon_gamma_box", "low": 0.0, "high": 1.0},
    "excitation_backprop": {},
    "contrastive_excitation_backprop": {},
    "rise": {"n_masks": 20, "grid_size": 3},
    "cgi": {},
}


def _make(key: str, model: nn.Module, **extra):
    return get_method("lrp" if key == "lrp_composite" else key, model, **{**NEW[key], **extra})


@pytest.mark.parametrize("key", list(NEW))
def test_contracts_of_the_new_methods(key, tiny_cnn, images):
    method = _make(key, tiny_cnn)
    targets = torch.tensor([0, 2, 1, 1, 0])
    params = list(tiny_cnn.parameters())
    before = images.clone()
    state = torch.get_rng_state()
    out = method.attribute(images, target=targets)
    expected_shape = (5, 1, 8, 8)
    assert out.shape == expected_shape and torch.isfinite(out).all() and not out.requires_grad
    # batch = loop
    looped = torch.cat([method.attribute(images[i : i + 1], target=int(targets[i])) for i in range(5)])
    torch.testing.assert_close(out, looped, rtol=1e-5, atol=1e-6)
    # target None is the prediction
    with torch.no_grad():
        predicted = tiny_cnn.eval()(images).argmax(1)
    torch.testing.assert_close(method.attribute(images), method.attribute(images, target=predicted))
    # inference mode, inputs, grads, RNG, hooks
    with torch.inference_mode():
        inside = method.attribute(images.clone(), target=targets)
    torch.testing.assert_close(inside, out)
    assert torch.equal(images, before) and images.grad is None
    assert all(p.grad is None for p in params)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())
    assert torch.overrides._get_current_function_mode_stack() == []


@pytest.mark.parametrize("key", list(NEW))
def test_new_methods_restore_modes_and_buffers_with_eval_mode_false(key, tiny_cnn, images):
    tiny_cnn.train()
    tiny_cnn.dropout.p = 0.0
    bn = tiny_cnn.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    _make(key, tiny_cnn, eval_mode=False).attribute(images, target=1)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[2])
    assert all(m.training for m in tiny_cnn.modules())
    tiny_cnn.features[1].eval()
    modes = [m.training for m in tiny_cnn.modules()]
    _make(key, tiny_cnn).attribute(images, target=1)
    assert [m.training for m in tiny_cnn.modules()] == modes


@pytest.mark.parametrize("key", ["lrp", "lrp_composite", "contrastive_excitation_backprop"])
@pytest.mark.parametrize("with_batchnorm", [True, False])
def test_nothing_is_left_behind_after_an_exception(key, with_batchnorm, tiny_cnn, images):
    class Exploding(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.model.features(x)
            raise RuntimeError("boom")

    if not with_batchnorm:  # hooks go on the model itself rather than on a canonized copy
        tiny_cnn.features[1] = nn.Identity()
    model = Exploding(tiny_cnn)
    with pytest.raises(RuntimeError, match="boom"):
        _make(key, model).attribute(images, target=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_wrong_input_shape_is_named_also_when_canonizing(resnet):
    from lightning_lens.attribution.base import ModelInputError

    with pytest.raises(ModelInputError, match=r"inputs: the model's forward failed on inputs of shape \(2, 3, 8, 8\)"):
        LRP(resnet).attribute(torch.rand(2, 3, 8, 8), target=0)
