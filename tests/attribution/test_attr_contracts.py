"""Properties every attribution method must have, checked for each registered method on a small CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _attribution_methods import BLOCKED, METHODS, MODEL_METHODS, NOISY, NOT_ON_A_CNN
from lightning_lens.attribution import available_methods, get_method


def make(name: str, model: nn.Module, fast_kwargs: dict, **extra) -> object:
    return get_method(name, model, **{**fast_kwargs.get(name, {}), **extra})


def test_every_registered_method_is_under_the_contracts():
    # a method registered without being added to METHODS (or to NOT_ON_A_CNN, with the reason) fails here
    assert set(available_methods()) - set(NOT_ON_A_CNN) == set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_output_shape_and_name(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    out = method.attribute(images, target=1)
    expected = (images.shape[0], 1, *images.shape[2:]) if method.produces_map else images.shape
    assert out.shape == expected
    assert out.dtype == images.dtype and not out.requires_grad
    assert torch.isfinite(out).all()
    assert method.name == name


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_per_example_targets_equal_a_loop_over_examples(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    targets = torch.tensor([0, 2, 1, 1, 0])
    batched = method.attribute(images, target=targets)
    looped = torch.cat([method.attribute(images[i : i + 1], target=int(targets[i])) for i in range(len(targets))])
    if name in NOISY:
        # the noise of example i differs between a batch and a batch of one; the same noise must give the same map
        noise_free = make(name, tiny_cnn, fast_kwargs, noise_level=0.0)
        batched = noise_free.attribute(images, target=targets)
        looped = torch.cat([noise_free.attribute(images[i : i + 1], target=int(targets[i])) for i in range(5)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    # a 0-d tensor / int target means the same class for every example
    torch.testing.assert_close(method.attribute(images, target=torch.tensor(2)), method.attribute(images, target=2))


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_target_none_is_the_predicted_class(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    with torch.no_grad():
        predicted = tiny_cnn.eval()(images).argmax(dim=1)
    torch.testing.assert_close(method.attribute(images), method.attribute(images, target=predicted))


@pytest.mark.parametrize("name", METHODS)
def test_works_under_inference_mode_with_inference_tensors(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    expected = method.attribute(images, target=1)
    with torch.inference_mode():
        x = images.clone()
        assert x.is_inference()
        out = method.attribute(x, target=torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_parameter_grads_are_never_written(name, tiny_cnn, images, fast_kwargs):
    params = list(tiny_cnn.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)  # an existing gradient stays as it is
    make(name, tiny_cnn, fast_kwargs).attribute(images, target=0)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    assert all(p.grad is None for p in params[1:])


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified(name, tiny_cnn, images, fast_kwargs):
    before = images.clone()
    make(name, tiny_cnn, fast_kwargs).attribute(images, target=0)
    assert torch.equal(images, before) and images.grad is None and not images.requires_grad


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_modes_are_restored_and_the_model_is_explained_in_eval_mode(name, tiny_cnn, images, fast_kwargs):
    tiny_cnn.train()
    tiny_cnn.features[1].eval()  # a mix of train and eval submodules
    before = {n: m.training for n, m in tiny_cnn.named_modules()}
    seen = []
    handle = tiny_cnn.dropout.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        method = make(name, tiny_cnn, fast_kwargs)
        first = method.attribute(images, target=1)
        second = method.attribute(images, target=1)
    finally:
        handle.remove()
    assert {n: m.training for n, m in tiny_cnn.named_modules()} == before
    assert seen and not any(seen)  # dropout (p=0.5) ran in eval mode ...
    torch.testing.assert_close(first, second)  # ... so the maps are deterministic


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_eval_mode_false_keeps_modes_and_restores_buffers(name, tiny_cnn, images, fast_kwargs):
    tiny_cnn.train()
    tiny_cnn.dropout.p = 0.0
    bn = tiny_cnn.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    method = make(name, tiny_cnn, fast_kwargs, eval_mode=False)
    method.attribute(images, target=1)  # Grad-CAM finds its layer in a first, eval-mode pass
    assert torch.equal(bn.running_mean, stats[0])
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        method.attribute(images, target=1)
    finally:
        handle.remove()
    assert seen and all(seen)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert all(m.training for m in tiny_cnn.modules())


@pytest.mark.parametrize("name", METHODS)
def test_global_rng_is_untouched(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    state = torch.get_rng_state()
    method.attribute(images, target=0)
    assert torch.equal(torch.get_rng_state(), state)


def _hooks_left(model: nn.Module) -> int:
    count = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            count += len(getattr(m, attr))
    globals_ = nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        count += len(getattr(globals_, attr, {}))
    return count


class Exploding(nn.Module):
    """Wraps a model; raises from inside its forward when armed (after the first layers ran)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.features(x)
        if self.armed:
            raise RuntimeError("boom")
        return self.model.classifier(torch.relu(h).flatten(1))


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_nothing_is_left_behind_after_an_exception(name, tiny_cnn, images, fast_kwargs):
    model = Exploding(tiny_cnn)
    model.train()
    model.model.features[0].eval()
    modes = [m.training for m in model.modules()]
    method = make(name, model, fast_kwargs)
    method.attribute(images, target=0)  # runs fine (and finds Grad-CAM's layer) when not armed
    model.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        method.attribute(images, target=0)
    with pytest.raises(RuntimeError, match="boom"):  # a fresh Grad-CAM fails while looking for its layer
        make(name, model, fast_kwargs).attribute(images, target=0)
    assert _hooks_left(model) == 0
    assert torch.overrides._get_current_function_mode_stack() == []
    assert [m.training for m in model.modules()] == modes
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_no_hooks_left_after_success(name, tiny_cnn, images, fast_kwargs):
    make(name, tiny_cnn, fast_kwargs).attribute(images)
    assert _hooks_left(tiny_cnn) == 0
    assert torch.overrides._get_current_function_mode_stack() == []


