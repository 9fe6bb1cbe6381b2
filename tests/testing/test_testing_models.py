"""The shipped test models: structure of the demo CNN and the hand-computed oracles their docstrings promise."""

import importlib

import pytest
import torch
from torch import nn

import lightning_lens.testing as testing
from lightning_lens.testing.models import (
    DifferenceReLUModel,
    LinearModel,
    MixedReLUModel,
    MultiLayerModel,
    OneConvReLUModel,
    OneMinusReLUModel,
    SmallCNN,
)


def test_every_export_resolves():
    for name, module in testing._EXPORTS.items():
        assert getattr(testing, name) is getattr(importlib.import_module(f".{module}", "lightning_lens.testing"), name)


def test_small_cnn_layout():
    net = SmallCNN(in_channels=3, num_classes=7, width=8)
    layers = list(net.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert convs == [0, 2, 5, 7]
    for i in convs:  # every conv is 3x3, padding 1, followed by a non-inplace nn.ReLU
        assert layers[i].kernel_size == (3, 3) and layers[i].padding == (1, 1)
        assert isinstance(layers[i + 1], nn.ReLU) and not layers[i + 1].inplace
    assert [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)] == [4, 9]
    assert [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [8, 8, 16, 16]
    assert net(torch.rand(5, 3, 32, 32)).shape == (5, 7)
    assert all(m.inplace for m in SmallCNN(inplace=True).modules() if isinstance(m, nn.ReLU))


def test_small_cnn_other_input_size_and_clear_errors():
    assert SmallCNN(input_size=16)(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size"):
        SmallCNN()(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="in_channels"):
        SmallCNN()(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        SmallCNN(input_size=30)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=0)


def _input_grad(model, x, target):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def test_linear_model_gradient_is_the_weight_row():
    m = LinearModel(12, 3)
    x = torch.randn(2, 3, 2, 2)
    grad = _input_grad(m, x, 2)
    assert torch.equal(grad, m.linear.weight[2].detach().view(1, 3, 2, 2).expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="weight must have shape"):
        LinearModel(4, 2, weight=torch.ones(3, 4))


X16 = torch.arange(16.0).view(1, 1, 4, 4)


def test_one_conv_forward_and_gradient():
    m = OneConvReLUModel()
    assert m(X16).tolist() == [[54.0] * 4]
    assert m.relu1(m.conv1(X16)).tolist() == [[[[0.0, 4.0], [31.0, 40.0]], [[0.0, 0.0], [6.0, 15.0]]]]
    # Active units: channel 0 at windows 1, 2, 3 (fc weight +1), channel 1 at windows 2, 3 (fc weight -1): only the
    # top-right 3x3 window survives.
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 0:3, 1:4] = 1.0
    assert torch.equal(_input_grad(m, X16, 0), expected)


def _relu_rule_grad(model, rule):
    """Input gradient with every nn.ReLU's backward replaced by ``rule(grad_input, grad_output)``."""
    handles = [
        m.register_full_backward_hook(lambda mod, gin, gout: (rule(gin[0], gout[0]),))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        return _input_grad(model, X16, 0)[0, 0]
    finally:
        for h in handles:
            h.remove()


def test_one_conv_published_guided_backprop_and_deconvnet_oracles():
    guided = _relu_rule_grad(OneConvReLUModel(), lambda gin, gout: gin.clamp(min=0))
    assert guided.tolist() == [[0, 1, 1, 1], [1, 3, 3, 2], [1, 3, 3, 2], [1, 2, 2, 1]]
    deconv = _relu_rule_grad(OneConvReLUModel(), lambda gin, gout: gout.clamp(min=0))
    assert deconv.tolist() == [[2, 3, 3, 1], [3, 5, 5, 2], [3, 5, 5, 2], [1, 2, 2, 1]]


def test_one_minus_relu_gradient():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0, -1.0, 7.0]])
    assert _input_grad(OneMinusReLUModel(), x, slice(None)).tolist() == [[0, 0, 0, 1, 1, 0]]


def test_difference_relu_integrated_gradients_oracle():
    m = DifferenceReLUModel()
    x = torch.tensor([[3.0, 1.0]])
    n = 2000
    alphas = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # midpoint Riemann sum
    path = (alphas[:, None] * x).requires_grad_(True)
    (grads,) = torch.autograd.grad(m(path).sum(), path)
    ig = x * grads.mean(0, keepdim=True)
    assert torch.allclose(ig, torch.tensor([[1.5, -0.5]]), atol=1e-3)
    assert torch.allclose(ig.sum(), m(x).sum() - m(torch.zeros_like(x)).sum(), atol=1e-3)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        m(torch.zeros(1, 3))


def test_multilayer_occlusion_oracle():
    m = MultiLayerModel().requires_grad_(False)
    x = torch.tensor([[20.0, 50.0, 30.0]])
    base = m(x)[0, 0]
    drops = []
    for i in range(3):
        occluded = x.clone()
        occluded[0, i] = 0.0
        drops.append(float(base - m(occluded)[0, 0]))
    assert base.item() == 392.0
    assert drops == [80.0, 200.0, 120.0]


def test_mixed_relu_styles_agree():
    mixed, modules = MixedReLUModel("mixed"), MixedReLUModel("modules")
    assert sum(isinstance(m, nn.ReLU) for m in mixed.modules()) == 1  # the rest are functional
    assert sum(isinstance(m, nn.ReLU) for m in modules.modules()) == 4
    x = torch.linspace(-2, 2, 40).view(10, 4)
    out = mixed(x)
    assert torch.equal(out, modules(x))
    assert (out != 0).all()  # the last layer has no ReLU: every logit carries gradient
    for target in range(3):
        assert torch.equal(_input_grad(mixed, x, target), _input_grad(modules, x, target))
    with pytest.raises(ValueError, match="relu_style"):
        MixedReLUModel("functional")
