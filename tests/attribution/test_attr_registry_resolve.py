"""method_name / resolve_method: every way users name a method gives one bound method object and one log name."""

import functools

import pytest
import torch

from lightning_lens.attribution import (
    Gradient,
    IntegratedGradients,
    SmoothGrad,
    VarGrad,
    method_name,
    resolve_method,
)


@pytest.fixture()
def model():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_names_use_the_registry_spelling_and_the_objects_name():
    assert method_name("IG") == "integrated_gradients"
    assert method_name("Saliency") == "gradient"
    assert method_name(("smoothgrad", {"n_samples": 2})) == "smoothgrad"
    assert method_name(Gradient(torch.nn.Linear(2, 2))) == "gradient"
    assert method_name(SmoothGrad) == "smoothgrad"
    assert method_name(functools.partial(VarGrad, n_samples=2)) == "vargrad"


def test_a_factory_without_a_name_or_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match=r"unknown attribution method 'grad_cam_pp' \(did you mean 'gradcam'\?\);"
                                         r" available: \[.*'gradcam'"):
        method_name("grad_cam_pp")
    with pytest.raises(TypeError, match="has no string .name"):
        method_name(lambda model: Gradient(model))
    with pytest.raises(TypeError, match="got int"):
        method_name(42)


def test_every_spec_form_resolves_to_a_method_bound_to_the_model(model):
    by_name = resolve_method("ig", model, n_steps=8)
    assert isinstance(by_name, IntegratedGradients) and by_name.model is model and by_name.n_steps == 8
    pair = resolve_method(("integrated_gradients", {"n_steps": 8}), model, n_steps=4)  # call kwargs win
    assert isinstance(pair, IntegratedGradients) and pair.n_steps == 4
    ready = SmoothGrad(model, n_samples=3)
    assert resolve_method(ready, model) is ready
    from_class = resolve_method(Gradient, model)
    assert isinstance(from_class, Gradient) and from_class.model is model
    from_partial = resolve_method(functools.partial(VarGrad, n_samples=2), model)
    assert isinstance(from_partial, VarGrad) and from_partial.n_samples == 2 and from_partial.model is model


def test_resolved_methods_explain_like_direct_construction(model):
    x = torch.rand(2, 1, 2, 2)
    expected = Gradient(model).attribute(x, target=1)
    for spec in ("gradient", ("saliency", {}), Gradient, Gradient(model)):
        assert torch.equal(resolve_method(spec, model).attribute(x, target=1), expected)


def test_bad_specs_raise_clear_errors(model):
    with pytest.raises(TypeError, match="not to the ready"):
        resolve_method(Gradient(model), model, abs=True)
    with pytest.raises(TypeError, match="returned int when called with the model"):
        resolve_method(lambda m: 3, model)
    with pytest.raises(TypeError, match="got float"):
        resolve_method(1.5, model)
    with pytest.raises(ValueError, match="unknown attribution method"):
        resolve_method("nope", model)
