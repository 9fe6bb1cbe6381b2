"""Occlusion: Captum's oracles, a linear model, window and stride conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.attribution import Occlusion

from _attribution_helpers import conv_model_5x5, rows_of_every_forward


@pytest.mark.parametrize("batch_size", [1, 2, 3, None])
def test_captum_oracles_on_the_multilayer_model(multi_layer, batch_size):
    x = torch.tensor([[20.0, 50.0, 30.0]])
    occ = Occlusion(multi_layer, window=1, batch_size=batch_size)
    torch.testing.assert_close(occ.attribute(x, target=0), torch.tensor([[80.0, 200.0, 120.0]]))
    torch.testing.assert_close(occ.attribute(x, target=0, window=2, baseline=torch.tensor([10.0, 10.0, 10.0])),
                               torch.tensor([[200.0, 220.0, 240.0]]))
    torch.testing.assert_close(occ.attribute(x, target=0, window=2, stride=2), torch.tensor([[280.0, 280.0, 120.0]]))
    two = torch.tensor([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]])
    torch.testing.assert_close(occ.attribute(two, target=0), torch.tensor([[8.0, 35.0, 12.0], [80.0, 200.0, 120.0]]))


@pytest.mark.parametrize("batch_size", [1, 3, 7, None])
def test_captum_oracle_on_the_one_conv_model_with_full_window_shape(one_conv, batch_size):
    class PlusOne(nn.Module):  # Captum adds a second input of ones before the conv
        def __init__(self):
            super().__init__()
            self.net = one_conv()

        def forward(self, x):
            return self.net(x + 1)

    x = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    expected = torch.tensor([[17.0] * 4, [17.0] * 4, [64.0, 65.5, 65.5, 67.0], [64.0, 65.5, 65.5, 67.0]])
    occ = Occlusion(PlusOne(), window=(1, 2, 3), stride=(1, 2, 1), batch_size=batch_size)
    torch.testing.assert_close(occ.attribute(x, target=0), expected.view(1, 1, 4, 4))
    # the whole image in one window: every pixel gets the total drop
    whole = Occlusion(PlusOne(), window=(1, 4, 4)).attribute(x, target=0)
    torch.testing.assert_close(whole, torch.full((1, 1, 4, 4), 67.0))


def test_single_feature_occlusion_of_a_linear_model_is_the_contribution():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    targets = torch.tensor([0, 1, 2, 1])
    w = model.weight.detach()[targets]
    torch.testing.assert_close(Occlusion(model, window=1).attribute(x, target=targets), x * w)
    torch.testing.assert_close(Occlusion(model, window=1, baseline=0.5).attribute(x, target=targets), (x - 0.5) * w)
    # a window of 2 with stride 1 averages the two windows covering each inner feature
    contrib = x * w
    pairs = contrib[:, :-1] + contrib[:, 1:]  # drop of each window position
    expected = torch.empty_like(x)
    expected[:, 0], expected[:, -1] = pairs[:, 0], pairs[:, -1]
    expected[:, 1:-1] = (pairs[:, :-1] + pairs[:, 1:]) / 2
    torch.testing.assert_close(Occlusion(model, window=2, stride=1).attribute(x, target=targets), expected)


def test_int_window_covers_all_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(2, 2, 4, 4)
    occ = Occlusion(model)
    torch.testing.assert_close(occ.attribute(x, target=1, window=2, stride=2),
                               occ.attribute(x, target=1, window=(2, 2, 2), stride=(1, 2, 2)))
    torch.testing.assert_close(occ.attribute(x, target=1, window=(2, 2)), occ.attribute(x, target=1, window=2))
    # window 2, stride 2 on a linear model: each pixel gets the drop of its 2x2 block (all channels)
    w = model[1].weight.detach()[1].view(2, 4, 4)
    contrib = (x * w).sum(1, keepdim=True)
    block = torch.nn.functional.avg_pool2d(contrib, 2) * 4
    expected = block.repeat_interleave(2, 2).repeat_interleave(2, 3).expand_as(x)
    torch.testing.assert_close(occ.attribute(x, target=1, window=2, stride=2), expected)


def test_geometry_defaults_and_errors():
    occ = Occlusion(nn.Linear(3, 2))
    assert occ.geometry((3, 32, 32)) == ((3, 8, 8), (1, 4, 4), (1, 7, 7))
    assert occ.geometry((3,)) == ((3,), (1,), (1,))  # window clipped to the input, stride at least 1
    assert occ.geometry((1, 5, 5), window=2, stride=2)[2] == (1, 3, 3)  # last window cut by the border
    with pytest.raises(ValueError, match="window"):
        Occlusion(nn.Linear(3, 2), window=0)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(nn.Linear(3, 2), stride=(1, -1))
    with pytest.raises(ValueError, match="need 2 \\(spatial dims"):
        occ.geometry((3, 8, 8), window=(1, 2, 3, 4))
    with pytest.raises(TypeError, match="baseline"):
        Occlusion(nn.Linear(3, 2), baseline="black")
    with pytest.raises(ValueError, match="does not broadcast"):
        Occlusion(nn.Linear(3, 2), window=1).attribute(torch.rand(2, 3), baseline=torch.zeros(2))


def test_batch_splits_equal_the_unchunked_result():
    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    reference = Occlusion(model, window=(2, 2, 2), stride=(2, 1, 2), batch_size=10_000).attribute(x)
    for rows in (1, 4, 5, 6, 7, 13):
        out = Occlusion(model, window=(2, 2, 2), stride=(2, 1, 2), batch_size=rows).attribute(x)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget_rows", [1, 2, 4, 9])
def test_default_blocks_stay_within_the_element_budget_for_any_batch(budget_rows, monkeypatch):
    """Issue 19: the default splits the batch too (it used to hold at least one window of the whole batch), with the
    same result; the clean forward is split as well."""
    from lightning_lens.attribution import _batching

    model, x = conv_model_5x5(), torch.randn(6, 2, 5, 5)
    occlusion = Occlusion(model, window=(2, 2, 2), stride=(2, 1, 2))
    reference = Occlusion(model, window=(2, 2, 2), stride=(2, 1, 2), batch_size=10_000).attribute(x)
    monkeypatch.setattr(_batching, "DEFAULT_ELEMENT_BUDGET", budget_rows * x[0].numel())
    out, rows = rows_of_every_forward(model, lambda: occlusion.attribute(x))
    n_windows = 1
    for count in occlusion.geometry(x.shape[1:], (2, 2, 2), (2, 1, 2))[2]:
        n_windows *= count
    assert max(rows) <= budget_rows and sum(rows) == 6 * n_windows + 6
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
