"""Deletion and insertion curves on hand-built models whose relevant pixels are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.evaluation import (
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    perturbation_curve,
    substrate_like,
)


class PixelLinear(nn.Module):
    """Two classes: logit 0 = sum of ``weight * x[:, 0]`` (only a few pixels weigh), logit 1 = ``offset``."""

    def __init__(self, weight: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.weight).flatten(1).sum(1)
        return torch.stack([s, torch.full_like(s, self.offset)], dim=1)


def _few_pixel_model(offset: float = 0.0) -> PixelLinear:
    w = torch.zeros(8, 8)
    w[1, 2], w[5, 5], w[6, 1], w[3, 7] = 4.0, 3.0, 2.0, 1.0
    return PixelLinear(w, offset)


def _inputs(n: int = 6, side: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(n, 1, side, side, generator=g)


def test_exact_logit_deletion_curve_and_auc():
    w = torch.zeros(4, 4)
    w[0, 1], w[2, 2], w[3, 0], w[1, 3] = 4.0, 3.0, 2.0, 1.0
    model = PixelLinear(w)
    x = torch.ones(1, 1, 4, 4)
    curve = deletion_curve(model, x, w.view(1, 1, 4, 4) * x, target=0, n_steps=16, score="logit")
    expected = torch.tensor([10.0, 6.0, 3.0, 1.0] + [0.0] * 13)
    torch.testing.assert_close(curve.scores[0], expected)
    torch.testing.assert_close(curve.fractions, torch.arange(17) / 16)
    # trapezoid over steps of 1/16: (sum - (first + last) / 2) / 16 = (20 - 5) / 16
    assert curve.auc.item() == pytest.approx(15 / 16)
    # insertion from zeros puts the 4, 3, 2, 1 pixels back first
    ins = insertion_curve(model, x, w.view(1, 1, 4, 4), target=0, n_steps=16, score="logit", substrate="zeros")
    torch.testing.assert_close(ins.scores[0], torch.tensor([0.0, 4.0, 7.0, 9.0] + [10.0] * 13))


def test_true_ordering_beats_random_ordering():
    model = _few_pixel_model(offset=8.0)  # the clean logit is 10 to 15: probabilities are not saturated
    x = _inputs()
    true_map = model.weight * x  # Gradient x Input of the linear model: the exact contributions
    deletion = deletion_curve(model, x, true_map, target=0, n_steps=16)
    insertion = insertion_curve(model, x, true_map, target=0, n_steps=16, substrate="zeros")
    assert deletion.random_auc is not None and insertion.random_auc is not None
    assert (deletion.auc < deletion.random_auc).all()
    assert deletion.mean_auc < 0.5 * deletion.mean_random_auc
    assert (insertion.auc > insertion.random_auc).all()
    assert insertion.mean_auc > insertion.mean_random_auc + 0.1, (insertion.mean_auc, insertion.mean_random_auc)
    # the inverted map is worse than random, as it should be
    inverted = deletion_curve(model, x, -true_map, target=0, n_steps=16, random_control=False)
    assert inverted.random_auc is None and inverted.mean_auc > deletion.mean_random_auc


def test_curve_end_points():
    model = _few_pixel_model()
    x = _inputs(3)
    maps = torch.rand(3, 1, 8, 8)
    clean = model(x).softmax(1)[:, 0]
    deletion = deletion_curve(model, x, maps, target=0, n_steps=8)
    torch.testing.assert_close(deletion.scores[:, 0], clean)
    torch.testing.assert_close(deletion.scores[:, -1], torch.full((3,), 0.5))  # all zeros: logits equal
    insertion = insertion_curve(model, x, maps, target=0, n_steps=8)  # RISE's blur substrate
    torch.testing.assert_close(insertion.scores[:, -1], clean)
    torch.testing.assert_close(insertion.scores[:, 0], model(gaussian_blur(x)).softmax(1)[:, 0])
    torch.testing.assert_close(insertion.random_scores[:, [0, -1]], insertion.scores[:, [0, -1]])


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_chunked_equals_unchunked(mode):
    model = _few_pixel_model()
    x = _inputs(5)
    maps = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    full = perturbation_curve(model, x, maps, target=0, mode=mode, n_steps=10, batch_size=10_000)
    for batch_size in (1, 3, 7):
        chunked = perturbation_curve(model, x, maps, target=0, mode=mode, n_steps=10, batch_size=batch_size)
        torch.testing.assert_close(chunked.scores, full.scores)
        torch.testing.assert_close(chunked.random_scores, full.random_scores)
        torch.testing.assert_close(chunked.auc, full.auc)


def test_batch_equals_per_example_loop():
    model = _few_pixel_model()
    x = _inputs(4)
    maps = torch.rand(4, 1, 8, 8)
    batch = deletion_curve(model, x, maps, target=torch.tensor([0, 1, 0, 1]), n_steps=8, random_control=False)
    for i in range(4):
        one = deletion_curve(model, x[i : i + 1], maps[i : i + 1], target=i % 2, n_steps=8, random_control=False)
        torch.testing.assert_close(one.scores[0], batch.scores[i])


def test_pixels_pool_channels_and_move_together():
    # a 3-channel model that only looks at channel 2; the attribution's channel sum ranks the pixels
    w = torch.zeros(3, 2, 2)
    w[2, 0, 0] = 1.0

    class Model(nn.Module):
        def forward(self, x):
            s = (x * w).flatten(1).sum(1)
            return torch.stack([s, -s], 1)

    x = torch.ones(1, 3, 2, 2)
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0, 0, 0] = 5.0  # the pixel's evidence sits in another channel: still ranked first
    curve = deletion_curve(Model(), x, maps, target=0, n_steps=4, score="logit")
    torch.testing.assert_close(curve.scores[0], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    cam = deletion_curve(Model(), x, maps.sum(1, keepdim=True), target=0, n_steps=4, score="logit")
    torch.testing.assert_close(cam.scores, curve.scores)


def test_step_fraction_and_step_cap():
    model = PixelLinear(torch.ones(2, 2))
    x = torch.ones(1, 1, 2, 2)
    curve = deletion_curve(model, x, torch.rand(1, 1, 2, 2), target=0, step_fraction=0.5)
    assert curve.fractions.tolist() == [0.0, 0.5, 1.0]
    capped = deletion_curve(model, x, torch.rand(1, 1, 2, 2), target=0, n_steps=100)
    assert capped.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="either n_steps or step_fraction"):
        deletion_curve(model, x, x, target=0, n_steps=4, step_fraction=0.5)
    with pytest.raises(ValueError, match="step_fraction"):
        deletion_curve(model, x, x, target=0, step_fraction=0)


def test_substrates():
    x = torch.rand(2, 3, 6, 6)
    torch.testing.assert_close(substrate_like(x, "zeros"), torch.zeros_like(x))
    torch.testing.assert_close(substrate_like(x, "mean"), x.mean((2, 3), keepdim=True).expand_as(x))
    torch.testing.assert_close(substrate_like(x, torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)),
                               torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).expand_as(x))
    torch.testing.assert_close(substrate_like(x, lambda t: t * 2), x * 2)
    const = torch.full((1, 2, 7, 7), 0.7)
    torch.testing.assert_close(gaussian_blur(const), const)  # a normalized kernel keeps constants
    # interior pixels equal a direct 2-D convolution with the outer-product kernel
    g = torch.exp(-(torch.arange(5.0) - 2) ** 2 / 2)
    k2 = torch.outer(g, g) / g.sum() ** 2
    img = torch.rand(1, 1, 9, 9)
    direct = torch.nn.functional.conv2d(img, k2.view(1, 1, 5, 5))
    torch.testing.assert_close(gaussian_blur(img, sigma=1.0, kernel_size=5)[..., 2:-2, 2:-2], direct)
    with pytest.raises(ValueError, match="substrate must be one of"):
        substrate_like(x, "noise")
    with pytest.raises(ValueError, match=r"\(C, 1, 1\)"):
        substrate_like(x, torch.zeros(3))
    with pytest.raises(ValueError, match="inputs' shape"):
        substrate_like(x, lambda t: t[:1])
    with pytest.raises(ValueError, match="needs image inputs"):
        substrate_like(torch.rand(2, 5), "blur")
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        gaussian_blur(x, kernel_size=4)


def test_non_image_features():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
        model.bias.zero_()
    x = torch.ones(1, 4)
    curve = deletion_curve(model, x, model.weight[:1] * x, target=0, n_steps=4, score="logit")
    torch.testing.assert_close(curve.scores[0], torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]))
    mean = deletion_curve(model, x * torch.tensor([[1.0, 2.0, 3.0, 6.0]]), model.weight[:1], target=0, n_steps=4,
                          score="logit", substrate="mean")  # the example's mean is 3
    torch.testing.assert_close(mean.scores[0], torch.tensor([38.0, 26.0, 26.0, 28.0, 30.0]))


def test_seeded_private_randomness_and_global_rng_untouched():
    model = _few_pixel_model()
    x = _inputs(3)
    maps = torch.ones(3, 1, 8, 8)  # all tied: the tie-breaking order is random too
    state = torch.get_rng_state()
    a = deletion_curve(model, x, maps, target=0, n_steps=16, seed=3)
    b = deletion_curve(model, x, maps, target=0, n_steps=16, seed=3)
    c = deletion_curve(model, x, maps, target=0, n_steps=16, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.random_scores, b.random_scores)
    assert not torch.equal(a.random_scores, c.random_scores)
    # a constant map is no better than a random ordering: ties are broken at random, not top-left first
    assert not torch.equal(a.scores, a.random_scores)


def test_modes_restored_buffers_untouched_and_eval_mode_used():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(2 * 36, 3))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 6, 6)
    a = deletion_curve(model, x, torch.rand(4, 1, 6, 6), n_steps=6)
    b = deletion_curve(model, x, torch.rand(4, 1, 6, 6), n_steps=6)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(a.scores[:, 0], b.scores[:, 0])  # eval mode: no dropout noise
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(a.scores[:, 0], model(x).softmax(1).max(1).values)  # target None = prediction


def test_works_under_inference_mode():
    model = _few_pixel_model()
    x = _inputs(2)
    maps = model.weight * x
    expected = deletion_curve(model, x, maps, target=0, n_steps=8)
    with torch.inference_mode():
        got = deletion_curve(model, x.clone(), maps.clone(), target=0, n_steps=8)
    torch.testing.assert_close(got.scores, expected.scores)


def test_bad_arguments_raise_clear_errors():
    model = _few_pixel_model()
    x = _inputs(2)
    with pytest.raises(ValueError, match="do not match inputs"):
        deletion_curve(model, x, torch.rand(2, 1, 4, 4), target=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        perturbation_curve(model, x, x, target=0, mode="both")
    with pytest.raises(ValueError, match="score must be one of"):
        deletion_curve(model, x, x, target=0, score="prob")
    with pytest.raises(ValueError, match="batch_size"):
        deletion_curve(model, x, x, target=0, batch_size=0)
    with pytest.raises(ValueError, match="target class indices"):
        deletion_curve(model, x, x, target=5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deletion_curve(lambda t: t, x, x, target=0)
    with pytest.raises(ValueError, match="NaN"):
        deletion_curve(model, x, torch.full_like(x, float("nan")), target=0)
