"""explanation_fragility (Ghorbani et al. 2019): the top-k attack against a random perturbation of the same size."""

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_lens.evaluation import FragilityResult, explanation_fragility
from lightning_lens.evaluation.fragility import softplus_surrogate
from lightning_lens.testing import LinearModel, SmallCNN


@pytest.fixture(scope="module")
def digits_cnn():
    """The demo CNN trained briefly on sklearn's 8x8 digits (about 75 % test accuracy), and 16 held-out digits."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = SmallCNN(width=8, hidden=32, input_size=8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(1700, generator=g)
        for i in range(0, 1700, 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval(), x[-16:]


def test_attack_moves_gradient_top_k_far_more_than_random_noise_with_the_label_kept(digits_cnn):
    net, probes = digits_cnn
    before = copy.deepcopy(net.state_dict())
    rng = torch.random.get_rng_state()
    result = explanation_fragility(net, probes, method="gradient", epsilon=0.2, n_steps=20, top_k=6, seed=0)
    assert isinstance(result, FragilityResult)
    means = result.means()
    assert bool(result.label_kept_attack.all())
    with torch.no_grad():
        assert torch.equal(net(result.perturbed).argmax(1), net(probes).argmax(1))
    # the attack lowers the top-k intersection well below what random noise of the same size does
    assert means["topk_attack"] < means["topk_random"] - 0.2, means
    assert means["topk_attack"] < 0.75 * means["topk_random"], means
    assert result.verdict.outcome == "fails"
    # bounded: within epsilon of the inputs and inside the inputs' range
    assert float(result.linf.max()) <= 0.2 + 1e-6
    assert float(result.perturbed.min()) >= float(probes.min()) - 1e-7
    assert float(result.perturbed.max()) <= float(probes.max()) + 1e-7
    # the model, its gradients and the global RNG are untouched
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())
    columns, rows = result.to_table()
    assert [r[1] for r in rows] == ["attack", "random"]
    assert rows[0][3] == pytest.approx(means["topk_attack"])


def test_an_input_independent_explanation_cannot_be_attacked():
    # the gradient of a linear model is its weight row: the attack has no gradient and nothing moves
    model = LinearModel(16, 3)
    x = torch.rand(4, 16)
    result = explanation_fragility(model, x, method="gradient", epsilon=0.1, n_steps=3, top_k=4)
    assert result.zero_gradient_steps == 3
    assert torch.equal(result.perturbed, x)
    assert result.topk_attack.tolist() == [1.0] * 4 and result.topk_random.tolist() == [1.0] * 4
    assert result.verdict.outcome == "passes"


class _FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_functional_relus_keep_zero_second_derivatives_and_are_reported():
    torch.manual_seed(0)
    result = explanation_fragility(_FunctionalReLU(), torch.rand(3, 6), epsilon=0.1, n_steps=2, top_k=2)
    assert result.zero_gradient_steps == 2
    assert "F.relu" in result.summary()


def test_softplus_surrogate_replaces_relu_modules_on_a_copy():
    net = SmallCNN(width=2, input_size=8)
    surrogate, count = softplus_surrogate(net, beta=7.0)
    assert count == 5
    assert sum(isinstance(m, nn.Softplus) for m in surrogate.modules()) == 5
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 5
    assert all(m.beta == 7.0 for m in surrogate.modules() if isinstance(m, nn.Softplus))


def test_gradient_x_input_and_explain_functions_are_attacked_too(digits_cnn):
    net, probes = digits_cnn

    def explain(model, x, target):  # keeps the graph: differentiable in x
        leaf = x if x.requires_grad else x.detach().requires_grad_(True)
        score = model(leaf).gather(1, target.view(-1, 1)).sum()
        return torch.autograd.grad(score, leaf, create_graph=True)[0]

    custom = explanation_fragility(net, probes[:4], method=explain, epsilon=0.2, n_steps=3, top_k=6)
    built_in = explanation_fragility(net, probes[:4], method="saliency", epsilon=0.2, n_steps=3, top_k=6)
    assert custom.method == "explain" and built_in.method == "gradient"
    torch.testing.assert_close(custom.topk_attack, built_in.topk_attack)
    gxi = explanation_fragility(net, probes[:4], method="gradient_x_input", epsilon=0.2, n_steps=3, top_k=6)
    assert bool(gxi.label_kept_attack.all())


def test_bad_arguments():
    model, x = LinearModel(4, 2), torch.rand(2, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        explanation_fragility(model, x, method="gradcam")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        explanation_fragility(model, x, epsilon=0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        explanation_fragility(model, x, top_k=0)
    with pytest.raises(ValueError, match="input_range must have low < high"):
        explanation_fragility(model, x, input_range=(1.0, 0.0))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        explanation_fragility("model", x)
