"""The randomization engine: no side effects, the right layers per stage, reports, method specs, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_lens.attribution import GradCAM, RandomMap, SmoothGrad
from lightning_lens.sanity import (
    VerdictRule,
    cascading_randomization,
    efficient_mprt,
    histogram_entropy,
    independent_randomization,
    random_logit,
)
from lightning_lens.testing import SmallCNN


class BNNet(nn.Module):
    """Registered out of execution order, with BatchNorm and Dropout (train-mode sensitive)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 4)
        return self.head(self.drop(h.flatten(1)))


def _inputs(n: int = 6, seed: int = 0, side: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def _small_cnn(seed: int = 0) -> SmallCNN:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SmallCNN(width=4)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None and gb is None) or torch.equal(ga, gb), k
    assert a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"]


def test_given_model_bit_identical_and_global_rng_unchanged():
    model = BNNet()
    model.train()
    model(torch.randn(8, 1, 16, 16)).sum().backward()  # BN statistics and .grad as in the middle of training
    model.bn.eval()  # mixed modes must survive too
    x = _inputs(6)
    before = _snapshot(model)
    rng = torch.get_rng_state()
    methods = ["gradient", "guided_backprop", ("smoothgrad", {"n_samples": 3}), "gradcam"]
    cascading_randomization(model, x, None, methods, batchnorm="keep", seed=3)
    cascading_randomization(model, x, "randomized_prediction", methods[:2], batchnorm="reset", seed=3)
    independent_randomization(model, x, torch.tensor([0, 1, 2, 0, 1, 2]), methods, batchnorm="reset", seed=3)
    random_logit(model, x, None, methods)
    efficient_mprt(model, x, None, methods)
    assert torch.equal(rng, torch.get_rng_state())
    _assert_same(before, _snapshot(model))


def _recorder(log: list):
    """A local explain function: records the copy's parameters, returns the input gradient of the target logit."""

    def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log.append({n: p.detach().clone() for n, p in model.named_parameters()})
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad

    return explain


@pytest.mark.parametrize("mode", ["cascading", "independent"])
@pytest.mark.parametrize("order", ["top_down", "bottom_up"])
def test_each_stage_randomizes_exactly_the_right_layers(mode, order):
    model = BNNet()
    with torch.no_grad():  # away from the initial values (BatchNorm starts at weight 1, bias 0), as after training
        for i, p in enumerate(model.parameters()):
            p.add_(0.3 + 0.01 * i)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    log: list = []
    run = cascading_randomization if mode == "cascading" else independent_randomization
    report = run(model, _inputs(4), 0, {"grad": _recorder(log)}, order=order, controls=False)
    execution = [["conv.weight", "conv.bias"], ["bn.weight", "bn.bias"], ["head.weight", "head.bias"]]
    sequence = execution[::-1] if order == "top_down" else execution
    assert report.stage_parameters == sequence
    assert report.stages == [s[0].split(".")[0] for s in sequence]
    assert len(log) == 1 + len(sequence)
    assert all(torch.equal(log[0][n], original[n]) for n in original)  # stage 0 explains the unmodified copy
    for stage in range(1, len(sequence) + 1):
        randomized = {n for s in (sequence[:stage] if mode == "cascading" else [sequence[stage - 1]]) for n in s}
        for name, value in log[stage].items():
            assert torch.equal(value, original[name]) != (name in randomized), (mode, order, stage, name)


def test_report_contents_and_serialization():
    model = _small_cnn()
    x = _inputs(5, side=32)
    labels = torch.tensor([1, 2, 3, 4, 5])
    report = cascading_randomization(model, x, labels, ["gradient", ("smoothgrad", {"n_samples": 4})])
    assert report.methods == ["gradient", "smoothgrad", "edge", "random"]
    assert report.stages == ["classifier.3", "classifier.1", "features.7", "features.5", "features.2", "features.0"]
    assert report.targets.shape == (7, 5) and bool((report.targets == labels).all())
    assert report.predictions.shape == (1, 5)
    grad = report.results["gradient"]
    assert grad.similarity["spearman_signed"].shape == (6, 5)
    assert grad.maps.shape == (7, 5, 32, 32) and grad.signed_maps.shape == (7, 5, 32, 32)
    assert grad.ceiling["spearman_abs"] == 1.0 and not grad.stochastic
    assert report.results["smoothgrad"].stochastic and report.results["smoothgrad"].ceiling["spearman_abs"] < 1.0
    curve = report.curve("gradient", "spearman_signed")
    assert curve.shape == (7,) and curve[0] == 1.0
    assert report.final("gradient", "ssim") == pytest.approx(float(grad.similarity["ssim"][-1].median()))
    columns, rows = report.to_table()
    assert columns[:7] == ["method", "verdict", "metric", "similarity", "floor", "ceiling", "normalized"]
    assert [r[0] for r in rows] == report.methods and {r[1] for r in rows} <= {"passes", "fails", "inconclusive"}
    json.dumps(report.to_dict())
    text = report.summary()
    assert "edge fails" in text and "classifier.3" in text and "floor" in text
    with pytest.raises(KeyError, match="methods"):
        report.curve("occlusion", "ssim")
    randomized = cascading_randomization(model, x, "randomized_prediction", "gradient", controls=False)
    assert randomized.target_mode == "randomized_prediction" and randomized.predictions.shape == (7, 5)
    assert torch.equal(randomized.targets, randomized.predictions)


