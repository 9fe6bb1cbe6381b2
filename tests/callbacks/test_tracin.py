"""TracInCallback: what it logs (read back), non-perturbation, resume, snapshots from files, the budget, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import _ddp
import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import TracInCallback
from lightning_lens.influence import TracInCP, TracInCPFast, precision_at_k

DDP_SCRIPT = Path(__file__).with_name("tracin_ddp_script.py")
script = _ddp.load_script(DDP_SCRIPT)
FlippedDigits, make_module = script.FlippedDigits, script.make_module


@pytest.fixture(scope="module")
def digits():
    return {"train": FlippedDigits(200), "val": FlippedDigits(40, 0.0, "val")}


def fit(callbacks, digits, tmp_path, max_epochs=2, module=None, shuffle=False, generator=True, ckpt_path=None,
        **trainer_kwargs):
    kwargs = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  default_root_dir=str(tmp_path), callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = Trainer(**kwargs)
    module = module if module is not None else make_module()
    gen = torch.Generator().manual_seed(0) if generator else None
    trainer.fit(module, DataLoader(digits["train"], batch_size=25, shuffle=shuffle, generator=gen),
                DataLoader(digits["val"], batch_size=20), ckpt_path=ckpt_path)
    return trainer, module


class DecayingLR(type(make_module())):
    """SGD (momentum 0.9) at 0.1, multiplied by 0.9 after every epoch (StepLR)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


