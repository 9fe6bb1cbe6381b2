"""One ``attribute()`` for every method (shared checks, declared options, ``_attribute``), explain functions as
methods, and the errors a wrong model/input pairing gets: single-score models, missing dimensions, integer inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _attribution_methods import METHODS, MODEL_METHODS
from lightning_lens.attribution import FunctionAttribution, Gradient, get_method, resolve_method
from lightning_lens.attribution.base import ModelInputError


def make(name: str, model: nn.Module, fast_kwargs: dict, **extra) -> object:
    return get_method(name, model, **{**fast_kwargs.get(name, {}), **extra})


@pytest.mark.parametrize("name", METHODS)
def test_attribute_runs_the_shared_template(name, tiny_cnn, images, fast_kwargs):
    # regression: six classes overrode attribute() and skipped _attribute and the shared checks
    method = make(name, tiny_cnn, fast_kwargs)
    calls = []
    original = method._attribute

    def spy(inputs, target, **options):
        calls.append(sorted(options))
        return original(inputs, target, **options)

    method._attribute = spy
    signed = method.attribute(images, target=1)
    expected_options = sorted(method.call_options + (("abs",) if method.handles_abs else ()))
    assert calls == [expected_options]
    if not method.handles_abs:  # abs is applied once, by the template
        torch.testing.assert_close(method.attribute(images, target=1, abs=True), signed.abs())
    # methods with options declare them as typed keywords (Python's error), the others get the template's
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'n_sample'|unknown option\(s\) \['n_sample'\]"):
        method.attribute(images, target=1, n_sample=3)
    with pytest.raises(TypeError, match="abs must be a bool"):
        method.attribute(images, target=1, abs="yes")
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        method.attribute(images.long(), target=1)


def test_per_call_options_override_the_constructor_and_are_validated(tiny_cnn, images):
    sg = get_method("smoothgrad", tiny_cnn, n_samples=4, seed=3)
    torch.testing.assert_close(sg.attribute(images, target=0, n_samples=2),
                               get_method("smoothgrad", tiny_cnn, n_samples=2, seed=3).attribute(images, target=0))
    assert sg.n_samples == 4  # a call's option does not stick
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        sg.attribute(images, n_samples=0)
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("integrated_gradients", tiny_cnn).attribute(images, method="simpson")
    with pytest.raises(TypeError, match="upsample must be a bool"):
        get_method("gradcam", tiny_cnn).attribute(images, upsample="no")
    with pytest.raises(ValueError, match="window must be a positive int"):
        get_method("occlusion", tiny_cnn).attribute(images, window=0)


def test_an_explain_function_is_a_method_with_the_shared_context(tiny_cnn, images):
    seen = {}

    def my_gradient(model, inputs, target):
        seen["training"] = model.training
        seen["target"] = target
        return Gradient(model).attribute(inputs, target=target)

    tiny_cnn.train()
    method = resolve_method(my_gradient, tiny_cnn)
    assert isinstance(method, FunctionAttribution) and method.name == "my_gradient"
    out = method.attribute(images, target=2)
    assert seen["training"] is False and tiny_cnn.training  # eval mode while explaining, restored afterwards
    assert torch.equal(seen["target"], torch.full((5,), 2))  # an int target reaches the function as (B,) indices
    torch.testing.assert_close(out, Gradient(tiny_cnn).attribute(images, target=2))
    with pytest.raises(TypeError, match=r"must return a tensor of maps of shape \(batch, ...\) with batch 5"):
        resolve_method(lambda model, inputs, target: inputs[0], tiny_cnn).attribute(images)
    with pytest.raises(TypeError, match=r"explain functions take \(model, inputs, target\)"):
        resolve_method(lambda inputs, target: inputs, tiny_cnn)


def _one_score_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 1))


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_a_single_score_model_is_explained_at_target_none_or_0(name, images, fast_kwargs):
    model = _one_score_cnn()
    method = make(name, model, fast_kwargs)
    torch.testing.assert_close(method.attribute(images), method.attribute(images, target=0))
    if name == "gradient":
        x = images.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(model(x).sum(), x)  # the single output is the score
        torch.testing.assert_close(method.attribute(images), expected)
    # regression: binary labels 1 got "target class indices must lie in [0, 0]"
    with pytest.raises(ValueError, match=r"target: the model returns a single score per example \(outputs of shape "
                                         r"\(batch, 1\)\), so the only target is 0.*got \[1\].*return two logits"):
        method.attribute(images, target=torch.tensor([1, 0, 1, 1, 0]))


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_a_missing_dimension_names_inputs_and_the_expected_shape(name, fast_kwargs):
    # regression: torch's bare "mat1 and mat2 shapes cannot be multiplied"
    model = _one_score_cnn()
    unbatched = torch.rand(1, 8, 8)
    expected = (r"inputs: the model's forward failed on inputs of shape \(1, 8, 8\): (mat1 and mat2 shapes cannot be"
                r" multiplied|Given groups=1).*; check that inputs match what the model expects; its first layer '0'"
                r" expects inputs of shape \(batch, 1, H, W\): one dimension is missing \(add it with"
                r" inputs.unsqueeze\(1\)\)")
    if name == "rise":  # RISE checks for images before any forward pass: its own message, with the same fix
        expected = (r"inputs: RISE masks images, so inputs must have shape \(batch, channels, height, width\), got"
                    r" \(1, 8, 8\); add the missing dimension \(inputs.unsqueeze\(1\) for a batch of one-channel")
        with pytest.raises(ValueError, match=expected):
            make(name, model, fast_kwargs).attribute(unbatched, target=0)
        return
    with pytest.raises(ValueError, match=expected) as info:
        make(name, model, fast_kwargs).attribute(unbatched, target=0)
    assert info.value.shape == (1, 8, 8)
    assert isinstance(info.value, RuntimeError)  # a ModelInputError is still the type torch raised
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ModelInputError, match=r"shape \(2, 3, 3\).*first layer '1' expects 16 features per example"):
        Gradient(mlp).attribute(torch.rand(2, 3, 3))


@pytest.mark.parametrize("name", METHODS)
def test_integer_inputs_are_not_told_to_call_float(name, tiny_cnn, fast_kwargs):
    # regression: "convert it with inputs.float()", wrong for token ids
    tokens = torch.randint(0, 10, (5, 1, 8, 8))
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor") as info:
        make(name, tiny_cnn, fast_kwargs).attribute(tokens, target=0)
    message = str(info.value)
    assert ".float()" not in message
    assert "token ids" in message and "embedding layer" in message and "layer=" in message
