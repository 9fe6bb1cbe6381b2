"""compute_quality: the exact keys the callbacks log, values equal to the underlying metrics, clear errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_lens.attribution import Gradient
from lightning_lens.evaluation import (
    QUALITY_METRICS,
    available_quality_metrics,
    compute_quality,
    deletion_curve,
    insertion_curve,
    max_sensitivity,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)


def _setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.rand(4, 1, 8, 8, generator=g)
    targets = torch.tensor([0, 1, 2, 1])
    square = torch.zeros(4, 1, 8, 8)
    square[:, :, :3, :3] = 1
    digit = torch.zeros(4, 1, 8, 8)
    digit[:, :, 3:, 3:] = 1
    digit[2] = 0  # one empty mask: excluded from that region's mean
    return model, x, targets, {"square": square, "digit": digit}


def test_keys_and_values_match_the_metric_functions():
    model, x, targets, masks = _setup()
    method = Gradient(model)
    maps = method.attribute(x, target=targets)
    out = compute_quality(model, method, x, maps, targets, masks, list(QUALITY_METRICS),
                          options={"deletion": {"n_steps": 8}, "insertion": {"n_steps": 8},
                                   "max_sensitivity": {"n_samples": 3}})
    expected_keys = ["deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random"]
    for metric in ("pointing_game", "relevance_mass", "relevance_rank"):
        expected_keys += [f"{metric}/square", f"{metric}/square_chance", f"{metric}/digit", f"{metric}/digit_chance"]
    expected_keys.append("max_sensitivity")
    assert list(out) == expected_keys
    assert all(isinstance(v, float) for v in out.values())

    d = deletion_curve(model, x, maps, targets, n_steps=8)
    i = insertion_curve(model, x, maps, targets, n_steps=8)
    assert out["deletion_auc"] == pytest.approx(d.mean_auc)
    assert out["deletion_auc_random"] == pytest.approx(d.mean_random_auc)
    assert out["insertion_auc"] == pytest.approx(i.mean_auc)
    assert out["insertion_auc_random"] == pytest.approx(i.mean_random_auc)
    for name, fn in (("pointing_game", pointing_game), ("relevance_mass", relevance_mass_accuracy),
                     ("relevance_rank", relevance_rank_accuracy)):
        for region, mask in masks.items():
            r = fn(maps, mask)
            assert out[f"{name}/{region}"] == pytest.approx(r.value)
            assert out[f"{name}/{region}_chance"] == pytest.approx(r.chance_level)
    assert out["relevance_mass/square_chance"] == pytest.approx(9 / 64)
    assert out["relevance_mass/digit_chance"] == pytest.approx(25 / 64)  # mean over the three non-empty masks
    s = max_sensitivity(method, x, targets, attributions=maps, n_samples=3, batch_size=64)
    assert out["max_sensitivity"] == pytest.approx(s.value)


def test_only_what_was_asked_and_attributions_computed_when_missing():
    model, x, targets, masks = _setup()
    method = Gradient(model)
    out = compute_quality(model, method, x, None, targets, {"square": masks["square"]}, ["relevance_mass"])
    assert list(out) == ["relevance_mass/square", "relevance_mass/square_chance"]
    assert out["relevance_mass/square"] == pytest.approx(
        relevance_mass_accuracy(method.attribute(x, target=targets), masks["square"]).value
    )
    out = compute_quality(model, "gradient", x, None, targets, None, ["deletion_auc"])
    assert list(out) == ["deletion_auc"]


def test_region_without_any_mask_yields_no_keys_and_a_warning():
    model, x, targets, masks = _setup()
    masks["square"] = torch.zeros_like(masks["square"])
    with pytest.warns(RuntimeWarning, match="no example could be scored"):
        out = compute_quality(model, Gradient(model), x, None, targets, masks, ["pointing_game"])
    assert list(out) == ["pointing_game/digit", "pointing_game/digit_chance"]


def test_options_reach_the_metrics():
    model, x, targets, masks = _setup()
    maps = Gradient(model).attribute(x, target=targets)
    out = compute_quality(model, None, x, maps, targets, masks, ["pointing_game"],
                          options={"pointing_game": {"tolerance": 3}})
    assert out["pointing_game/square_chance"] == pytest.approx(pointing_game(maps, masks["square"], tolerance=3)
                                                               .chance_level)
    assert out["pointing_game/square_chance"] > 9 / 64


def test_available_metrics_and_errors():
    assert available_quality_metrics() == list(QUALITY_METRICS)
    model, x, targets, masks = _setup()
    maps = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown name"):
        compute_quality(model, None, x, maps, targets, masks, ["faithfulness"])
    with pytest.raises(ValueError, match="need ground-truth masks"):
        compute_quality(model, None, x, maps, targets, None, ["relevance_mass"])
    with pytest.raises(ValueError, match="need ground-truth masks"):
        compute_quality(model, None, x, maps, targets, {}, ["pointing_game"])
    with pytest.raises(TypeError, match="metrics must be a sequence"):
        compute_quality(model, None, x, maps, targets, masks, "relevance_mass")
    with pytest.raises(ValueError, match="options: unknown key"):
        compute_quality(model, None, x, maps, targets, masks, ["relevance_mass"], options={"mass": {}})
    with pytest.raises(ValueError, match="recomputes explanations"):
        compute_quality(model, None, x, maps, targets, masks, ["max_sensitivity"])
    with pytest.raises(ValueError, match="pass attributions"):
        compute_quality(model, None, x, None, targets, masks, ["relevance_mass"])
    with pytest.raises(TypeError, match=r"explain functions take \(model, inputs, target\)"):
        compute_quality(model, lambda inputs, target: inputs, x, None, targets, masks, ["relevance_mass"])


def test_every_method_spec_form_gives_the_same_values():
    # one resolution path (the registry's): a name, a class, an object and an explain function are the same method
    model, x, targets, masks = _setup()

    def gradient(model, inputs, target):
        return Gradient(model).attribute(inputs, target=target)

    metrics = ["relevance_mass", "max_sensitivity"]
    expected = compute_quality(model, Gradient(model), x, None, targets, masks, metrics)
    for spec in ("gradient", "saliency", Gradient, gradient):
        assert compute_quality(model, spec, x, None, targets, masks, metrics) == expected


def test_global_rng_modes_and_grads_untouched_under_inference_mode():
    model, x, targets, masks = _setup()
    model.train()
    state = torch.get_rng_state()
    with torch.inference_mode():
        out = compute_quality(model, Gradient(model), x, None, targets, masks, list(QUALITY_METRICS),
                              options={"deletion": {"n_steps": 4}, "insertion": {"n_steps": 4},
                                       "max_sensitivity": {"n_samples": 2}})
    assert all(not math.isnan(v) for v in out.values())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_evaluation_does_not_import_lightning():
    code = (
        "import sys, lightning_lens.evaluation\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", ["faithfulness", "localization", "robustness", "quality"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"lightning_lens.evaluation.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_output_fn_reaches_every_model_call_and_defaults_to_the_methods():
    from lightning_lens.attribution import Gradient

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))

    class InADict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"scores": net(x)}

    wrapped, pick = InADict(), (lambda out: out["scores"])
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    metrics = ["deletion_auc", "insertion_auc_random", "max_sensitivity"]
    options = {"deletion": {"n_steps": 4}, "insertion": {"n_steps": 4, "substrate": "zeros"},
               "max_sensitivity": {"n_samples": 2}}
    # targets=None: the predictions are scored through output_fn too
    expected = compute_quality(net, Gradient(net), x, None, None, None, metrics, options=options)
    explicit = compute_quality(wrapped, Gradient(wrapped, output_fn=pick), x, None, None, None, metrics,
                               options=options, output_fn=pick)
    from_method = compute_quality(wrapped, Gradient(wrapped, output_fn=pick), x, None, None, None, metrics,
                                  options=options)
    assert explicit == pytest.approx(expected) and from_method == pytest.approx(expected)
    with pytest.raises(TypeError, match="output_fn"):
        compute_quality(wrapped, None, x, torch.rand(4, 1, 4, 4), None, None, ["deletion_auc"])
