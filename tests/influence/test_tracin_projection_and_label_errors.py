"""The random projection against exact scores, and self-influence finding planted label errors on SpuriousDigits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.datasets import SpuriousDigits
from lightning_lens.influence import TracInCP, TracInCPFast, precision_at_k


@pytest.fixture(scope="module")
def trajectory():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # 2410 gradient coordinates
    gen = torch.Generator().manual_seed(0)
    checkpoints = []
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        checkpoints.append({k: v.clone() for k, v in net.state_dict().items()})
    x, y = torch.randn(80, 64, generator=gen), torch.randint(0, 10, (80,), generator=gen)
    exact = TracInCP(net, checkpoints, 0.1)
    return net, checkpoints, x, y, exact.influence(x[:10], y[:10], x, y), exact.self_influence(x, y)


def errors(net, checkpoints, x, y, influence, self_influence, k, seed=0):
    projected = TracInCP(net, checkpoints, 0.1, projection_dim=k, seed=seed)
    got = projected.influence(x[:10], y[:10], x, y)
    got_self = projected.self_influence(x, y)
    relative_self = (got_self - self_influence).abs() / self_influence
    return float((got - influence).norm() / influence.norm()), float(relative_self.median()), got


def test_projection_error_against_exact_scores_shrinks_with_the_dimension(trajectory):
    net, checkpoints, x, y, influence, self_influence = trajectory
    by_dim = {k: errors(net, checkpoints, x, y, influence, self_influence, k) for k in (64, 256, 2048)}
    frobenius = [by_dim[k][0] for k in (64, 256, 2048)]
    assert frobenius[0] > frobenius[1] > frobenius[2]
    # a JL projection to k dimensions errs by about sqrt(2 / k) on squared norms, more on small dot products
    assert by_dim[2048][0] < 0.25 and by_dim[2048][1] < 0.05
    assert by_dim[64][1] < 0.3
    projected = TracInCP(net, checkpoints, 0.1, projection_dim=256)
    assert [f.shape for f in projected.prepare(x[:3], y[:3]).features[0]] == [(3, 256)]  # held per test example


def test_projection_is_unbiased_and_reproducible(trajectory):
    net, checkpoints, x, y, influence, self_influence = trajectory
    single = errors(net, checkpoints, x, y, influence, self_influence, 256, seed=0)
    again = errors(net, checkpoints, x, y, influence, self_influence, 256, seed=0)
    assert torch.equal(single[2], again[2])  # the private generator: same seed, same projection
    averaged = torch.stack([errors(net, checkpoints, x, y, influence, self_influence, 256, seed=s)[2]
                            for s in range(8)]).mean(0)
    # independent unbiased estimates: the mean of 8 errs about sqrt(8) times less than one
    assert float((averaged - influence).norm() / influence.norm()) < 0.6 * single[0]


@pytest.fixture(scope="module")
def flipped_digits():
    """400 SpuriousDigits (average-pooled to 8x8) with 10 % of the labels flipped, and an MLP trained on them with
    SGD, a checkpoint every 5 of 30 epochs."""
    data = SpuriousDigits("train", seed=0)
    n = 400
    x = F.avg_pool2d(data.images[:n], 4)
    y = data.labels[:n].clone()
    gen = torch.Generator().manual_seed(0)
    flip = torch.randperm(n, generator=gen)[: n // 10]
    y[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[flip] = True
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    checkpoints = []
    for epoch in range(30):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 50):
            batch = order[i : i + 50]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 5 == 0:
            checkpoints.append({k: v.clone() for k, v in net.state_dict().items()})
    return net, checkpoints, x, y, flipped


def test_self_influence_ranks_flipped_labels_first(flipped_digits):
    net, checkpoints, x, y, flipped = flipped_digits
    chance = int(flipped.sum()) / len(flipped)
    exact = precision_at_k(TracInCP(net, checkpoints, 0.5).self_influence(x, y), flipped)
    fast = precision_at_k(TracInCPFast(net, "3", checkpoints, 0.5).self_influence(x, y), flipped)
    loss = F.cross_entropy(net(x), y, reduction="none").detach()
    assert chance == 0.1
    assert exact >= 0.8 and fast >= 0.8  # 40 flipped among 400: precision at 40 (measured: 0.975 and 1.0)
    assert precision_at_k(loss, flipped) <= max(exact, fast)  # the last checkpoint's loss alone is no better
