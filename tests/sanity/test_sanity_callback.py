"""RandomizationSanityCheck inside real Trainer runs: what it logs, probe sharing, and that training is unchanged."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    train = Subset(SpuriousDigits("train", seed=0), range(96))
    val = Subset(SpuriousDigits("val", seed=0), range(48))
    return DataLoader(train, batch_size=32), DataLoader(val, batch_size=24)


def _module(seed: int = 0) -> LitClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LitClassifier(model=SmallCNN(width=4), lr=3e-3)


def _trainer(tmp_path, callbacks, logger=None, max_epochs: int = 2) -> Trainer:
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger if logger is not None else False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, callbacks=callbacks, num_sanity_val_steps=0)


def test_end_to_end_tensorboard(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient", "guided_backprop"], num_probes=6, grid_probes=2)
    trainer = _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"))
    trainer.fit(_module(), *loaders)
    report = check.last_report
    assert report is not None and report.methods == ["gradient", "guided_backprop", "edge", "random"]
    assert len(check.probes) == 6

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"sanity/cascade", "sanity/similarity"} <= set(tags["images"])
    cascade = events.Images("sanity/cascade")[-1]
    assert cascade.step == trainer.global_step
    # 2 probes x 4 methods rows, 1 + 1 + 6 columns of 48 px cells (plus labels)
    assert cascade.height > 8 * 48 and cascade.width > 8 * 48
    for method in report.methods:
        for metric in ("spearman_abs", "spearman_signed", "ssim", "hog", "topk"):
            (scalar,) = events.Scalars(f"sanity/{method}/{metric}")
            assert scalar.value == pytest.approx(report.final(method, metric), abs=1e-6)
        (verdict,) = events.Scalars(f"sanity/{method}/verdict")
        assert verdict.value == {"passes": 1.0, "inconclusive": 0.0, "fails": -1.0}[report.verdicts[method].outcome]
    assert events.Scalars("sanity/edge/verdict")[0].value == -1.0
    table = events.Tensors("sanity/verdicts/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| method |" in table and "guided_backprop" in table and "edge" in table
    (path,) = glob.glob(os.path.join(trainer.logger.log_dir, "lens", "sanity", "report", "*.json"))
    with open(path) as f:
        saved = json.load(f)
    assert saved["stages"] == report.stages and saved["methods"]["edge"]["verdict"]["outcome"] == "fails"


def test_every_n_epochs_never_changes_training(tmp_path, loaders):
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    plain = _module()
    _trainer(tmp_path / "plain", []).fit(plain, *loaders)
    torch.manual_seed(123)
    checked = _module()
    check = RandomizationSanityCheck(methods=["gradient", ("smoothgrad", {"n_samples": 3})], num_probes=4,
                                     every_n_epochs=1, run_at_fit_end=False, target="randomized_prediction")
    logger = CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path / "checked", [check], logger).fit(checked, *loaders)
    torch.set_rng_state(rng)
    for (name, a), (_, b) in zip(plain.state_dict().items(), checked.state_dict().items()):
        assert torch.equal(a, b), name
    assert check.last_report.target_mode == "randomized_prediction"
    # one check per epoch: two verdict tables as CSV files, the cascade images as PNG files
    tables = sorted(glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "verdicts", "*.csv")))
    assert len(tables) == 2
    with open(tables[-1]) as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["method", "verdict", "metric"] and {r[0] for r in rows[1:]} >= {"gradient", "smoothgrad"}
    assert len(glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "cascade", "*.png"))) == 2


def test_probes_are_shared_with_the_saliency_callback(tmp_path, loaders):
    saliency = SaliencyMapCallback(methods=["gradient"], num_probes=5, every_n_epochs=1)
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=8, controls=False, grid_probes=0)
    _trainer(tmp_path, [saliency, check]).fit(_module(), *loaders)
    assert check.probes is saliency.probes and len(check.probes) == 5
    assert check.last_report.targets.shape[1] == 5


def test_state_dict_restores_probes(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, run_at_fit_end=False, every_n_epochs=5)
    _trainer(tmp_path, [check], max_epochs=1).fit(_module(), *loaders)
    state = check.state_dict()
    fresh = RandomizationSanityCheck(methods=["gradient"], num_probes=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probes.inputs, check.probes.inputs)
    assert check.last_report is None  # every_n_epochs=5 was never due


def test_no_validation_loop_warns(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"])
    with pytest.warns(UserWarning, match="no probes"):
        _trainer(tmp_path, [check], max_epochs=1).fit(_module(), loaders[0])
    assert check.last_report is None


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        RandomizationSanityCheck(num_probes=1)
    with pytest.raises(ValueError, match="nothing to run"):
        RandomizationSanityCheck(every_n_epochs=None, run_at_fit_end=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        RandomizationSanityCheck(mode="sequential")
    with pytest.raises(ValueError, match="target must be one of"):
        RandomizationSanityCheck(target="labels")
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        RandomizationSanityCheck(every_n_epochs=0)
    with pytest.raises(TypeError, match="rule must be"):
        RandomizationSanityCheck(rule={"fail_above": 0.4})
    with pytest.raises(ValueError, match="unknown"):
        RandomizationSanityCheck(metrics=["ssim", "psnr"])