@pytest.mark.parametrize("name", BLOCKED)
def test_chunked_equals_unchunked(name, tiny_cnn, images, fast_kwargs):
    reference = make(name, tiny_cnn, fast_kwargs, batch_size=10_000).attribute(images, target=torch.tensor([0, 1, 2, 0, 1]))
    for rows in (1, 3, 7):  # smaller and larger than the batch of 5, not multiples of it
        out = make(name, tiny_cnn, fast_kwargs, batch_size=rows).attribute(images, target=torch.tensor([0, 1, 2, 0, 1]))
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BLOCKED)
def test_batch_size_bounds_the_rows_of_every_forward(name, tiny_cnn, images, fast_kwargs):
    rows = []
    handle = tiny_cnn.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        make(name, tiny_cnn, fast_kwargs, batch_size=7).attribute(images, target=0)
    finally:
        handle.remove()
    assert max(rows) <= 7 and len(rows) > 2


@pytest.mark.parametrize("name", METHODS)
def test_abs_option(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    absolute = method.attribute(images, target=1, abs=True)
    assert (absolute >= 0).all()
    if name not in NOISY:  # those take |.| per sample (next test)
        torch.testing.assert_close(absolute, method.attribute(images, target=1).abs())


def test_smoothgrad_abs_is_taken_per_sample(tiny_cnn, images):
    # mean |g| >= |mean g|, and strictly for some features once the noise flips signs
    sg = get_method("smoothgrad", tiny_cnn, n_samples=8, noise_level=0.5)
    absolute, signed = sg.attribute(images, target=0, abs=True), sg.attribute(images, target=0)
    assert (absolute >= signed.abs() - 1e-6).all() and (absolute > signed.abs() + 1e-4).any()


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_bad_inputs_and_targets_get_clear_errors(name, tiny_cnn, images, fast_kwargs):
    method = make(name, tiny_cnn, fast_kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        method.attribute(images.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        method.attribute(images.numpy())
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        method.attribute(images, target=3)
    with pytest.raises(ValueError, match="one class index per example"):
        method.attribute(images, target=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        method.attribute(images, target=torch.zeros(5))
    with pytest.raises(ValueError, match="batch dimension"):
        method.attribute(torch.tensor([1.0]))


# the CAMs are left out: they need a layer with spatial positions, which this model has not (test_attr_gradcam.py)
@pytest.mark.parametrize("name", [m for m in MODEL_METHODS if m not in ("gradcam", "hirescam", "guided_gradcam")])
def test_model_output_must_be_batch_by_classes(name, fast_kwargs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Unflatten(1, (3, 1)))
    x = torch.rand(2, 1, 2, 2)  # tiny images, so that RISE (images only) runs too
    with pytest.raises(ValueError, match=r"shape \(batch, classes\)"):
        make(name, model, fast_kwargs).attribute(x)
    # a tuple's first element is taken as the logits since issue 12; an output with no tensor to take still fails
    stringy = nn.Module()
    stringy.forward = lambda x: "scores"
    with pytest.raises(TypeError, match="output_fn"):
        make(name, stringy, fast_kwargs).attribute(x)


class Doubling(nn.Module):
    """Doubles its input, in place or not, before the wrapped model."""

    def __init__(self, model: nn.Module, inplace: bool) -> None:
        super().__init__()
        self.model = model
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.mul_(2.0) if self.inplace else x * 2.0)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_a_model_modifying_its_input_in_place_gets_the_same_maps(name, tiny_cnn, images, fast_kwargs):
    before = images.clone()
    in_place = make(name, Doubling(tiny_cnn, inplace=True), fast_kwargs).attribute(images, target=1)
    assert torch.equal(images, before)
    torch.testing.assert_close(in_place, make(name, Doubling(tiny_cnn, inplace=False), fast_kwargs).attribute(
        images, target=1))


class DictOutput(nn.Module):
    """The wrapped model's logits in a dict, as HuggingFace-style models return them; ``key`` names the scores, and
    a key other than "logits" comes with a decoy "logits" (the negated scores) that only output_fn can avoid."""

    def __init__(self, model: nn.Module, key: str = "logits") -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.model(x)
        return {"logits": logits} if self.key == "logits" else {"logits": -logits, self.key: logits}


@pytest.mark.parametrize("key", ["logits", "scores"])
@pytest.mark.parametrize("name", METHODS)
def test_output_fn_gives_the_maps_of_the_plain_model(name, key, tiny_cnn, images, fast_kwargs):
    # regression: LRP, Excitation Backprop, RISE, CGI, Occlusion and the controls refused output_fn=; guided
    # backprop and deconvnet took it (the base's argument) and ignored it, explaining the decoy "logits"
    plain = make(name, tiny_cnn, fast_kwargs)
    wrapped = make(name, DictOutput(tiny_cnn, key), fast_kwargs, output_fn=lambda out: out[key])
    targets = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(wrapped.attribute(images, target=targets), plain.attribute(images, target=targets))
    torch.testing.assert_close(wrapped.attribute(images), plain.attribute(images))  # the predicted class, too


@pytest.mark.parametrize("name", METHODS)
def test_output_fn_must_be_callable(name, tiny_cnn, fast_kwargs):
    assert make(name, tiny_cnn, fast_kwargs, output_fn=None).output_fn is None  # the default: no output_fn
    with pytest.raises(TypeError, match="output_fn must be a function of the model's output, got str"):
        make(name, tiny_cnn, fast_kwargs, output_fn="logits")


def test_an_explain_function_takes_output_fn_for_its_logits(tiny_cnn, images):
    from lightning_lens.attribution import FunctionAttribution

    def doubled(model, inputs, target):
        return 2 * inputs

    method = FunctionAttribution(DictOutput(tiny_cnn, "scores").eval(), doubled, output_fn=lambda out: out["scores"])
    with torch.no_grad():
        torch.testing.assert_close(method.logits(images), tiny_cnn(images))
    torch.testing.assert_close(method.attribute(images), 2 * images)
    with pytest.raises(TypeError, match="output_fn must be a function"):
        FunctionAttribution(tiny_cnn, doubled, output_fn="scores")


class KeywordInput(nn.Module):
    """The wrapped model called with its image as a keyword argument, ``model(image=x)`` (dict inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_structured_inputs_give_the_tensor_maps_or_a_clear_error(name, tiny_cnn, images, fast_kwargs):
    plain = make(name, tiny_cnn, fast_kwargs).attribute(images, target=1)
    as_tuple = make(name, tiny_cnn, fast_kwargs)
    as_dict = make(name, KeywordInput(tiny_cnn), fast_kwargs)
    if not as_tuple.supports_structured:  # the methods that take one tensor say so, with the way out
        for method, inputs in ((as_tuple, (images,)), (as_dict, {"image": images})):
            with pytest.raises(TypeError, match="takes one floating-point tensor of inputs.*wrap the model"):
                method.attribute(inputs, target=1)
        return
    (from_tuple,) = as_tuple.attribute((images,), target=1)
    torch.testing.assert_close(from_tuple, plain)
    from_dict = as_dict.attribute({"image": images}, target=1)
    assert list(from_dict) == ["image"]
    torch.testing.assert_close(from_dict["image"], plain)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_a_frozen_model_gets_the_same_maps(name, tiny_cnn, images, fast_kwargs):
    expected = make(name, tiny_cnn, fast_kwargs).attribute(images, target=1)
    tiny_cnn.requires_grad_(False)  # a model frozen for fine-tuning or deployment: input gradients still exist
    torch.testing.assert_close(make(name, tiny_cnn, fast_kwargs).attribute(images, target=1), expected)
    assert not any(p.requires_grad for p in tiny_cnn.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_float64_inputs_give_float64_maps(name, tiny_cnn, images, fast_kwargs):
    # noise is drawn in the inputs' dtype, so float64 draws differ from float32 ones: compare noise-free maps
    extra = {"noise_level": 0.0} if name in NOISY else {}
    single = make(name, tiny_cnn, fast_kwargs, **extra).attribute(images, target=1)
    double = make(name, tiny_cnn.double(), fast_kwargs, **extra).attribute(images.double(), target=1)
    assert double.dtype == torch.float64 and torch.isfinite(double).all()
    if name != "random":  # random maps are standard normal in either dtype, not the same numbers
        torch.testing.assert_close(double, single.double(), rtol=1e-4, atol=1e-5)


class Scaled(nn.Module):
    """The wrapped model's logits times a per-example ``scale`` passed as a keyword (a forward_kwargs tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.model(image) * scale[:, None]


STRUCTURED = [m for m in MODEL_METHODS if get_method(m, nn.Linear(2, 2)).supports_structured]


@pytest.mark.parametrize("name", STRUCTURED)
def test_per_example_forward_kwargs_follow_their_rows(name, tiny_cnn, images, fast_kwargs):
    model = Scaled(tiny_cnn)
    scale = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    targets = torch.tensor([0, 2, 1, 1, 0])
    extra = {"noise_level": 0.0} if name in NOISY else {}  # a batch of one draws other noise (see above)
    blocked = {"batch_size": 3} if name in BLOCKED else {}  # blocks that cut across examples and samples
    method = make(name, model, fast_kwargs, **extra, **blocked)
    batched = method.attribute({"image": images}, target=targets, forward_kwargs={"scale": scale})["image"]
    looped = torch.cat([
        method.attribute({"image": images[i : i + 1]}, target=int(targets[i]),
                         forward_kwargs={"scale": scale[i : i + 1]})["image"] for i in range(5)
    ])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    if name != "vargrad":  # noise-free VarGrad is 0 everywhere; the others change with the scales
        assert not torch.equal(batched, method.attribute({"image": images}, target=targets,
                                                         forward_kwargs={"scale": scale.flip(0)})["image"])
