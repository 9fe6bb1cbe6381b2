"""Issue 19: blocks split the batch, and nothing but the result grows with it.

Chunked = unchunked for SmoothGrad (every variant), Integrated Gradients (with the convergence delta) and Gradient in
blocks, on single-tensor and structured inputs and in layer mode; SmoothGrad's noise of a batch split into blocks is
the noise of the whole draw (pinned values computed before the change); and a count of the whole-batch-sized buffers
each method allocates.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _attribution_helpers import conv_model_5x5, rows_of_every_forward
from lightning_lens.attribution import Gradient, GradientXInput, IntegratedGradients, Occlusion, SmoothGrad
from lightning_lens.attribution import _batching
from lightning_lens.attribution._batching import NormalStream, blocks, copy_generator


class HalfSquare(nn.Module):
    """``0.5 * |a|^2 (+ 0.5 * |b|^2)``: its gradient is its input, so SmoothGrad with one sample returns the noisy
    input itself."""

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        out = 0.5 * a.square().flatten(1).sum(1)
        return out if b is None else out + 0.5 * b.square().flatten(1).sum(1)


class Mixed(nn.Module):
    """Two floating inputs, token ids and a per-example keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.emb = nn.Embedding(7, 3)
        self.lin = nn.Linear(3 * 25 + 3 + 3, 4)

    def forward(self, a, b, ids, scale=None):
        h = torch.cat([torch.tanh(self.conv(a)).flatten(1), torch.sin(b), self.emb(ids).mean(1)], 1)
        out = self.lin(h)
        return out if scale is None else out * scale[:, None]


def mixed_batch(batch: int = 6):
    g = torch.Generator().manual_seed(11)
    inputs = {"a": torch.randn(batch, 2, 5, 5, generator=g), "b": torch.randn(batch, 3, generator=g),
              "ids": torch.randint(0, 7, (batch, 4), generator=g)}
    return inputs, {"scale": torch.rand(batch, generator=g) + 0.5}


# -- the noise stream ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel, pieces", [(64, [16, 16, 32]), (70, [3, 30, 37]), (1000, [1, 160, 799, 40]),
                                           (12, [5, 7]), (17, [16, 1])])
def test_normal_stream_pieces_are_the_whole_draw(dtype, numel, pieces):
    """The pieces equal one torch.randn of numel elements, and the generator ends in the same state."""
    whole_gen = torch.Generator().manual_seed(3)
    whole = torch.randn(numel, generator=whole_gen, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    stream = NormalStream(numel, gen, dtype, torch.device("cpu"))
    parts = [torch.empty(n, dtype=dtype) for n in pieces]
    for part in parts:
        stream.take(part)
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.randn(20, generator=gen), torch.randn(20, generator=whole_gen))


def test_normal_stream_skip_leaves_the_generator_after_the_whole_draw():
    gen = torch.Generator().manual_seed(9)
    stream = NormalStream(200_003, copy_generator(gen), torch.float32, torch.device("cpu"))
    stream.take(torch.empty(5))
    stream.skip()
    torch.randn(200_003, generator=gen)
    assert torch.equal(torch.randn(50, generator=stream.generator), torch.randn(50, generator=gen))
    with pytest.raises(ValueError, match="values asked"):
        stream.take(torch.empty(1))


def test_example_major_blocks_cover_every_row_once():
    cells = [(s, b) for blk in blocks(3, 7, 3, example_major=True) for s in range(blk.s0, blk.s1)
             for b in range(blk.b0, blk.b1)]
    assert sorted(cells) == [(s, b) for s in range(3) for b in range(7)] and len(cells) == len(set(cells))


