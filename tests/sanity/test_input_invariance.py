"""input_invariance (Kindermans et al.): the shifted twin computes the model's function; verdicts per method."""

import copy

import pytest
import torch
from torch import nn

from lightning_lens.sanity import InputInvarianceReport, input_invariance, shifted_twin
from lightning_lens.testing import LinearModel, SmallCNN


def _cnn(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(width=4, **kwargs).eval()


@pytest.mark.parametrize("shift", [-1.0, 0.7])
def test_twin_of_a_padded_cnn_gives_the_same_outputs(shift):
    net, x = _cnn(), torch.rand(3, 1, 32, 32)
    twin, layer, s = shifted_twin(net, x, shift)
    assert layer == "features.0"
    torch.testing.assert_close(twin(x + s), net(x), atol=1e-5, rtol=0)


def test_zero_padding_needs_the_shifted_padding_value():
    # bias-only compensation is wrong at the borders of a zero-padded convolution: the twin pads with the shift
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x, s = torch.rand(2, 2, 6, 6), torch.tensor([-1.0, 0.5]).view(2, 1, 1)
    naive = copy.deepcopy(conv)
    with torch.no_grad():
        naive.bias -= (conv.weight * s).sum(dim=(1, 2, 3))
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(naive(x + s)[interior], conv(x)[interior], atol=1e-5, rtol=0)
    assert (naive(x + s) - conv(x)).abs().max() > 1e-2  # the borders differ
    twin, _, s2 = shifted_twin(conv, x, [-1.0, 0.5])
    torch.testing.assert_close(twin(x + s2), conv(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5)),
    lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3, padding_mode="reflect"), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 8 * 8, 5)),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding="valid"), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7), nn.ReLU(), nn.Linear(7, 5)),
])
def test_twin_with_per_channel_shift_matches(make):
    torch.manual_seed(1)
    net, x = make(), torch.rand(4, 3, 8, 8)
    twin, _, s = shifted_twin(net, x, [-1.0, 0.25, 2.0])
    torch.testing.assert_close(twin(x + s), net(x), atol=1e-5, rtol=0)


def test_verdicts_on_a_small_cnn_gradient_passes_reference_point_methods_fail():
    net, x = _cnn(), torch.rand(4, 1, 32, 32)
    before = copy.deepcopy(net.state_dict())
    methods = {"gradient": "gradient", "gradient_x_input": "gradient_x_input",
               "ig_zero": ("integrated_gradients", {"n_steps": 16}),
               "ig_shifted": ("integrated_gradients", {"n_steps": 16})}
    report = input_invariance(net, x, methods=methods, shift=-1.0, shift_baselines=["ig_shifted"])
    assert isinstance(report, InputInvarianceReport)
    outcomes = {name: v.outcome for name, v in report.verdicts.items()}
    assert outcomes == {"gradient": "passes", "gradient_x_input": "fails", "ig_zero": "fails", "ig_shifted": "passes"}
    assert report.output_difference < 1e-9  # float64 copies
    assert report.shifted_baselines == ["ig_shifted"]
    assert report.differences["gradient"].max() < 1e-9
    assert report.differences["ig_shifted"].max() < 1e-6
    assert report.differences["gradient_x_input"].min() > 0.1
    # the maps kept are the ones compared; the model is untouched
    torch.testing.assert_close(report.maps["gradient"][0], report.maps["gradient"][1], atol=1e-6, rtol=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert "ig_shifted passes" in report.summary()
    columns, rows = report.to_table()
    assert columns[:3] == ["method", "verdict", "max relative difference"] and len(rows) == 4


def test_shift_baselines_true_shifts_every_baseline_method():
    net, x = _cnn(), torch.rand(3, 1, 32, 32)
    report = input_invariance(net, x, methods=[("integrated_gradients", {"n_steps": 8, "baseline": 0.2})],
                              shift_baselines=True)
    assert report.verdicts["integrated_gradients"].outcome == "passes"


def test_gradient_x_input_difference_on_a_linear_model_is_exact():
    model = LinearModel(4, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    report = input_invariance(model, x, target=1, methods="gradient_x_input", shift=-1.0)
    w = model.linear.weight[1].detach().double()
    # a = w * x, a' = w * (x - 1): max |a - a'| / max |a| = max |w| / max |w * x|
    expected = float(w.abs().max() / (w * x[0].double()).abs().max())
    assert report.differences["gradient_x_input"].item() == pytest.approx(expected, rel=1e-6)
    assert report.verdicts["gradient_x_input"].outcome == "fails"


def test_bad_arguments_name_the_argument():
    net, x = _cnn(), torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="shift has 3 values"):
        input_invariance(net, x, methods="gradient", shift=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="shift must be"):
        input_invariance(net, x, methods="gradient", shift="one")
    with pytest.raises(ValueError, match="shift_baselines: 'gradient' has no baseline"):
        input_invariance(net, x, methods="gradient", shift_baselines=["gradient"])
    with pytest.raises(ValueError, match="shift_baselines names"):
        input_invariance(net, x, methods="gradient", shift_baselines=["ig"])
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        input_invariance(net, x, methods="gradient", tolerance=-1.0)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x / 255.0)


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) + x[:, :2]


def test_models_whose_shift_cannot_be_compensated_are_refused():
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="does not receive the inputs unchanged"):
        input_invariance(_Scaled(), x, methods="gradient")
    with pytest.raises(ValueError, match="outputs differ from the model's"):
        input_invariance(_Skip(), x, methods="gradient")
    with pytest.raises(ValueError, match="is a BatchNorm1d"):
        input_invariance(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval(), x, methods="gradient")