def test_controls_and_verdicts_on_untrained_model():
    model = _small_cnn()
    report = cascading_randomization(model, _inputs(6, side=32), None,
                                     {"fixed_noise": RandomMap(seed=0), "gradient": "gradient"})
    verdicts = {k: v.outcome for k, v in report.verdicts.items()}
    # model-free maps never change: the edge map and a fixed-seed noise map fail; fresh noise is inconclusive
    assert verdicts["edge"] == "fails" and verdicts["fixed_noise"] == "fails" and verdicts["random"] == "inconclusive"
    assert verdicts["gradient"] == "passes"
    assert report.verdicts["edge"].score == pytest.approx(1.0)


def test_deterministic_per_seed():
    model, x = _small_cnn(), _inputs(4, side=32)
    a = cascading_randomization(model, x, 0, "gradient", seed=1, controls=False)
    b = cascading_randomization(model, x, 0, "gradient", seed=1, controls=False)
    c = cascading_randomization(model, x, 0, "gradient", seed=2, controls=False)
    sa, sb, sc = (r.results["gradient"].similarity["spearman_signed"] for r in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)


def test_method_objects_are_rebound_to_the_copy():
    model = _small_cnn()
    cam = GradCAM(model, layer=model.features[8])  # a module of the original model
    report = cascading_randomization(model, _inputs(4, side=32), 0, {"cam": cam, "sg": SmoothGrad(model, 3)},
                                     controls=False)
    # explaining the original model at every stage would give similarity 1 everywhere
    assert report.final("cam", "ssim") < 0.99 and report.final("sg", "spearman_abs") < 0.99
    assert cam.model is model  # the user's object is untouched
    with pytest.raises(ValueError, match="bound to a model"):
        cascading_randomization(model, _inputs(4, side=32), 0, [GradCAM(_small_cnn(1))])


def test_input_and_argument_errors():
    model, x = _small_cnn(), _inputs(3, side=32)
    with pytest.raises(ValueError, match="target must be"):
        cascading_randomization(model, x, "label", "gradient")
    with pytest.raises(ValueError, match="order must be"):
        cascading_randomization(model, x, None, "gradient", order="sideways")
    with pytest.raises(ValueError, match="batchnorm must be"):
        cascading_randomization(model, x, None, "gradient", batchnorm="freeze")
    with pytest.raises(TypeError, match="floating-point"):
        cascading_randomization(model, x.long(), None, "gradient")
    with pytest.raises(ValueError, match="duplicate"):
        cascading_randomization(model, x, None, ["gradient", "gradient"])
    with pytest.raises(ValueError, match="unknown attribution method"):
        cascading_randomization(model, x, None, ["gradients"])
    with pytest.raises(ValueError, match=r"target class indices must lie in \[0, 9\]"):
        cascading_randomization(model, x, 10, "gradient")
    with pytest.raises(ValueError, match="logits of shape"):
        cascading_randomization(nn.Conv2d(1, 2, 3), x, None, "gradient")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        cascading_randomization(lambda t: t, x, None, "gradient")


def test_works_under_inference_mode_with_inference_inputs():
    model, x = _small_cnn(), _inputs(4, side=32)
    expected = cascading_randomization(model, x, 1, "gradient", controls=False)
    with torch.inference_mode():
        x_inf = x.clone()
        report = cascading_randomization(model, x_inf, 1, "gradient", controls=False)
    torch.testing.assert_close(report.results["gradient"].similarity["spearman_signed"],
                               expected.results["gradient"].similarity["spearman_signed"])


