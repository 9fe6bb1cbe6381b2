"""SignRegimes (regimes the router must infer) and the top-2 warm-up that finds them where top-1 training stalls.
The 10-seed NMI table is benchmarks/moe_regimes.py; here one short run of a seed that stalls without the warm-up."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from lightning_lens.datasets import SignRegimes
from lightning_lens.interpretable_models import MixtureOfExperts


def test_sign_regimes_are_the_sign_patterns_and_each_has_its_affine_map():
    train = SignRegimes("train", n=400, seed=3, features=5, outputs=2)
    assert train.x.shape == (400, 5) and train.y.shape == (400, 2) and len(train) == 400
    expected = torch.where(train.x[:, 0] > 0, 2, 0) + torch.where(train.x[:, 1] > 0, 1, 0)
    assert torch.equal(train.regime, expected)
    assert torch.bincount(train.regime, minlength=4).min() > 70  # about a quarter each
    for r in range(4):
        rows = train.regime == r
        # one affine map per regime, recovered exactly by least squares on that regime's samples
        design = torch.cat([train.x[rows], torch.ones(int(rows.sum()), 1)], dim=1).double()
        solution = torch.linalg.lstsq(design, train.y[rows].double()).solution
        assert torch.allclose(solution[:5].t().float(), train.weights[r], atol=1e-4)
        assert torch.allclose(solution[5].float(), train.biases[r], atol=1e-4)
    # the maps differ between regimes, so no single affine map fits the task
    assert (train.weights[0] - train.weights[1]).abs().max() > 0.1
    item = train[-1]
    assert torch.equal(item["x"], train.x[399]) and item["regime"] == int(train.regime[399]) and item["index"] == 399


def test_sign_regimes_splits_share_the_maps_and_are_reproducible():
    a, b = SignRegimes("train", n=50, seed=1), SignRegimes("test", n=50, seed=1)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.biases, b.biases)
    assert not torch.equal(a.x, b.x)
    assert torch.equal(SignRegimes("train", n=50, seed=1).y, a.y)
    assert not torch.equal(SignRegimes("train", n=50, seed=2).weights, a.weights)
    noisy = SignRegimes("train", n=50, seed=1, noise=0.5)
    assert torch.equal(noisy.x, a.x) and 0.2 < (noisy.y - a.y).std() < 0.8
    with pytest.raises(IndexError, match="out of range"):
        a[50]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(split="validation"), ValueError, "split must be one of"),
        (dict(n=0), ValueError, "n must be >= 1"),
        (dict(features=1), ValueError, "features must be >= 2"),
        (dict(noise=-0.1), ValueError, "noise must be >= 0.0"),
        (dict(noise="0.1"), TypeError, "noise must be a number"),
    ],
)
def test_sign_regimes_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SignRegimes(**kwargs)


def _routing_nmi(seed: int, steps: int, **kwargs) -> float:
    train, test = SignRegimes("train", n=4096, seed=seed), SignRegimes("test", n=2048, seed=seed)
    torch.manual_seed(seed)
    layer = MixtureOfExperts(8, 4, 4, k=1, expert=lambda: nn.Linear(8, 4), noise_seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, 4096, (256,), generator=gen)
        loss = F.mse_loss(layer(train.x[i]), train.y[i]) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad(), layer.recording():
        layer.eval()(test.x)
    return normalized_mutual_info_score(test.regime.numpy(), layer.last_routing.top1.numpy())


def test_top2_warm_up_finds_the_regimes_where_top1_training_stalls():
    # seed 4: top-1 routing splits the experts by x_0 only (NMI ~0.45, at 1,000 steps as at 400); renormalized top-2
    # gates in the first half let the router compare experts and find all four regimes
    stalled = _routing_nmi(4, steps=400)
    warmed = _routing_nmi(4, steps=400, warmup_k=2, warmup_steps=200)
    assert stalled < 0.6 and warmed > 0.8, (stalled, warmed)
