"""Training behaviour on synthetic tasks with known answers: routing finds the true regimes; the balance loss
prevents the rich-get-richer collapse that happens without it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.interpretable_models.moe import routing_statistics

REGIMES, DIM = 4, 4
# y = <w_r, u> with a different linear map per regime r
WEIGHTS = torch.tensor([[3.0, -2, 1, 0.5], [-3, 1, 2, -1], [1, 3, -2, 2], [-1, -3, -1, -2]]) / 3


class LinearOnFeatures(nn.Module):
    """An expert that is linear in ``u`` and cannot see the regime indicator: it can fit exactly one regime."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[:, REGIMES:])


def _regime_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``[one_hot(regime), u]``, targets ``<w_regime, u>``, and the regime (the ground truth for routing)."""
    regime = torch.randint(0, REGIMES, (n,), generator=gen)
    u = torch.randn(n, DIM, generator=gen)
    x = torch.cat([F.one_hot(regime, REGIMES).float(), u], dim=1)
    return x, (u * WEIGHTS[regime]).sum(1, keepdim=True), regime


def _train(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, lr: float = 1e-2) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = F.mse_loss(layer(x[i]), y[i]) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("seed", [0, 1])
def test_routing_recovers_the_true_regimes(seed):
    gen = torch.Generator().manual_seed(seed)
    x, y, _ = _regime_data(2048, gen)
    x_test, y_test, regime_test = _regime_data(1024, gen)
    torch.manual_seed(seed)
    layer = MixtureOfExperts(REGIMES + DIM, 1, num_experts=4, k=2, expert=LinearOnFeatures, noise_seed=seed)
    _train(layer, x, y, steps=400, seed=seed)
    layer.eval()
    with torch.no_grad(), layer.recording():
        mse = F.mse_loss(layer(x_test), y_test).item()
        stats = routing_statistics(layer.last_routing.experts, 4, labels=regime_test)
    assert stats.nmi >= 0.8, (stats.nmi, stats.expert_class_counts)
    assert stats.mean_purity >= 0.9
    assert mse < 0.05 * y_test.var().item()  # and the experts fit their regimes


def _offset_data(n: int, gen: torch.Generator, offset: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One smooth function of features with a non-zero mean (as hidden activations have): no regimes at all."""
    u = torch.randn(n, 8, generator=gen) + offset
    return u, torch.sin(u[:, :2].sum(1, keepdim=True)) + 0.5 * u[:, 2:3]


def test_balance_loss_prevents_routing_collapse():
    stats = {}
    for weight in (0.0, 0.1):
        gen = torch.Generator().manual_seed(0)
        x, y = _offset_data(2048, gen)
        x_test, _ = _offset_data(1024, gen)
        torch.manual_seed(0)
        layer = MixtureOfExperts(8, 1, num_experts=8, k=2, hidden_features=32, noisy_gating=False,
                                 balance_loss_weight=weight)
        _train(layer, x, y, steps=200, seed=0)
        with torch.no_grad(), layer.recording():
            layer.eval()(x_test)
            stats[weight] = routing_statistics(layer.last_routing.experts, 8)
    collapsed, balanced = stats[0.0], stats[0.1]
    # without the loss one expert wins most tokens (rich get richer); with it the load stays spread
    assert collapsed.max_top1_share > 0.6 and collapsed.load_cv > 1.0, collapsed
    assert balanced.max_top1_share < 0.35 and balanced.load_cv < 0.5, balanced
    assert balanced.usage_entropy > 0.9 > collapsed.usage_entropy


def _no_regime_routing(offset: float, steps: int, **kwargs) -> "RoutingStatistics":
    gen = torch.Generator().manual_seed(0)
    x, y = _offset_data(2048, gen, offset)
    x_test, _ = _offset_data(1024, gen, offset)
    torch.manual_seed(0)
    layer = MixtureOfExperts(8, 1, num_experts=8, k=2, hidden_features=32, noisy_gating=False, **kwargs)
    _train(layer, x, y, steps=steps, seed=0)
    with torch.no_grad(), layer.recording():
        layer.eval()(x_test)
        return routing_statistics(layer.last_routing.experts, 8)


def test_default_balance_weight_prevents_the_collapse_that_switchs_weight_leaves():
    # offset 3: every input shares a large mean, so one router direction wins every token unless the balance loss
    # pushes back; the same run at Switch's 0.01 (the former default) ends collapsed
    default = _no_regime_routing(3.0, steps=300)
    assert default.load_cv < 0.5 and default.max_top1_share < 0.4, default
    switch = _no_regime_routing(3.0, steps=300, balance_loss_weight=0.01)
    assert switch.load_cv > 0.9 and switch.max_top1_share > 0.5, switch
