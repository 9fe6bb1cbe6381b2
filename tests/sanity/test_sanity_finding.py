"""Adebayo et al.'s finding on the demo CNN trained on SpuriousDigits: Gradient depends on the weights, Guided
Backprop does not (in the upper layers); plus the random-logit and eMPRT tests on the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_lens.datasets import SpuriousDigits
from lightning_lens.sanity import cascading_randomization, efficient_mprt, random_logit
from lightning_lens.testing import SmallCNN


def _tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = SpuriousDigits(split, seed=0)
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@pytest.fixture(scope="module")
def trained() -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    """SmallCNN(width=8) trained 3 epochs with plain torch (about 3 s); 16 validation probes, two per class."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = _tensors("train")
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = SmallCNN(width=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(3):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), 64):
                idx = order[start : start + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        xv, yv = _tensors("val")
        with torch.no_grad():
            train_acc = (model(x).argmax(dim=1) == y).float().mean().item()
        assert train_acc > 0.9  # it learned (validation has misleading shortcut squares, so it is lower)
        picked = torch.cat([torch.nonzero(yv == c)[:2, 0] for c in range(10)])[:16]
        return model, xv[picked], yv[picked]
    finally:
        torch.set_num_threads(threads)


def test_gradient_passes_guided_backprop_fails(trained):
    model, x, y = trained
    report = cascading_randomization(model, x, y, ["gradient", "guided_backprop"], seed=0)
    print("\n" + report.summary())
    grad = report.curve("gradient", "spearman_signed")
    gbp = report.curve("guided_backprop", "spearman_signed")
    upper = report.rule.num_stages(report.num_stages)  # the upper half of the network: 3 of 6 stages
    assert report.stages[:upper] == ["classifier.3", "classifier.1", "features.7"]
    # Gradient's signed rank correlation collapses once the top layer is randomized ...
    assert abs(grad[1]) < 0.4
    assert grad[1 : upper + 1].abs().mean() < 0.2
    # ... while Guided Backprop's stays high through the upper layers
    assert (gbp[1 : upper + 1] > 0.8).all()
    assert (gbp[1 : upper + 1] - grad[1 : upper + 1].abs() > 0.5).all()
    verdicts = report.verdicts
    assert verdicts["gradient"].outcome == "passes"
    assert verdicts["guided_backprop"].outcome == "fails"
    assert verdicts["edge"].outcome == "fails" and verdicts["random"].outcome == "inconclusive"
    # randomizing everything finally changes Guided Backprop too (the v3 erratum: not *completely* invariant)
    assert gbp[-1] < gbp[1]


def test_random_logit_flags_guided_backprop(trained):
    model, x, y = trained
    result = random_logit(model, x, y, ["gradient", "guided_backprop"], seed=0)
    print("\n" + result.summary())
    assert result.verdicts["gradient"].outcome == "passes"
    assert result.verdicts["guided_backprop"].outcome == "fails"  # class-insensitive (Sixt et al. 2020)


def test_efficient_mprt_entropy_rises_for_gradient(trained):
    model, x, y = trained
    result = efficient_mprt(model, x, y, ["gradient", "edge"])
    print("\n" + result.summary())
    assert result.score("gradient") > 0.05 and result.verdicts()["gradient"] == "passes"
    assert result.score("edge") == 0.0
    # the fully randomized model is close to uniform over the 10 classes
    assert result.model_entropy_randomized.median() > result.model_entropy_original.median()