# -- SmoothGrad ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 1, 2, 3, 5, 100])
def test_smoothgrad_noise_does_not_depend_on_the_blocks(batch_size):
    """With one sample of HalfSquare, SmoothGrad returns x + noise exactly: the noise rows of a split batch are those
    of the whole batch's draw, bit for bit, for one input and for two (each its own draw, in order)."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 4, generator=g)
    reference = SmoothGrad(HalfSquare(), n_samples=1, seed=4, batch_size=100).attribute((x, y), target=0)
    out = SmoothGrad(HalfSquare(), n_samples=1, seed=4, batch_size=batch_size).attribute((x, y), target=0)
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])


def test_smoothgrad_values_pinned_before_the_blocks_stopped_drawing_whole_batches():
    """Values computed on the code that drew each sample's noise for the whole batch (before issue 19's change), with
    blocks of 2 examples (a split batch) and of whole samples: the same noise, the same results."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 4, generator=g)
    for batch_size in (None, 2):
        sg = SmoothGrad(HalfSquare(), n_samples=3, noise_level=0.2, seed=4, batch_size=batch_size)
        out = sg.attribute(x, target=0)
        assert out[1, 0, 2, 1].item() == pytest.approx(-0.16125357151031494, rel=1e-6)
        assert out[4, 1, 0, 0].item() == pytest.approx(0.2171318382024765, rel=1e-6)
        assert out.sum().item() == pytest.approx(-7.306521892547607, rel=1e-6)
        a, b = sg.attribute((x, y), target=0)
        assert a[1, 0, 2, 1].item() == pytest.approx(0.02731180191040039, rel=1e-6)
        assert b[3, 2].item() == pytest.approx(0.9779745936393738, rel=1e-6)
        assert b.sum().item() == pytest.approx(-4.860991954803467, rel=1e-6)


@pytest.mark.parametrize("variant", ["mean", "squared", "var"])
def test_smoothgrad_structured_batch_splits_equal_the_unchunked_result(variant):
    inputs, kwargs = mixed_batch()
    model, target = Mixed().eval(), torch.tensor([0, 1, 2, 3, 0, 1])
    reference = SmoothGrad(model, n_samples=4, variant=variant, batch_size=10_000).attribute(
        inputs, target, forward_kwargs=kwargs)
    for rows in (1, 4, 5, 7, 13):
        out = SmoothGrad(model, n_samples=4, variant=variant, batch_size=rows).attribute(
            inputs, target, forward_kwargs=kwargs)
        assert out["ids"] is inputs["ids"]
        for key in ("a", "b"):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-5, atol=1e-6)


# -- Integrated Gradients --------------------------------------------------------------------------------------------
def test_ig_batch_splits_equal_the_unchunked_result_with_the_delta():
    inputs, kwargs = mixed_batch()
    model, target = Mixed().eval(), torch.tensor([0, 1, 2, 3, 0, 1])
    ig = IntegratedGradients(model, n_steps=6, baseline={"b": 0.5})
    reference, ref_delta = ig.attribute(inputs, target, forward_kwargs=kwargs, batch_size=10_000,
                                        return_convergence_delta=True)
    for rows in (1, 4, 5, 7, 13):
        out, delta = ig.attribute(inputs, target, forward_kwargs=kwargs, batch_size=rows,
                                  return_convergence_delta=True)
        for key in ("a", "b"):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=1e-6)


def test_layer_ig_and_smoothgrad_batch_splits_equal_the_unchunked_result():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(11, 5), nn.Tanh(), nn.Flatten(), nn.Linear(30, 3)).eval()
    ids = torch.randint(1, 11, (5, 6), generator=torch.Generator().manual_seed(2))
    ig = IntegratedGradients(model, n_steps=5, layer="0")
    reference, ref_delta = ig.attribute(ids, 1, batch_size=10_000, return_convergence_delta=True)
    sg_reference = SmoothGrad(model, n_samples=4, layer="0", batch_size=10_000).attribute(ids, 1)
    for rows in (1, 2, 3, 7):
        out, delta = ig.attribute(ids, 1, batch_size=rows, return_convergence_delta=True)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(SmoothGrad(model, n_samples=4, layer="0", batch_size=rows).attribute(ids, 1),
                                   sg_reference, rtol=1e-5, atol=1e-6)


# -- Gradient in blocks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget_rows", [1, 4, 5])
def test_gradient_runs_in_blocks_within_the_element_budget(budget_rows, monkeypatch):
    """Issue 19: the single gradient pass of a big batch is split too (it was one forward of the whole batch)."""
    model, x = conv_model_5x5(), torch.randn(11, 2, 5, 5)
    reference = Gradient(model, batch_size=10_000).attribute(x)
    reference_gxi = GradientXInput(model, batch_size=10_000).attribute(x, target=2)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", budget_rows * x[0].numel())
    out, rows = rows_of_every_forward(model, lambda: Gradient(model).attribute(x))
    assert max(rows) == budget_rows and sum(rows) == 11
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-7)
    out, rows = rows_of_every_forward(model, lambda: GradientXInput(model).attribute(x, target=2))
    assert max(rows) == budget_rows
    torch.testing.assert_close(out, reference_gxi, rtol=0, atol=1e-7)