def test_end_to_end_logs_read_back_and_find_the_flipped_labels(digits, tmp_path, read_tensorboard):
    torch.manual_seed(0)
    module = DecayingLR(make_module().model, optimizer="sgd")
    callback = TracInCallback(every_n_epochs=2, num_probes=4, k=3, num_top=8, max_overhead=None, strict=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, module = fit([callback], digits, tmp_path, max_epochs=6, module=module, logger=logger, shuffle=True)
    report = callback.last_report
    assert report.epochs == [1, 3, 5] and report.when == "end of fit"
    # the mean rate of the steps since the previous snapshot: epochs (0, 1), (2, 3), (4, 5)
    assert report.learning_rates == pytest.approx([0.1 * (0.9**e + 0.9 ** (e + 1)) / 2 for e in (0, 2, 4)])
    # the scores are the engine's on the recorded snapshots (the last linear layer, factorised)
    engine = TracInCPFast(module, "model.4", [s.state for s in callback.snapshots], report.learning_rates)
    train = digits["train"]
    expected = engine.self_influence(train.images, train.labels)
    assert torch.equal(report.positions, torch.arange(len(train)))
    assert torch.allclose(report.self_influence, expected, rtol=1e-5)
    # self-influence ranks the 20 flipped labels (chance: 0.1) first
    assert precision_at_k(report.self_influence, train.flipped) >= 0.6
    assert all(not m._forward_hooks for m in module.modules())  # the fast path's hook is gone

    ea = read_tensorboard(logger.log_dir)
    assert {"tracin/self_influence", "tracin/proponents", "tracin/opponents"} <= set(ea.Tags()["images"])
    assert ea.Images("tracin/proponents")[-1].height > ea.Images("tracin/proponents")[-1].width / 4  # 4 rows
    for key, value in callback.last_metrics.items():
        assert ea.Scalars(key)[-1].value == pytest.approx(value, rel=1e-6), key
    assert callback.last_metrics["tracin/scored_fraction"] == 1.0
    assert callback.last_metrics["tracin/num_checkpoints"] == 3.0
    ranked = json.loads(next(Path(logger.log_dir, "lens/tracin/self_influence").glob("*.json")).read_text())
    assert ranked["ids"] == report.ranked_ids
    assert ranked["self_influence"] == pytest.approx(sorted(expected.tolist(), reverse=True), rel=1e-5)
    assert ranked["labels"] == train.labels[report.ranked].tolist()
    assert ranked["learning_rates"] == pytest.approx(report.learning_rates)
    probes = json.loads(next(Path(logger.log_dir, "lens/tracin/probes").glob("*.json")).read_text())["probes"]
    influence = engine.influence(callback.probes.inputs, callback.probes.targets, train.images, train.labels)
    assert [p["proponents"] for p in probes] == influence.topk(3, dim=1).indices.tolist()
    assert [p["opponents"] for p in probes] == influence.topk(3, dim=1, largest=False).indices.tolist()


def test_training_is_not_perturbed(digits, tmp_path):
    """Bit-identical weights and global RNG with and without the callback, scoring every epoch (exact gradients,
    a projection): dropout and the unseeded shuffling draw from the global RNG, so any draw would show."""

    def run(callbacks):
        torch.manual_seed(0)
        module = make_module(dropout=0.3)
        trainer, module = fit(callbacks, digits, tmp_path, max_epochs=3, module=module, shuffle=True, generator=False)
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state(), module

    plain, plain_rng, _ = run([])
    callback = TracInCallback(score_every_n_epochs=1, method="exact", projection_dim=128, num_probes=2,
                              max_overhead=None, strict=True)
    watched, watched_rng, module = run([callback])
    assert callback.last_report is not None and len(callback.snapshots) == 3
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(plain_rng, watched_rng)
    assert all(not m._forward_hooks for m in module.modules())


def test_resume_keeps_the_snapshots(digits, tmp_path):
    uninterrupted = TracInCallback(max_overhead=None, strict=True, num_probes=2)
    fit([uninterrupted], digits, tmp_path / "a", max_epochs=4)

    first = TracInCallback(max_overhead=None, strict=True, num_probes=2)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    fit([first, saver], digits, tmp_path / "b", max_epochs=2, enable_checkpointing=True)
    resumed = TracInCallback(max_overhead=None, strict=True, num_probes=2)
    fit([resumed], digits, tmp_path / "b", max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [s.epoch for s in resumed.snapshots] == [0, 1, 2, 3]
    assert [s.epoch for s in uninterrupted.snapshots] == [0, 1, 2, 3]
    assert torch.allclose(resumed.last_report.self_influence, uninterrupted.last_report.self_influence, rtol=1e-5)
    assert resumed.last_report.ranked_ids == uninterrupted.last_report.ranked_ids


def test_snapshots_from_model_checkpoint_files_equal_the_in_memory_ones(digits, tmp_path):
    memory = TracInCallback(method="exact", max_overhead=None, strict=True, num_probes=2)
    files = TracInCallback(method="exact", snapshots="checkpoints", log_prefix="tracin_files", max_overhead=None,
                           strict=True, num_probes=2)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    fit([memory, files, saver], digits, tmp_path, max_epochs=3, enable_checkpointing=True)
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    assert files.last_report.epochs == memory.last_report.epochs == [0, 1, 2]
    assert files.last_report.learning_rates == pytest.approx(memory.last_report.learning_rates) == [0.05] * 3
    assert torch.allclose(files.last_report.self_influence, memory.last_report.self_influence, rtol=1e-5)
    # the exact path covers every parameter: the engine on the files agrees
    engine = TracInCP(make_module(), sorted(str(p) for p in (tmp_path / "ckpt").glob("*.ckpt")), None)
    train = digits["train"]
    assert torch.allclose(engine.self_influence(train.images, train.labels), files.last_report.self_influence,
                          rtol=1e-5)


def test_the_end_of_fit_run_stays_within_the_budget_unless_told_otherwise(digits, tmp_path):
    budgeted = TracInCallback(max_overhead=1e-4, batch_size=10, num_probes=2)
    with pytest.warns(UserWarning, match="to stay within max_overhead"):
        fit([budgeted], digits, tmp_path, max_epochs=2)
    report = budgeted.last_report
    assert report.planned == 200 and 10 <= len(report.positions) < 200  # at least one batch
    assert budgeted.last_metrics["tracin/scored_fraction"] == len(report.positions) / 200
    everything = TracInCallback(max_overhead=1e-4, batch_size=10, budget_fit_end=False, num_probes=2)
    fit([everything], digits, tmp_path, max_epochs=2)
    assert len(everything.last_report.positions) == 200
    # the subset's scores are the full run's on those examples (same training, same snapshots)
    full = everything.last_report.self_influence[report.positions]
    assert torch.allclose(report.self_influence, full, rtol=1e-5)


class Stream(IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(final_layer="model.3"), "final_layer='model.3' is a ReLU"),
        (dict(method="exact", layers=["model.9"]), "layers='model.9' is not a module"),
        (dict(snapshots="checkpoints"), "has no ModelCheckpoint"),
        (dict(loss_fn=torch.nn.CrossEntropyLoss()), "reduction='none'"),
        (dict(stream=True), "pass TracInCallback\\(train_dataset=...\\)"),
    ],
)
def test_configuration_errors_stop_the_fit_before_training(digits, tmp_path, kwargs, match):
    stream = kwargs.pop("stream", False)
    callback = TracInCallback(**kwargs)
    data = dict(digits, train=Stream(digits["train"])) if stream else digits
    with pytest.raises(ValueError, match=match):
        fit([callback], data, tmp_path, max_epochs=1)
    assert callback.snapshots == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="fast", layers=["model.2"]), ValueError, "apply to method='exact'"),
        (dict(method="exact", final_layer="model.4"), ValueError, "applies to method='fast'"),
        (dict(snapshots="files"), ValueError, "snapshots must be one of"),
        (dict(every_n_epochs=0), ValueError, "every_n_epochs must be >= 1"),
        (dict(num_top=0), ValueError, "num_top must be >= 1"),
        (dict(loss_fn="ce"), TypeError, "loss_fn must be a callable"),
        (dict(train_dataset=5), TypeError, "train_dataset must be a map-style Dataset"),
        (dict(probe_target="logit"), ValueError, "probe_target must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        TracInCallback(**kwargs)


def test_validate_runs_and_scores_nothing(digits, tmp_path):
    callback = TracInCallback(strict=True)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.validate(make_module(), DataLoader(digits["val"], batch_size=20), verbose=False)
    assert callback.last_report is None and callback.snapshots == []
    fit([callback], digits, tmp_path, max_epochs=1)  # the same callback in a fit afterwards: checked, then scored
    assert callback.last_report is not None and callback.last_report.epochs == [0]


def test_ddp_two_processes_score_the_same_as_one(tmp_path):
    one = script.run_fit(devices=1, root=str(tmp_path / "one"))["report"]
    ranks = _ddp.run(DDP_SCRIPT, tmp_path / "two")
    two = ranks[0]["report"]
    assert ranks[1]["report"] is None  # rank one scored its shard and handed it over
    assert one["planned"] == two["planned"] == script.NUM_SCORED
    assert two["positions"] == one["positions"] and len(set(two["positions"])) == script.NUM_SCORED
    for key in ("ids", "labels", "predictions", "ranked_ids", "proponents", "opponents", "epochs"):
        assert two[key] == one[key], key
    assert two["learning_rates"] == pytest.approx(one["learning_rates"])
    for key in ("self_influence", "influence"):
        assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-4, atol=1e-6), key
