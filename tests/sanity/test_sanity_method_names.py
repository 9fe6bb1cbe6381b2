"""One method-spec path: the registry, the sanity checks and the evaluation metrics name and build methods alike."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_lens.attribution import (
    FunctionAttribution,
    Gradient,
    SmoothGrad,
    VarGrad,
    method_name,
    method_specs,
    resolve_method,
)
from lightning_lens.evaluation.quality import _resolve_method
from lightning_lens.sanity import cascading_randomization
from lightning_lens.sanity._common import bind, normalize_methods, private_copy
from lightning_lens.testing import SmallCNN


def plain_gradient(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return Gradient(model).attribute(inputs, target=target)


def _specs(model: nn.Module) -> list:
    return ["IG", "Saliency", ("smoothgrad_sq", {"n_samples": 2}), SmoothGrad(model, n_samples=2, variant="var"),
            Gradient, functools.partial(VarGrad, n_samples=2), plain_gradient, "sobel"]


EXPECTED = ["integrated_gradients", "gradient", "smoothgrad_squared", "vargrad", "gradient", "vargrad",
            "plain_gradient", "edge"]


def test_registry_sanity_and_evaluation_give_the_same_names():
    model = SmallCNN(1, 10)
    specs = _specs(model)
    assert [method_name(s) for s in specs] == EXPECTED
    assert [resolve_method(s, model).name for s in specs] == EXPECTED
    assert [_resolve_method(s, model).name for s in specs] == EXPECTED  # evaluation goes through the registry
    clone, memo = private_copy(model)
    assert [bind(method_name(s), s, model, clone, memo).method.name for s in specs] == EXPECTED
    unique = specs[:4] + specs[6:]  # names must be unique within one call
    assert [n for n, _ in normalize_methods(unique)] == [n for n, _ in method_specs(unique)]
    assert [n for n, _ in normalize_methods(unique)] == [EXPECTED[i] for i in (0, 1, 2, 3, 6, 7)]


def test_sanity_report_uses_the_canonical_names():
    # regression: RandomizationSanityCheck(methods=["IG"]) logged sanity/IG/... while the saliency maps logged
    # saliency/integrated_gradients
    torch.manual_seed(0)
    model, x = SmallCNN(1, 10), torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    report = cascading_randomization(model, x, 0, ["IG", "Saliency", plain_gradient], controls=False,
                                     layers=["classifier.3"])
    assert report.methods == ["integrated_gradients", "gradient", "plain_gradient"]
    # a dict labels its entries explicitly
    report = cascading_randomization(model, x, 0, {"ig16": ("IG", {"n_steps": 16})}, controls=False,
                                     layers=["classifier.3"])
    assert report.methods == ["ig16"]


def test_the_callback_names_its_methods_like_the_registry():
    pytest.importorskip("pytorch_lightning")
    from lightning_lens.callbacks import RandomizationSanityCheck

    assert RandomizationSanityCheck(methods=["IG", "saliency"]).method_names == ["integrated_gradients", "gradient"]


def test_one_validation_for_every_caller():
    with pytest.raises(TypeError, match=r"did you mean methods=\['gradient'\]"):
        method_specs("gradient")
    assert normalize_methods("gradient") == [("gradient", "gradient")]  # the sanity functions take one spec too
    with pytest.raises(ValueError, match="methods is empty"):
        normalize_methods([])
    with pytest.raises(ValueError, match=r"\['gradient'\] more than once \(duplicate names\)"):
        normalize_methods(["gradient", "saliency"])  # an alias is the same method
    with pytest.raises(ValueError, match=r"methods\[1\]='gradients': unknown attribution method 'gradients' \(did you"
                                         r" mean 'gradient'\?\)"):
        method_specs(["ig", "gradients"])
    with pytest.raises(TypeError, match=r"methods\[0\]=.*has no name to log under.*dict \{label: function\}"):
        method_specs([lambda model, inputs, target: inputs])
    assert method_specs({"mine": lambda model, inputs, target: inputs})[0][0] == "mine"
    with pytest.raises(TypeError, match=r"methods\[0\]=\('gradient', 3\): a tuple must be \(name, kwargs\)"):
        method_specs([("gradient", 3)])


def test_an_explain_function_runs_on_the_sanity_copy():
    model = SmallCNN(1, 10)
    clone, memo = private_copy(model)
    bound = bind("plain_gradient", plain_gradient, model, clone, memo)
    assert isinstance(bound.method, FunctionAttribution) and bound.method.model is clone