def test_gradient_blocks_on_structured_inputs_and_layers():
    inputs, kwargs = mixed_batch(7)
    model, target = Mixed().eval(), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    whole = GradientXInput(model, batch_size=100).attribute(inputs, target, forward_kwargs=kwargs)
    split = GradientXInput(model, batch_size=3).attribute(inputs, target, forward_kwargs=kwargs)
    for key in ("a", "b"):
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-7)
    layered = Gradient(model, layer="emb", batch_size=2).attribute(inputs, None, forward_kwargs=kwargs)
    torch.testing.assert_close(layered, Gradient(model, layer="emb").attribute(inputs, forward_kwargs=kwargs))
    with pytest.raises(ValueError, match="batch_size"):
        Gradient(model, batch_size=0)


# -- no whole-batch temporaries --------------------------------------------------------------------------------------
class _BigBuffers(TorchDispatchMode):
    """Counts the distinct new storages of at least ``nbytes`` bytes that ops create."""

    def __init__(self, nbytes: int, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.nbytes, self.seen = nbytes, {t.untyped_storage().data_ptr() for t in known}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen:
                    self.seen.add(ptr)
                    self.count += 1
        return out


@pytest.mark.parametrize("make, allowed", [
    (lambda m: SmoothGrad(m, n_samples=3), 1),
    (lambda m: SmoothGrad(m, n_samples=3, variant="squared"), 1),
    (lambda m: SmoothGrad(m, n_samples=3, variant="var"), 2),  # the running mean and the sum of squares
    (lambda m: IntegratedGradients(m, n_steps=3), 1),
    (lambda m: Gradient(m), 1),
    (lambda m: GradientXInput(m), 1),
    (lambda m: Occlusion(m, window=2), 1),
], ids=["smoothgrad", "smoothgrad_squared", "vargrad", "integrated_gradients", "gradient", "gradient_x_input",
        "occlusion"])
def test_only_the_result_has_the_batch_size(make, allowed, monkeypatch):
    """With blocks of 2 examples, the only buffers as large as the batch are the result (and VarGrad's running mean):
    no whole-batch noise, copy of the input, baseline, x - x' or fill (issue 19)."""
    model, x = conv_model_5x5(), torch.randn(40, 2, 5, 5)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", 2 * x[0].numel())
    method = make(model)
    with _BigBuffers(x.numel() * x.element_size() // 2, [x, *model.parameters()]) as counter:
        method.attribute(x, target=1)
    assert counter.count <= allowed


def test_ig_delta_and_target_none_add_no_whole_batch_buffer(monkeypatch):
    model, x = conv_model_5x5(), torch.randn(40, 2, 5, 5)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", 2 * x[0].numel())
    with _BigBuffers(x.numel() * x.element_size() // 2, [x, *model.parameters()]) as counter:
        IntegratedGradients(model, n_steps=3).attribute(x, return_convergence_delta=True)
    assert counter.count <= 1


@pytest.mark.parametrize("make, allowed", [
    (lambda m: SmoothGrad(m, n_samples=3, layer="0"), 1),
    (lambda m: IntegratedGradients(m, n_steps=3, layer="0"), 1),
    (lambda m: Gradient(m, layer="0"), 1),
], ids=["smoothgrad", "integrated_gradients", "gradient"])
def test_layer_mode_holds_no_whole_batch_layer_output(make, allowed, monkeypatch):
    """In layer mode the result is shaped like the layer's output; the layer's clean output, its baseline value and
    their difference are per slice only (SmoothGrad adds its noise to each forward's own layer output)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(11, 5), nn.Tanh(), nn.Flatten(), nn.Linear(30, 3)).eval()
    ids = torch.randint(1, 11, (40, 6), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", 2 * (6 + 30))
    layer_bytes = 40 * 30 * 4
    with _BigBuffers(layer_bytes // 2, [ids, *model.parameters()]) as counter:
        make(model).attribute(ids, target=1)
    assert counter.count <= allowed


def test_gradient_with_eval_mode_false_keeps_the_batch_whole_for_batch_statistics():
    # regression: slicing the batch by the element budget changed BatchNorm's batch statistics in train mode
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(2 * 64 * 64, 3)
    ).train()
    x = torch.randn(40, 1, 64, 64)  # 40 x 4096 elements: the element budget would cut it into 3 slices
    reference_model = copy.deepcopy(model)
    leaf = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(reference_model(leaf)[:, 1].sum(), leaf)[0]
    got = Gradient(model, eval_mode=False).attribute(x, target=1)
    torch.testing.assert_close(got, expected)
    assert model.training
