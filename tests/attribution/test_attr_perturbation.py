"""FeatureAblation, KernelSHAP and LIME: exact values on linear models, exact Shapley values by enumeration, agreement
with Captum, shap and scikit-learn, batch = loop, chunked = unchunked, and non-perturbation of the model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_lens.attribution import (
    LIME,
    FeatureAblation,
    KernelSHAP,
    get_method,
    patch_mask,
    superpixel_mask,
)
from lightning_lens.attribution._perturbation import (
    feature_groups,
    lime_coalitions,
    shapley_coalitions,
    shapley_kernel_weight,
    weighted_lasso,
)
from lightning_lens.attribution.lime import lime_kernel

from _attribution_helpers import conv_model_5x5, rows_of_every_forward

METHODS = {
    "feature_ablation": {},
    "kernel_shap": {"n_samples": 40},
    "lime": {"n_samples": 40},
}


def make(name: str, model: nn.Module, **kwargs) -> object:
    return get_method(name, model, **{**METHODS[name], **kwargs})


def mlp(features: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def exact_shapley(model: nn.Module, x: torch.Tensor, target: int, baseline: torch.Tensor) -> torch.Tensor:
    """Shapley values of the game v(S) = f(x on S, baseline elsewhere) by enumerating all 2^M coalitions."""
    M = x.shape[1]
    subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=M)))  # (2^M, M)
    rows = torch.where(subsets.bool()[:, None], x[None], baseline)  # (2^M, B, M)
    with torch.no_grad():
        value = model(rows.reshape(-1, M))[:, target].double().view(len(subsets), -1)
    key = {tuple(s.int().tolist()): i for i, s in enumerate(subsets)}
    phi = torch.zeros(x.shape[0], M, dtype=torch.float64)
    for i, s in enumerate(subsets):
        members = s.int().tolist()
        size = sum(members)
        for j in range(M):
            if members[j]:
                continue
            with_j = list(members)
            with_j[j] = 1
            weight = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            phi[:, j] += weight * (value[key[tuple(with_j)]] - value[i])
    return phi


# ----------------------------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("features, n_samples", [(6, None), (20, None), (20, 300)])
def test_kernel_shap_is_x_times_w_on_a_linear_model(features, n_samples):
    # 6 features: every coalition enumerated; 20 features: 2^20 coalitions, sampled, still exact (the game is linear)
    torch.manual_seed(1)
    model = nn.Linear(features, 4)
    x = torch.randn(3, features)
    targets = torch.tensor([0, 3, 1])
    expected = x * model.weight.detach()[targets]
    shap_values = KernelSHAP(model, n_samples=n_samples).attribute(x, target=targets)
    torch.testing.assert_close(shap_values, expected, atol=1e-5, rtol=1e-4)
    # with a baseline: (x - baseline) * w
    base = torch.randn(features)
    torch.testing.assert_close(KernelSHAP(model, n_samples=n_samples).attribute(x, target=targets, baseline=base),
                               (x - base) * model.weight.detach()[targets], atol=1e-5, rtol=1e-4)


def test_kernel_shap_at_its_defaults_equals_enumerated_shapley_values_on_a_nonlinear_model():
    model = mlp(5)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    base = torch.full((5,), 0.3)
    expected = exact_shapley(model, x, 1, base)
    values = KernelSHAP(model).attribute(x, target=1, baseline=base).double()
    assert (expected.abs().max(dim=1).values > 0.05).all()  # a non-trivial game
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-4)
    # efficiency: the values add up to f(x) - f(baseline)
    with torch.no_grad():
        gap = (model(x)[:, 1] - model(base[None])[:, 1]).double()
    torch.testing.assert_close(values.sum(dim=1), gap, atol=1e-5, rtol=1e-4)


def test_sampled_kernel_shap_is_within_a_few_percent_of_enumerated_shapley_values():
    model = mlp(9, seed=3)
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(4))
    expected = exact_shapley(model, x, 0, torch.zeros(9))
    values = KernelSHAP(model, n_samples=300).attribute(x, target=0).double()  # 2^9 - 2 = 510 coalitions exist
    error = (values - expected).norm(dim=1) / expected.norm(dim=1)
    assert error.max() < 0.05, error


def test_kernel_shap_equals_shap_kernel_explainer_with_every_coalition():
    shap = pytest.importorskip("shap")
    model = mlp(6, seed=5)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    base = torch.randn(1, 6, generator=torch.Generator().manual_seed(7))

    def predict(array):
        with torch.no_grad():
            return model(torch.as_tensor(array, dtype=torch.float32))[:, 2].double().numpy()

    explainer = shap.KernelExplainer(predict, base.numpy())
    reference = torch.as_tensor(explainer.shap_values(x.numpy(), nsamples=2**6, silent=True))
    ours = KernelSHAP(model).attribute(x, target=2, baseline=base).double()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_feature_ablation_of_a_linear_model_is_the_contribution():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    targets = torch.tensor([0, 1, 2, 1])
    w = model.weight.detach()[targets]
    torch.testing.assert_close(FeatureAblation(model).attribute(x, target=targets), x * w)
    torch.testing.assert_close(FeatureAblation(model, baseline=0.5).attribute(x, target=targets), (x - 0.5) * w)
    # groups: every element of a group gets the group's total drop
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    contrib = x * w
    expected = torch.stack([contrib[:, :2].sum(1)] * 2 + [contrib[:, 2:5].sum(1)] * 3 + [contrib[:, 5]], dim=1)
    torch.testing.assert_close(FeatureAblation(model).attribute(x, target=targets, feature_mask=groups), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.001])
def test_lime_recovers_the_ranking_of_a_linear_models_contributions(alpha):
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight[0] = torch.tensor([3.0, -2.0, 1.5, 0.2, -0.7, 1.0, -0.1, 2.5])
    x = torch.tensor([[1.0, 1.2, -0.9, 2.0, 0.4, -1.5, 3.0, 0.6], [0.5, -1.0, 1.2, 1.0, -2.0, 0.8, 1.0, -0.3]])
    contributions = x * model.weight.detach()[0]
    coef = LIME(model, alpha=alpha).attribute(x, target=0)
    assert torch.equal(coef.argsort(dim=1), contributions.argsort(dim=1))
    if alpha == 0:  # the game is exactly linear in the interpretable features: the fit recovers it
        torch.testing.assert_close(coef, contributions, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ reference libraries


def test_feature_ablation_equals_captum_on_images_with_patches_and_per_example_masks(tiny_cnn, images):
    captum = pytest.importorskip("captum.attr")
    targets = torch.tensor([0, 1, 2, 1, 0])
    reference = captum.FeatureAblation(tiny_cnn.eval())
    mask = patch_mask(images.shape[1:], patch_size=3)  # (1, 8, 8): 9 patches, the last ones cut by the border
    ours = FeatureAblation(tiny_cnn).attribute(images, target=targets, feature_mask=mask, baseline=0.25)
    theirs = reference.attribute(images, target=targets, feature_mask=mask[None], baselines=0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # a per-example mask (a different number of groups per image) and the default 4x4 grid
    masks = torch.stack([patch_mask(images.shape[1:], grid=g) for g in (2, 4, 4, 1, 3)])
    ours = FeatureAblation(tiny_cnn).attribute(images, target=targets, feature_mask=masks)
    theirs = torch.cat([reference.attribute(images[i : i + 1], target=int(targets[i]), feature_mask=masks[i : i + 1])
                        for i in range(5)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    default = FeatureAblation(tiny_cnn).attribute(images, target=targets)
    grid = patch_mask(images.shape[1:], grid=4)[None]
    torch.testing.assert_close(default, reference.attribute(images, target=targets, feature_mask=grid),
                               atol=1e-5, rtol=1e-4)


def test_lime_equals_captum_lime_given_the_same_samples_kernel_and_lasso():
    captum = pytest.importorskip("captum.attr")
    pytest.importorskip("sklearn")
    from captum._utils.models.linear_model import SkLearnLasso

    model = mlp(6, seed=8)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(9))
    n, alpha = 60, 0.002
    samples = lime_coalitions(6, n, torch.Generator().manual_seed(0))  # our draw for seed 0 and 6 groups
    queue = list(samples.float())

    def perturb(original, **kwargs):
        return queue.pop(0)[None]

    def similarity(original, perturbed, interpretable, **kwargs):
        return float(lime_kernel(interpretable.double())[0])

    reference = captum.Lime(model, interpretable_model=SkLearnLasso(alpha=alpha), similarity_func=similarity,
                            perturb_func=perturb)
    theirs = reference.attribute(x, target=1, n_samples=n, perturbations_per_eval=7)
    ours = LIME(model, n_samples=n, alpha=alpha, seed=0).attribute(x, target=1)
    assert not queue
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1])
def test_weighted_lasso_equals_scikit_learn(alpha):
    linear_model = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    X = (torch.rand(80, 7, generator=gen) > 0.5).double()
    y = X @ torch.randn(7, 2, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(80, 2, generator=gen,
                                                                                   dtype=torch.float64)
    w = torch.rand(80, generator=gen, dtype=torch.float64)
    coef, intercept = weighted_lasso(X, y, w, alpha)
    for k in range(2):
        if alpha == 0:
            reference = linear_model.LinearRegression()
        else:
            reference = linear_model.Lasso(alpha=alpha, tol=1e-12, max_iter=100_000)
        reference.fit(X.numpy(), y[:, k].numpy(), sample_weight=w.numpy())
        torch.testing.assert_close(coef[:, k], torch.as_tensor(reference.coef_), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(intercept[k], torch.as_tensor(reference.intercept_, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6)


def test_shapley_coalitions_enumerate_or_sample_like_shap():
    z, w = shapley_coalitions(4, 14, torch.Generator().manual_seed(0))
    assert z.shape == (14, 4) and len({tuple(r.tolist()) for r in z}) == 14
    sizes = z.sum(1).long()
    torch.testing.assert_close(w, torch.tensor([shapley_kernel_weight(4, int(s)) for s in sizes], dtype=torch.float64))
    # every coalition of 12 features (a regression: the enumeration used to build a 12 ** size grid and hang)
    z, w = shapley_coalitions(12, 2**12 - 2, torch.Generator().manual_seed(0))
    assert z.shape == (4094, 12) and len({tuple(r.tolist()) for r in z}) == 4094
    # sampled: sizes 1 and 9 (paired) enumerated completely, the rest drawn without repeats, weights sum to 1
    z, w = shapley_coalitions(10, 100, torch.Generator().manual_seed(0))
    assert z.shape == (100, 10) and len({tuple(r.tolist()) for r in z}) == 100
    assert {int(s) for s in z[:20].sum(1)} == {1, 9}
    assert abs(float(w.sum()) - 1.0) < 1e-9 and ((z.sum(1) > 0) & (z.sum(1) < 10)).all()


def test_lime_kernel_and_samples():
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    cosine = 1 - (2 / 4) ** 0.5  # cos(1, z) = sqrt(|z| / M) for binary z
    torch.testing.assert_close(lime_kernel(z), torch.tensor([1.0, math.exp(-(cosine**2) / 0.25**2), math.exp(-16.0)],
                                                            dtype=torch.float64))
    torch.testing.assert_close(lime_kernel(z, kernel_width=2.0, distance="euclidean"),
                               torch.tensor([1.0, math.exp(-2 / 4), math.exp(-4 / 4)], dtype=torch.float64))
    torch.testing.assert_close(lime_kernel(z, distance="euclidean"),  # lime's tabular width 0.75 sqrt(M)
                               torch.tensor([1.0, math.exp(-2 / 2.25), math.exp(-4 / 2.25)], dtype=torch.float64))
    samples = lime_coalitions(6, 2000, torch.Generator().manual_seed(0))
    off = 6 - samples[1:].sum(1)
    assert samples[0].tolist() == [1.0] * 6 and off.min() == 1 and off.max() == 6
    counts = torch.bincount(off.long(), minlength=7)[1:].double()
    assert (counts / counts.sum() - 1 / 6).abs().max() < 0.03  # a uniform number of features switched off


# ---------------------------------------------------------------------------------- properties of the methods


@pytest.mark.parametrize("name", list(METHODS))
def test_a_batch_equals_a_loop_over_its_examples(name, tiny_cnn, images):
    method = make(name, tiny_cnn)
    targets = torch.tensor([2, 0, 1, 1, 0])
    batch = method.attribute(images, target=targets)
    loop = torch.cat([method.attribute(images[i : i + 1], target=int(targets[i])) for i in range(5)])
    torch.testing.assert_close(batch, loop, atol=1e-5, rtol=1e-4)
    assert batch.abs().sum() > 0


@pytest.mark.parametrize("name", list(METHODS))
def test_per_example_masks_with_different_group_counts_equal_a_loop(name, tiny_cnn, images):
    masks = torch.stack([patch_mask(images.shape[1:], grid=g) for g in (2, 2, 3, 2, 4)])
    method = make(name, tiny_cnn)
    batch = method.attribute(images, target=1, feature_mask=masks)
    loop = torch.cat([method.attribute(images[i : i + 1], target=1, feature_mask=masks[i]) for i in range(5)])
    torch.testing.assert_close(batch, loop, atol=1e-5, rtol=1e-4)
    # every element of a patch holds the same value
    for i in range(5):
        for g in masks[i].unique():
            region = batch[i][:, masks[i][0] == g]
            assert torch.equal(region, region.flatten()[0].expand_as(region))


@pytest.mark.parametrize("name", list(METHODS))
def test_chunked_equals_unchunked_and_forwards_stay_within_batch_size(name):
    model = conv_model_5x5()
    x = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    full = make(name, model, batch_size=10_000).attribute(x, target=1)
    for batch_size in (1, 2, 5, 7):
        method = make(name, model, batch_size=batch_size)
        out, rows = rows_of_every_forward(model, lambda: method.attribute(x, target=1))
        torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)
        assert max(rows) <= max(batch_size, 1)


@pytest.mark.parametrize("name", list(METHODS))
def test_default_blocks_stay_within_the_element_budget(name, monkeypatch):
    import lightning_lens.attribution._batching as batching

    monkeypatch.setattr(batching, "DEFAULT_ELEMENT_BUDGET", 4 * 50)  # 4 rows of 2x5x5
    model = conv_model_5x5()
    x = torch.rand(6, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    out, rows = rows_of_every_forward(model, lambda: make(name, model).attribute(x, target=0))
    assert max(rows) <= 4
    torch.testing.assert_close(out, make(name, model, batch_size=64).attribute(x, target=0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["kernel_shap", "lime"])
def test_seeds_make_draws_reproducible(name):
    model = mlp(14, seed=2)  # 14 features: KernelSHAP samples (2^14 - 2 > 40)
    x = torch.randn(2, 14, generator=torch.Generator().manual_seed(3))
    a = make(name, model, seed=1).attribute(x, target=0)
    assert torch.equal(a, make(name, model, seed=1).attribute(x, target=0))
    assert not torch.equal(a, make(name, model, seed=2).attribute(x, target=0))
    assert not torch.equal(a, make(name, model, seed=None).attribute(x, target=0))


@pytest.mark.parametrize("name", list(METHODS))
def test_the_model_inputs_and_global_rng_are_untouched(name, tiny_cnn, images):
    tiny_cnn.train()
    tiny_cnn.features[1].eval()  # a mixed mode that must come back as it was
    modes = [m.training for m in tiny_cnn.modules()]
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    saw_eval = []
    handle = tiny_cnn.register_forward_pre_hook(lambda m, a: saw_eval.append(not m.training))
    images_before, rng = images.clone(), torch.get_rng_state()
    try:
        with torch.inference_mode():
            seed = {} if name == "feature_ablation" else {"seed": None}
            out = make(name, tiny_cnn, **seed).attribute(images, target=0)
    finally:
        handle.remove()
    assert all(saw_eval) and saw_eval
    assert [m.training for m in tiny_cnn.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in tiny_cnn.state_dict().items())
    assert all(p.grad is None for p in tiny_cnn.parameters())
    assert torch.equal(images, images_before) and torch.equal(torch.get_rng_state(), rng)
    assert not out.is_inference() and out.shape == images.shape


@pytest.mark.parametrize("name", list(METHODS))
def test_target_none_is_the_predicted_class(name, tiny_cnn, images):
    method = make(name, tiny_cnn)
    with torch.no_grad():
        predicted = tiny_cnn.eval()(images).argmax(1)
    torch.testing.assert_close(method.attribute(images), method.attribute(images, target=predicted))


# ---------------------------------------------------------------------------------------- masks and messages


def test_patch_mask_and_default_groups():
    assert patch_mask((1, 5, 5), patch_size=2)[0].tolist() == [
        [0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5], [6, 6, 7, 7, 8]]
    assert patch_mask((2, 6), grid=3).tolist() == [[0, 0, 1, 1, 2, 2]]
    assert patch_mask((3, 2, 2), grid=4).unique().numel() == 4  # no more patches than pixels
    index, counts = feature_groups([torch.zeros(2, 3, 32, 32)], None)
    assert counts.tolist() == [16, 16] and index[0].shape == (2, 3, 32, 32)
    assert torch.equal(index[0][:, 0], index[0][:, 2])  # all channels together
    index, counts = feature_groups([torch.zeros(2, 4)], torch.tensor([7, 7, -1, 3]))  # ids renumbered in order
    assert index[0][0].tolist() == [2, 2, 0, 1] and counts.tolist() == [3, 3]


def test_superpixel_masks_give_per_image_groups(tiny_cnn, images):
    pytest.importorskip("skimage")
    masks = superpixel_mask(images, n_segments=6)
    assert masks.shape == (5, 1, 8, 8) and masks.dtype == torch.long
    out = FeatureAblation(tiny_cnn).attribute(images, target=0, feature_mask=masks)
    loop = torch.cat([FeatureAblation(tiny_cnn).attribute(images[i : i + 1], target=0, feature_mask=masks[i])
                      for i in range(5)])
    torch.testing.assert_close(out, loop)


def test_errors_name_the_argument_and_the_fix(tiny_cnn, images):
    with pytest.raises(TypeError, match="feature_mask must hold integer group ids"):
        FeatureAblation(tiny_cnn).attribute(images, feature_mask=torch.zeros(8, 8).long().float()[None, None] + 0.5)
    with pytest.raises(TypeError, match="feature_mask must be None"):
        FeatureAblation(tiny_cnn, feature_mask=[1, 2])
    with pytest.raises(ValueError, match=r"feature_mask of shape \(3, 3\) does not broadcast"):
        FeatureAblation(tiny_cnn).attribute(images, feature_mask=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"baseline of shape \(2,\) does not broadcast"):
        KernelSHAP(tiny_cnn).attribute(images, baseline=torch.zeros(2))
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        KernelSHAP(tiny_cnn, n_samples=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        LIME(tiny_cnn, distance="manhattan")
    with pytest.raises(ValueError, match="kernel_width must be > 0"):
        LIME(tiny_cnn).attribute(images, kernel_width=0.0)
    with pytest.raises(TypeError, match="unknown option"):
        FeatureAblation(tiny_cnn).attribute(images, n_samples=3)
    with pytest.raises(ValueError, match="patch_mask needs examples of shape"):
        patch_mask((10,))


# ------------------------------------------------------------------------------------------- structured inputs


class TwoInputs(nn.Module):
    """The 5-feature MLP called with the features split in two tensors (positional or keyword)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a, b, scale=None):
        out = self.net(torch.cat([a, b], dim=1))
        return out if scale is None else out * scale


