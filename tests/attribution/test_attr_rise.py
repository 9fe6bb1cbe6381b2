"""RISE: the paper's estimator from the masks, mass on the region a toy model looks at, batching and seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import RISE, get_method


class PatchModel(nn.Module):
    """Class 0's logit is the mean of a 4x4 patch minus the image mean; class 1's is its negative."""

    def __init__(self, rows: slice = slice(2, 6), cols: slice = slice(8, 12)) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * (x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3)))
        return torch.stack([score, -score], dim=1)


def test_estimator_is_the_papers_normalized_sum_over_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    method = RISE(model, n_masks=30, grid_size=3, probability=0.4, softmax=False, seed=5)
    masks = method.masks(30, 6, 6, seed=5).slice(0, 30)  # (N, H, W)
    assert masks.shape == (30, 6, 6) and masks.min() >= 0 and masks.max() <= 1
    expected = torch.zeros(2, 6, 6)
    for i in range(30):  # S = 1 / (N p) sum_i f_c(x * M_i) M_i
        scores = model(x * masks[i]).detach()[:, 2]
        expected += scores[:, None, None] * masks[i]
    expected /= 30 * 0.4
    torch.testing.assert_close(method.attribute(x, target=2), expected.unsqueeze(1), rtol=1e-5, atol=1e-6)
    # softmax=True weights by the class probability
    probs = RISE(model, n_masks=30, grid_size=3, probability=0.4, seed=5).attribute(x, target=2)
    expected_p = sum(model(x * masks[i]).softmax(1).detach()[:, 2, None, None] * masks[i] for i in range(30)) / 12.0
    torch.testing.assert_close(probs, expected_p.unsqueeze(1), rtol=1e-5, atol=1e-6)


def test_masks_are_smooth_shifted_and_keep_the_probability():
    masks = RISE(nn.Linear(1, 1), grid_size=4, probability=0.25).masks(400, 16, 16, seed=0).slice(0, 400)
    assert 0.2 < float(masks.mean()) < 0.3  # E[M] = p
    values = masks.unique()
    assert len(values) > 10  # bilinear upsampling: not binary
    assert not torch.equal(masks[0], masks[1])


def test_most_mass_lies_on_the_patch_the_model_reads():
    model = PatchModel()
    x = torch.ones(2, 1, 16, 16)
    x[1] = 0.5 + torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    rise = RISE(model, n_masks=1000, grid_size=8, softmax=False, seed=0)  # cells of 2x2 pixels
    sal = rise.attribute(x, target=0)[:, 0]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[2:6, 8:12] = True  # 1/16 of the image
    near = torch.zeros(16, 16, dtype=torch.bool)
    near[0:8, 6:14] = True  # the patch and one mask cell around it (smooth masks correlate neighbours): 1/4
    positive = sal.clamp(min=0)
    total = positive.flatten(1).sum(1)
    assert (positive[:, inside].sum(1) / total > 0.5).all()
    assert (positive[:, near].sum(1) / total > 0.9).all()
    top = sal.flatten(1).topk(16).indices
    assert inside.flatten()[top].all()  # the 16 most salient pixels are the patch's 16
    # class 1 (the negated score) puts its negative mass there instead
    sal1 = rise.attribute(x, target=1)[:, 0]
    assert (sal1[:, inside].mean(1) < sal1[:, ~inside].mean(1)).all()


def test_batch_equals_loop_and_chunked_equals_unchunked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 4, 2, 1, 3])
    method = RISE(model, n_masks=23, grid_size=3, seed=1)
    reference = method.attribute(x, target=target, batch_size=10_000)
    for rows in (1, 3, 7, 11):  # below, between and above the batch of 5, not multiples of it
        torch.testing.assert_close(method.attribute(x, target=target, batch_size=rows), reference, rtol=1e-5, atol=1e-6)
    looped = torch.cat([method.attribute(x[i : i + 1], target=int(target[i])) for i in range(5)])
    torch.testing.assert_close(looped, reference, rtol=1e-5, atol=1e-6)


def test_seeds_and_the_global_rng():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(2, 1, 4, 4)
    state = torch.get_rng_state()
    a = RISE(model, n_masks=10, seed=1).attribute(x, target=0)
    assert torch.equal(a, RISE(model, n_masks=10, seed=1).attribute(x, target=0))
    assert not torch.equal(a, RISE(model, n_masks=10, seed=2).attribute(x, target=0))
    fresh = RISE(model, n_masks=10, seed=None)
    assert not torch.equal(fresh.attribute(x, target=0), fresh.attribute(x, target=0))
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_input_and_options():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, channels, height, width\)"):
        RISE(model, n_masks=5).attribute(torch.rand(2, 16), target=0)
    with pytest.raises(ValueError, match="probability must be > 0"):
        RISE(model, probability=0.0)
    with pytest.raises(ValueError, match="n_masks must be >= 1"):
        RISE(model, n_masks=0)
    with pytest.raises(ValueError, match="n_masks must be >= 1"):
        RISE(model).attribute(torch.rand(1, 1, 4, 4), n_masks=0)
    assert get_method("rise", model, n_masks=7).n_masks == 7 and RISE.produces_map


def test_a_single_score_model_is_weighted_by_its_sigmoid_probability():
    # regression: softmax over one score is 1 for every mask, so the map was the mean mask whatever the model
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    one_logit = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    maps = RISE(one_logit, n_masks=40, grid_size=4).attribute(x)
    assert not torch.allclose(maps, RISE(other, n_masks=40, grid_size=4).attribute(x))
    probability = nn.Sequential(one_logit, nn.Sigmoid())
    torch.testing.assert_close(maps, RISE(probability, n_masks=40, grid_size=4, softmax=False).attribute(x))
