"""Checkpoints as state dicts, torch.save files and Lightning-style ``.ckpt`` dicts; learning rates; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.influence import TracInCP, TracInCPFast, checkpoint_learning_rate, match_state_dict


class Wrapper(nn.Module):
    """A LightningModule-like holder: ``self.model = net`` prefixes every key with ``model.``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


@pytest.fixture
def states():
    torch.manual_seed(0)
    nets = [make_net() for _ in range(2)]
    for net in nets:  # non-default running statistics: the checkpoint's buffers must be the ones used
        net.train()
        net(torch.randn(16, 4) * 3 + 1)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    return [net.state_dict() for net in nets], x, y


def test_lightning_checkpoint_files_give_the_scores_of_the_plain_state_dicts(states, tmp_path):
    plain, x, y = states
    reference = TracInCP(make_net(), plain, [0.1, 0.2]).self_influence(x, y)
    paths = []
    for i, (sd, lr) in enumerate(zip(plain, [0.1, 0.2])):
        lightning_style = {
            "epoch": i,
            "global_step": 10 * i,
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [{"param_groups": [{"lr": lr, "params": [0, 1, 2]}], "state": {}}],
            "lr_schedulers": [],
        }
        paths.append(tmp_path / f"epoch={i}.ckpt")
        torch.save(lightning_style, paths[-1])
    # the inner network: the common prefix "model." is stripped; learning rates read from the files
    inner = TracInCP(make_net(), paths, None)
    assert inner.learning_rates == [0.1, 0.2]
    assert torch.allclose(inner.self_influence(x, y), reference)
    # the LightningModule-like wrapper: keys match as they are
    assert torch.allclose(TracInCP(Wrapper(make_net()), [str(p) for p in paths], None).self_influence(x, y), reference)
    # a wrapper with plain state dicts of the inner network: the prefix is added
    assert torch.allclose(TracInCP(Wrapper(make_net()), plain, [0.1, 0.2]).self_influence(x, y), reference)


def test_the_checkpoint_buffers_are_used_and_the_model_is_untouched(states):
    plain, x, y = states
    model = make_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = TracInCP(model, plain[:1], 1.0, layers=["3"]).self_influence(x, y)
    # the same through a model that holds the checkpoint's weights and statistics
    loaded = make_net()
    loaded.load_state_dict(plain[0])
    assert torch.allclose(TracInCP(loaded, [loaded.state_dict()], 1.0, layers=["3"]).self_influence(x, y), scores)
    default_stats = make_net()
    default_stats.load_state_dict({k: v for k, v in plain[0].items() if "running" not in k}, strict=False)
    stale = TracInCP(default_stats, [dict(default_stats.state_dict())], 1.0, layers=["3"]).self_influence(x, y)
    assert not torch.allclose(stale, scores)  # the statistics matter, so the check above is meaningful
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_save_files_of_plain_state_dicts(states, tmp_path):
    plain, x, y = states
    torch.save(plain[0], tmp_path / "a.pt")
    assert torch.allclose(TracInCP(make_net(), [tmp_path / "a.pt"], 0.5).self_influence(x, y),
                          TracInCP(make_net(), plain[:1], 0.5).self_influence(x, y))


def test_checkpoint_learning_rate_reads_lightning_and_captum_conventions():
    assert checkpoint_learning_rate({"optimizer_states": [{"param_groups": [{"lr": 0.3}]}]}) == 0.3
    assert checkpoint_learning_rate({"learning_rate": 0.02, "model": {}}) == 0.02
    assert checkpoint_learning_rate({"state_dict": {}}) is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(checkpoints=[]), ValueError, "checkpoints is empty"),
        (dict(checkpoints={"0.weight": torch.zeros(5, 4)}), TypeError, "wrap a single one in a list"),
        (dict(checkpoints=[{"other.weight": torch.zeros(5, 4)}]), ValueError, r"checkpoints\[0\]: the checkpoint does"),
        (dict(learning_rates=[0.1]), ValueError, "learning_rates has 1 entries for 2 checkpoints"),
        (dict(learning_rates=None), ValueError, "record none"),
        (dict(learning_rates=-1.0), ValueError, r"learning_rates\[0\] must be > 0"),
        (dict(learning_rates="0.1"), TypeError, "learning_rates must be a number"),
        (dict(layers="3"), TypeError, "layers must be a list"),
        (dict(layers=["nope"]), ValueError, "layers='nope' is not a module"),
        (dict(layers=["2"]), ValueError, "'2' has no parameters"),
        (dict(loss_fn="ce"), TypeError, "loss_fn must be a callable"),
        (dict(projection_dim=0), ValueError, "projection_dim must be >= 1"),
        (dict(model="net"), TypeError, "model must be a Module"),
    ],
)
def test_bad_arguments_name_the_argument(states, kwargs, error, match):
    plain, _, _ = states
    arguments = dict(model=make_net(), checkpoints=plain, learning_rates=0.1)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        TracInCP(**arguments)


def test_shape_mismatch_and_missing_files_are_reported(states, tmp_path):
    plain, x, y = states
    with pytest.raises(ValueError, match="has shape"):
        match_state_dict(nn.Sequential(nn.Linear(4, 6)), {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="no checkpoint file"):
        TracInCP(make_net(), [tmp_path / "missing.ckpt"], 0.1)
    engine = TracInCP(make_net(), plain, 0.1)
    with pytest.raises(ValueError, match="one target per example"):
        engine.self_influence(x, y[:3])
    with pytest.raises(ValueError, match="train_targets must be None"):
        engine.self_influence(torch.utils.data.TensorDataset(x, y), y)
    with pytest.raises(ValueError, match="reduction='none'"):
        TracInCP(make_net(), plain, 0.1, loss_fn=nn.CrossEntropyLoss()).self_influence(x, y)


def test_fast_path_arguments(states):
    plain, x, y = states
    with pytest.raises(ValueError, match="needs an nn.Linear"):
        TracInCPFast(make_net(), "1", plain, 0.1)
    with pytest.raises(ValueError, match="final_layer='head' is not a module"):
        TracInCPFast(make_net(), "head", plain, 0.1)
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Linear(4, 3))  # the Linear sees (batch, 2, 4)
    with pytest.raises(ValueError, match="needs \\(batch, features\\)"):
        TracInCPFast(conv, "1", [conv.state_dict()], 0.1).self_influence(torch.randn(4, 1, 6), torch.zeros(4, 2, 3))