def test_single_example_and_flat_inputs():
    model = _small_cnn()
    one = cascading_randomization(model, _inputs(1, side=32), 0, "gradient", controls=False)
    verdict = one.verdicts["gradient"]
    assert verdict.outcome == "inconclusive" and "at least 2 examples" in verdict.reason
    mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    flat = cascading_randomization(mlp, torch.randn(5, 10, generator=torch.Generator().manual_seed(0)), 0,
                                   "gradient")
    assert flat.methods == ["gradient", "random"]  # no edge map for non-image inputs
    assert flat.results["gradient"].metrics == ("spearman_abs", "spearman_signed", "topk")


def test_verdict_rule_hand_computed():
    rule = VerdictRule(metric="spearman_signed", stages=0.5, fail_above=0.5, pass_below=0.25, min_gap=0.1)
    # 4 stages -> the first 2 are averaged: medians 0.8 and 0.6 -> 0.7; floor 0.2, ceiling 1 -> (0.7-0.2)/0.8
    sims = torch.tensor([[0.7, 0.8, 0.9], [0.5, 0.6, 0.7], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    v = rule.decide("m", sims, floor=0.2, ceiling=1.0)
    assert v.outcome == "fails" and v.score == pytest.approx(0.625) and v.similarity == pytest.approx(0.7)
    assert rule.decide("m", sims * 0.2, floor=0.2, ceiling=1.0).outcome == "passes"  # (0.14-0.2)/0.8 < 0.25
    assert rule.decide("m", sims * 0.5, floor=0.0, ceiling=1.0).outcome == "inconclusive"  # 0.35
    assert rule.decide("m", sims, floor=0.0, ceiling=0.05).outcome == "fails"  # gap < min_gap, 0.7 >= 0.15
    assert rule.decide("m", sims * 0.0, floor=0.0, ceiling=0.05).outcome == "inconclusive"
    assert "floor 0.200" in str(v) and "normalized 0.625" in str(v)
    with pytest.raises(ValueError, match="pass_below"):
        VerdictRule(pass_below=0.6, fail_above=0.5)
    with pytest.raises(ValueError, match="metric"):
        VerdictRule(metric="pearson")


def test_histogram_entropy_matches_numpy_and_scipy():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    maps[1] = maps[1] ** 3
    ours = histogram_entropy(maps, n_bins=20)
    ref = [stats.entropy(np.histogram(maps[i].flatten().numpy(), bins=20)[0]) for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    assert histogram_entropy(torch.ones(1, 10), n_bins=5).item() == 0.0


def test_efficient_mprt_and_random_logit_on_untrained_model():
    model, x = _small_cnn(), _inputs(6, side=32)
    emprt = efficient_mprt(model, x, None, ["gradient", "edge"])
    assert emprt.score("edge") == 0.0 and emprt.verdicts()["edge"] == "fails"
    assert emprt.layers[0] == "features.0"  # bottom-up
    assert emprt.model_entropy_original.shape == (6,)
    assert "eMPRT" in emprt.summary()
    json.dumps(emprt.to_dict())
    logit = random_logit(model, x, torch.tensor([0, 1, 2, 3, 4, 5]), ["gradient", "edge"], seed=1)
    assert bool((logit.other_targets != logit.targets).all())
    assert logit.verdicts["edge"].outcome == "fails"
    assert logit.similarity["gradient"]["ssim"].shape == (6,)
    json.dumps(logit.to_dict())
    assert "Random-logit" in logit.summary() and not math.isnan(logit.floor["gradient"]["spearman_abs"])


# ------------------------------------------------------------------------------------- the fast path and its reference
class TinyConvNet(nn.Module):
    """Two convolutions (BatchNorm, max-pooling) and a head: the layers the channels-last copy speeds up."""

    def __init__(self, flatten_with_view: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6 * 3 * 3, 4)
        self.flatten_with_view = flatten_with_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        # ``.view`` needs the default layout: a channels-last feature map cannot be viewed as (B, -1)
        return self.head(h.view(h.shape[0], -1) if self.flatten_with_view else h.flatten(1))


def _tiny_net(flatten_with_view: bool = False) -> TinyConvNet:
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = TinyConvNet(flatten_with_view)
        model.train()
        model(torch.randn(16, 3, 12, 12))  # trained BatchNorm statistics
    return model.eval()


def _plain_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(x).gather(1, target.view(-1, 1)).sum(), x)
    return grad


def _straightforward_cascade(model: nn.Module, x: torch.Tensor, target: torch.Tensor, order: str,
                             seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each stage from scratch: a fresh deep copy (default layout) whose first ``s`` layers are re-drawn one after
    another from a fresh generator, a plain autograd gradient, scipy's Spearman of |a| and of a, example by example."""
    import copy

    from lightning_lens.sanity import find_layers, reinitialize_

    def spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        return [stats.spearmanr(u.ravel(), v.ravel())[0] for u, v in zip(a.numpy(), b.numpy())]

    original = _plain_gradient(model, x, target).sum(dim=1)  # one-channel aggregation: sum |a_c| / sum a_c
    original_abs = _plain_gradient(model, x, target).abs().sum(dim=1)
    names, abs_rows, signed_rows = [], [], []
    num_layers = len(find_layers(model, x)[0])
    for stage in range(1, num_layers + 1):
        fresh = copy.deepcopy(model)
        layers = find_layers(fresh, x)[0]
        sequence = layers[::-1] if order == "top_down" else layers
        generator = torch.Generator().manual_seed(seed)
        for layer in sequence[:stage]:
            reinitialize_(layer, generator)
        names.append(sequence[stage - 1].name)
        maps = _plain_gradient(fresh, x, target)
        abs_rows.append(spearman(original_abs, maps.abs().sum(dim=1)))
        signed_rows.append(spearman(original, maps.sum(dim=1)))
    return names, np.array(abs_rows), np.array(signed_rows)


@pytest.mark.parametrize("order", ["top_down", "bottom_up"])
@pytest.mark.parametrize("fast_layout", [False, True])
def test_cascade_equals_a_stage_by_stage_reference(order, fast_layout, monkeypatch):
    # the cascade re-initializes one copy cumulatively in place (and, on CPU, runs it channels-last); a fresh copy
    # per stage with the same draws, in the default layout, must give the same similarities
    from lightning_lens.sanity import MapSimilarity, layers

    monkeypatch.setattr(layers, "FAST_LAYOUT", fast_layout)
    model = _tiny_net()
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3, 0])
    report = cascading_randomization(
        model, x, target, {"grad": _plain_gradient}, order=order, seed=7, controls=False,
        similarity=MapSimilarity(["spearman_abs", "spearman_signed"], clip_percentile=None),
    )
    names, expected_abs, expected_signed = _straightforward_cascade(model, x, target, order, seed=7)
    assert report.stages == names
    tolerance = 1e-4 if fast_layout else 1e-6  # other kernels round differently (reports hold float32)
    result = report.results["grad"]
    np.testing.assert_allclose(result.similarity["spearman_abs"].numpy(), expected_abs, atol=tolerance, rtol=0)
    np.testing.assert_allclose(result.similarity["spearman_signed"].numpy(), expected_signed, atol=tolerance, rtol=0)


def test_fast_layout_only_changes_rounding_and_falls_back_for_view(monkeypatch):
    from lightning_lens.sanity import layers

    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    layouts: list = []

    def layout_probe(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        layouts.append(model.conv2.weight.is_contiguous(memory_format=torch.channels_last))
        return _plain_gradient(model, inputs, target)

    reports = {}
    for view in (False, True):
        model = _tiny_net(flatten_with_view=view)
        for fast in (False, True):
            monkeypatch.setattr(layers, "FAST_LAYOUT", fast)
            layouts.clear()
            methods = {"gradient": "gradient", "guided_backprop": "guided_backprop", "gradcam": "gradcam",
                       "smoothgrad": ("smoothgrad", {"n_samples": 3}), "probe": layout_probe}
            reports[view, fast] = cascading_randomization(model, x, None, methods, controls=False, seed=1)
            # the copy ran channels-last unless disabled or the model's forward cannot (``.view``: fell back)
            assert set(layouts) == {fast and not view}
        assert model.conv2.weight.is_contiguous()  # the given model keeps its layout
    for view in (False, True):
        slow, fast = reports[view, False], reports[view, True]
        assert torch.equal(slow.targets, fast.targets) and torch.equal(slow.predictions, fast.predictions)
        for name, result in slow.results.items():
            other = fast.results[name]
            assert result.verdict.outcome == other.verdict.outcome, name
            for metric, value in result.similarity.items():
                atol = 0 if view else 1e-4  # the fallback is the default layout: bit-identical
                torch.testing.assert_close(other.similarity[metric], value, atol=atol, rtol=0, equal_nan=True,
                                           msg=f"{name} {metric}")
            torch.testing.assert_close(other.maps, result.maps, atol=0 if view else 1e-5, rtol=0)