@pytest.mark.parametrize("name", list(METHODS))
def test_tuple_and_dict_inputs_equal_the_single_tensor_call(name):
    net = mlp(5, seed=11)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(12))
    single = make(name, net, baseline=0.1).attribute(x, target=2)
    a, b = x[:, :3], x[:, 3:]
    pair = make(name, TwoInputs(net), baseline=0.1).attribute((a, b), target=2)
    named = make(name, TwoInputs(net), baseline={"a": 0.1, "b": 0.1}).attribute({"a": a, "b": b}, target=2)
    assert isinstance(pair, tuple) and isinstance(named, dict) and list(named) == ["a", "b"]
    torch.testing.assert_close(torch.cat(pair, dim=1), single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([named["a"], named["b"]], dim=1), single, atol=1e-6, rtol=1e-5)
    # a group spanning both tensors (the same id in each) equals that group in the single tensor
    mask = torch.tensor([0, 1, 2, 0, 1])
    grouped = make(name, net).attribute(x, target=2, feature_mask=mask)
    split = make(name, TwoInputs(net)).attribute((a, b), target=2, feature_mask=(mask[:3], mask[3:]))
    torch.testing.assert_close(torch.cat(split, dim=1), grouped, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_integer_inputs_ride_along_unchanged_and_forward_kwargs_reach_the_model(name):
    class WithIds(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(13)
            self.embed = nn.Embedding(10, 2)
            self.head = nn.Linear(5, 3)
            self.seen: list[torch.Tensor] = []

        def forward(self, x, ids, scale):
            self.seen.append(ids.clone())
            return self.head(torch.cat([x, self.embed(ids).sum(1)], dim=1)) * scale

    model = WithIds()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(14))
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    scale = torch.tensor([[1.0], [2.0], [-1.0]])
    out = make(name, model, batch_size=4).attribute({"x": x, "ids": ids}, target=0, forward_kwargs={"scale": scale})
    assert out["ids"] is ids
    # every forward saw each example's own ids (rows follow the blocks)
    assert all(((seen[:, 0] - 1) % 2 == 0).all() for seen in model.seen) and len(model.seen) > 1
    # linear in x for fixed ids: FeatureAblation and exact KernelSHAP give scale * x * w
    if name == "feature_ablation":
        torch.testing.assert_close(out["x"], scale * x * model.head.weight.detach()[0, :3], atol=1e-6, rtol=1e-5)


def test_one_score_outputs_and_output_fn():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(3, 4)
    w = model.weight.detach()[0]

    class Squeezed(nn.Module):  # (B,) regression outputs
        def forward(self, inputs):
            return model(inputs).squeeze(1)

    class Named(nn.Module):
        def forward(self, inputs):
            return {"prediction": model(inputs), "hidden": inputs}

    torch.testing.assert_close(KernelSHAP(Squeezed()).attribute(x), x * w, atol=1e-5, rtol=1e-4)
    via_fn = FeatureAblation(Named(), output_fn=lambda out: out["prediction"]).attribute(x)
    torch.testing.assert_close(via_fn, x * w, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="output_fn"):
        FeatureAblation(Named()).attribute(x)


def test_structured_option_errors():
    net = TwoInputs(mlp(5))
    a, b = torch.randn(2, 3), torch.randn(2, 2)
    with pytest.raises(ValueError, match="feature_mask: one tensor for inputs with 2 floating-point tensors"):
        FeatureAblation(net).attribute((a, b), feature_mask=torch.arange(3))
    with pytest.raises(TypeError, match="baseline must be a tuple of 2 entries"):
        FeatureAblation(net).attribute((a, b), baseline=(0.0,))
    with pytest.raises(TypeError, match="a tuple for a single input tensor"):
        FeatureAblation(mlp(5)).attribute(torch.randn(2, 5), feature_mask=(torch.arange(5),))
