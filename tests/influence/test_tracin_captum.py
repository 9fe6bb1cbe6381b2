"""Equality with Captum's TracInCP and TracInCPFast on the same checkpoints and data (skipped without Captum)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_lens.influence import TracInCP, TracInCPFast

captum_influence = pytest.importorskip(
    "captum.influence", reason="captum is not installed: pip install captum to compare TracIn with Captum's"
)

LRS = [0.1, 0.05, 0.02]


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def load_into(model: nn.Module, path: str) -> float:
    """Captum's checkpoints_load_func: load the weights, return the learning rate."""
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["state_dict"])
    return saved["learning_rate"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracin_captum")
    torch.manual_seed(0)
    net = make_mlp()
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i, lr in enumerate(LRS):
        with torch.no_grad():  # three points along a "trajectory"
            for p in net.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        paths.append(str(root / f"checkpoint_{i}.pt"))
        torch.save({"state_dict": net.state_dict(), "learning_rate": lr}, paths[-1])
    x, y = torch.randn(50, 10, generator=gen), torch.randint(0, 5, (50,), generator=gen)
    x_test, y_test = torch.randn(6, 10, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    return paths, x, y, x_test, y_test


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def captum_tracincp(paths, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum_influence.TracInCP(
            make_mlp(), TensorDataset(x, y), paths, checkpoints_load_func=load_into,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=16, sample_wise_grads_per_batch=True,
        )


def test_influence_and_self_influence_equal_captums_tracincp(setup):
    paths, x, y, x_test, y_test = setup
    reference = captum_tracincp(paths, x, y)
    ours = TracInCP(make_mlp(), paths, None, batch_size=16)  # learning rates read from the files
    assert ours.learning_rates == LRS
    assert relative_error(ours.influence(x_test, y_test, x, y), reference.influence((x_test, y_test))) <= 1e-4
    assert relative_error(ours.self_influence(x, y), reference.self_influence((x, y))) <= 1e-4


def test_proponents_and_opponents_equal_captums(setup):
    paths, x, y, x_test, y_test = setup
    reference = captum_tracincp(paths, x, y)
    ours = TracInCP(make_mlp(), paths, LRS, batch_size=16)
    for ours_top, proponents in ((ours.proponents, True), (ours.opponents, False)):
        ref_indices, ref_scores = reference.influence((x_test, y_test), k=4, proponents=proponents)
        top = ours_top(x_test, y_test, x, y, k=4)
        assert torch.equal(top.indices, ref_indices)
        assert relative_error(top.scores, ref_scores) <= 1e-4


def test_last_layer_path_equals_captums_tracincpfast(setup):
    paths, x, y, x_test, y_test = setup
    model = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = captum_influence.TracInCPFast(
            model, model[4], TensorDataset(x, y), paths, checkpoints_load_func=load_into,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=16,
        )
    ours = TracInCPFast(make_mlp(), "4", paths, LRS, batch_size=16)
    assert relative_error(ours.influence(x_test, y_test, x, y), reference.influence((x_test, y_test))) <= 1e-4
    assert relative_error(ours.self_influence(x, y), reference.self_influence((x, y))) <= 1e-4
