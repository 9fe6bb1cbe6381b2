"""Issue 12, engine: tuple and dict inputs, forward_kwargs, integer pass-through, and the model outputs every method
takes ((B, C), (B,), (B, 1), tuples, mappings, HuggingFace ModelOutput, output_fn)."""

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


class Net(nn.Module):
    """A nonlinear classifier of 6 features, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TupleNet(nn.Module):
    """The same model taking its features in two pieces, positionally, and optional integer codes it ignores."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1))


class DictNet(TupleNet):
    def forward(self, *, first: torch.Tensor, second: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(torch.cat([first, second], dim=1))


def three_ways():
    net = Net()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    codes = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(2))
    return net, TupleNet(net), DictNet(net), x, codes


METHODS = {
    "gradient": {},
    "gradient_x_input": {},
    "integrated_gradients": {"n_steps": 16},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tuple_and_dict_inputs_give_the_single_tensor_attributions(name):
    net, tnet, dnet, x, codes = three_ways()
    target = torch.tensor([0, 1, 2, 0, 1])
    single = get_method(name, net, **METHODS[name]).attribute(x, target=target)
    a, b = x[:, :2], x[:, 2:]
    tup = get_method(name, tnet, **METHODS[name]).attribute((a, b, codes), target=target)
    dic = get_method(name, dnet, **METHODS[name]).attribute({"first": a, "second": b, "codes": codes}, target=target)
    assert isinstance(tup, tuple) and len(tup) == 3 and list(dic) == ["first", "second", "codes"]
    torch.testing.assert_close(torch.cat(tup[:2], dim=1), single)
    torch.testing.assert_close(torch.cat([dic["first"], dic["second"]], dim=1), single)
    # integer tensors pass through unchanged: the caller's own object, values untouched
    assert tup[2] is codes and dic["codes"] is codes


@pytest.mark.parametrize("cls", [SmoothGrad, VarGrad])
def test_smoothgrad_noise_ignores_integer_tensors(cls):
    """One floating tensor plus integer codes draws the same noise as the single tensor (same seed), so equal maps;
    abs= is applied per sample as for a tensor."""
    net, tnet, _, x, codes = three_ways()
    tnet_one = TupleNet(net)
    tnet_one.forward = lambda a, codes: net(a)  # type: ignore[method-assign]
    for absolute in (False, True):
        single = cls(net, n_samples=7).attribute(x, target=1, abs=absolute)
        out = cls(tnet_one, n_samples=7).attribute((x, codes), target=1, abs=absolute)
        torch.testing.assert_close(out[0], single)
        assert out[1] is codes


def test_ig_of_a_linear_model_on_dict_inputs_is_input_minus_baseline_times_weight():
    lin = nn.Linear(5, 2)
    model = DictNet(lin)  # type: ignore[arg-type]
    model.net = lin
    a, b = torch.randn(4, 2), torch.randn(4, 3)
    base = {"first": 0.5, "second": torch.randn(3)}
    attr, delta = IntegratedGradients(model, n_steps=4).attribute(
        {"first": a, "second": b}, target=1, baseline=base, return_convergence_delta=True
    )
    w = lin.weight[1].detach()
    torch.testing.assert_close(attr["first"], (a - 0.5) * w[:2])
    torch.testing.assert_close(attr["second"], (b - base["second"]) * w[2:])
    assert delta.abs().max() < 1e-5
    # a None entry keeps the input's value: no attribution for that piece
    attr = IntegratedGradients(model, n_steps=4).attribute({"first": a, "second": b}, target=1,
                                                           baseline={"second": None})
    torch.testing.assert_close(attr["first"], a * w[:2])
    assert attr["second"].abs().max() == 0


class Scaled(nn.Module):
    """``scale * net(x) + shift``: ``scale`` is per example (B, 1) or a float, passed as forward_kwargs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[object] = []

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor | float, shift: float = 0.0) -> torch.Tensor:
        self.seen.append(scale)
        return scale * self.net(x) + shift


def test_forward_kwargs_reach_the_model_are_never_attributed_and_follow_the_rows():
    net, _, _, x, _ = three_ways()
    model = Scaled(net)
    scale = torch.arange(1.0, 6.0).view(5, 1)
    plain = Gradient(net).attribute(x, target=2)
    out = Gradient(model).attribute(x, target=2, forward_kwargs={"scale": scale, "shift": 3.0})
    assert isinstance(out, torch.Tensor)  # the result mirrors inputs only
    torch.testing.assert_close(out, plain * scale)
    # per-example tensors follow the rows of the blocks: chunked = unchunked = the per-example scaling
    for cls, kw in ((SmoothGrad, {"n_samples": 6}), (IntegratedGradients, {"n_steps": 6})):
        ref = cls(net, **kw).attribute(x, target=2)
        for batch_size in (1, 4, 7, None):
            got = cls(model, batch_size=batch_size, **kw).attribute(x, target=2, forward_kwargs={"scale": scale})
            torch.testing.assert_close(got, ref * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kw", [(SmoothGrad, {"n_samples": 5}), (VarGrad, {"n_samples": 5}),
                                    (IntegratedGradients, {"n_steps": 7})])
def test_structured_chunked_equals_unchunked(cls, kw):
    _, _, dnet, x, codes = three_ways()
    inputs = {"first": x[:, :2], "second": x[:, 2:], "codes": codes}
    ref = cls(dnet, batch_size=10_000, **kw).attribute(inputs)
    for batch_size in (1, 2, 5, 11):
        got = cls(dnet, batch_size=batch_size, **kw).attribute(inputs)
        for key in ("first", "second"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
        assert got["codes"] is codes


def test_structured_inputs_under_inference_mode_and_modes_restored():
    _, tnet, _, x, codes = three_ways()
    tnet.train()
    with torch.inference_mode():
        a, b, c = x[:, :2].clone(), x[:, 2:].clone(), codes.clone()
        out = IntegratedGradients(tnet, n_steps=4).attribute((a, b, c), target=0)
    assert tnet.training and all(m.training for m in tnet.modules())
    ref = IntegratedGradients(tnet, n_steps=4).attribute((x[:, :2], x[:, 2:], codes), target=0)
    torch.testing.assert_close(out[0], ref[0])
    assert out[2] is c


def test_integer_inputs_without_layer_name_layer_and_the_embedding():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match=r"layer='0'.*embedding"):
        Gradient(model).attribute(ids)
    with pytest.raises(TypeError, match=r"layer='0'"):
        IntegratedGradients(model).attribute({"input": ids})
    with pytest.raises(TypeError, match="layer="):
        get_method("occlusion", model).attribute(ids)


def test_structured_input_errors():
    _, tnet, dnet, x, codes = three_ways()
    with pytest.raises(ValueError, match="same batch size"):
        Gradient(tnet).attribute((x[:, :2], x[:3, 2:]))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a tensor.*forward_kwargs"):
        Gradient(tnet).attribute((x[:, :2], 3.0))
    with pytest.raises(TypeError, match="forward_kwargs must be a dict"):
        Gradient(tnet).attribute((x[:, :2], x[:, 2:]), forward_kwargs=[1])
    with pytest.raises(ValueError, match=r"forward_kwargs repeats the input\(s\) \['first'\]"):
        Gradient(dnet).attribute({"first": x[:, :2], "second": x[:, 2:]}, forward_kwargs={"first": 1})
    with pytest.raises(TypeError, match="a tuple or dict mirroring"):
        IntegratedGradients(tnet).attribute((x[:, :2], x[:, 2:]), baseline=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"keys \['third'\] that are not inputs"):
        IntegratedGradients(dnet).attribute({"first": x[:, :2], "second": x[:, 2:]}, baseline={"third": 0.0})


@pytest.mark.parametrize("name", ["gradcam", "occlusion", "guided_backprop", "edge"])
def test_methods_without_structured_support_refuse_tuple_dict_and_forward_kwargs(name):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    kwargs = {"layer": "0"} if name == "gradcam" else {}
    method = get_method(name, model, **kwargs)
    x = torch.rand(2, 1, 8, 8)
    for call in (lambda: method.attribute((x,)), lambda: method.attribute({"x": x}),
                 lambda: method.attribute(x, forward_kwargs={"scale": 2})):
        # methods with typed options get Python's error for forward_kwargs, the others the template's
        with pytest.raises(TypeError, match="takes one floating-point tensor|unexpected keyword argument 'forward_kw"):
            call()


# -- outputs --------------------------------------------------------------------------------------------------------


class Output(nn.Module):
    """A linear model of 4 features returning its scores in the form ``kind``."""

    def __init__(self, kind: str, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, classes)
        self.kind = kind

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        s = self.lin(x)
        if self.kind == "flat":
            return s[:, 0]
        if self.kind == "tuple":
            return s, x.sum()
        if self.kind == "list":
            return [s]
        if self.kind == "dict":
            return {"loss": x.sum(), "logits": s}
        if self.kind == "modeloutput":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=s)
        if self.kind == "custom":
            return {"scores": s}
        if self.kind == "string":
            return "scores"
        return s


@pytest.mark.parametrize("kind", ["plain", "tuple", "list", "dict", "modeloutput"])
def test_output_forms_give_the_logits_gradient(kind):
    if kind == "modeloutput":
        pytest.importorskip("transformers")
    model, x = Output(kind), torch.randn(3, 4)
    w = model.lin.weight.detach()
    torch.testing.assert_close(Gradient(model).attribute(x, target=2), w[2].expand(3, 4))
    target = model.lin(x).argmax(1)  # target=None: the predicted classes of the logits
    torch.testing.assert_close(Gradient(model).attribute(x), w[target])
    ig = IntegratedGradients(model, n_steps=3).attribute(x, target=1)
    torch.testing.assert_close(ig, x * w[1])


@pytest.mark.parametrize("kind,classes", [("flat", 3), ("plain", 1)])
def test_single_score_outputs_b_and_b1_target_none_is_the_score(kind, classes):
    model, x = Output(kind, classes), torch.randn(3, 4)
    w0 = model.lin.weight.detach()[0]
    for target in (None, 0):
        torch.testing.assert_close(Gradient(model).attribute(x, target=target), w0.expand(3, 4))
        torch.testing.assert_close(GradientXInput(model).attribute(x, target=target), x * w0)
    with pytest.raises(ValueError, match="single score"):
        Gradient(model).attribute(x, target=1)


def test_output_fn_picks_the_scores_and_bad_outputs_name_output_fn():
    model, x = Output("custom"), torch.randn(3, 4)
    w = model.lin.weight.detach()
    with pytest.raises(TypeError, match=r"without 'logits'.*output_fn="):
        Gradient(model).attribute(x, target=0)
    got = Gradient(model, output_fn=lambda out: out["scores"]).attribute(x, target=0)
    torch.testing.assert_close(got, w[0].expand(3, 4))
    # output_fn may return (B,): a regression of the difference of two scores
    diff = SmoothGrad(model, n_samples=3, output_fn=lambda out: out["scores"][:, 1] - out["scores"][:, 2])
    torch.testing.assert_close(diff.attribute(x), (w[1] - w[2]).expand(3, 4))
    with pytest.raises(TypeError, match="output_fn"):
        Gradient(Output("string")).attribute(x)
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        Gradient(model, output_fn=lambda out: out).attribute(x)
    with pytest.raises(ValueError, match="output_fn"):
        Gradient(model, output_fn=lambda out: out["scores"][:2]).attribute(x)
    with pytest.raises(TypeError, match="output_fn must be a function"):
        Gradient(model, output_fn="scores")  # type: ignore[arg-type]


def test_model_inputs_rows_and_repeat_follow_per_example_forward_kwargs_only():
    """A forward_kwarg is per-example when its first dimension is the caller's batch size, decided once: a constant of
    another size keeps its value in every block, even one whose width happens to equal its first dimension."""
    from lightning_lens.attribution._inputs import ModelInputs

    x, ids = torch.randn(5, 2), torch.arange(5).view(5, 1)
    weights, constant = torch.arange(5.0).view(5, 1), torch.ones(3)
    batch = ModelInputs.from_user((x, ids), {"weights": weights, "constant": constant, "flag": True})
    part = batch.rows(1, 4).repeat(2)
    assert part.batch_size == 6 and part.forward_kwargs["flag"] is True
    assert torch.equal(part.forward_kwargs["constant"], constant)
    torch.testing.assert_close(part.forward_kwargs["weights"][:, 0], torch.tensor([1.0, 2, 3, 1, 2, 3]))
    torch.testing.assert_close(part.leaves[1][:, 0], torch.tensor([1, 2, 3, 1, 2, 3]))
    torch.testing.assert_close(part.leaves[0], torch.cat([x[1:4], x[1:4]]))
