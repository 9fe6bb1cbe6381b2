"""Smooth MPRT (Hedström et al. 2023) in RandomizationSanityCheck: ``smooth_samples`` / ``smooth_noise`` are validated,
passed to :func:`lightning_lens.sanity.cascading_randomization`, and recorded in the report JSON and the table."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import RandomizationSanityCheck
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.sanity import cascading_randomization
from lightning_lens.testing import LitClassifier, SmallCNN

METRICS = ("spearman_abs", "spearman_signed", "ssim")


def _fit(tmp_path, check: RandomizationSanityCheck) -> tuple[LitClassifier, Trainer]:
    train = Subset(SpuriousDigits("train", seed=0), range(64))
    val = Subset(SpuriousDigits("val", seed=0), range(24))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LitClassifier(model=SmallCNN(width=4), lr=3e-3)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=[check], num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(train, batch_size=32), DataLoader(val, batch_size=24))
    return module, trainer


def test_logged_smooth_mprt_numbers_equal_the_pure_function_with_the_same_options(tmp_path):
    check = RandomizationSanityCheck(methods=["gradient"], controls=False, num_probes=4, grid_probes=0,
                                     metrics=list(METRICS), smooth_samples=3, smooth_noise=0.2, max_overhead=None,
                                     strict=True)
    module, trainer = _fit(tmp_path, check)
    probes = check.probes
    smooth = cascading_randomization(module, probes.inputs, probes.targets, ["gradient"], controls=False,
                                     similarity=check.similarity, smooth_samples=3, smooth_noise=0.2, seed=0)
    plain = cascading_randomization(module, probes.inputs, probes.targets, ["gradient"], controls=False,
                                    similarity=check.similarity, seed=0)

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for metric in METRICS:
        (logged,) = events.Scalars(f"sanity/gradient/{metric}")
        assert logged.value == pytest.approx(smooth.final("gradient", metric), abs=1e-6), metric
        assert torch.allclose(check.last_report.results["gradient"].similarity[metric],
                              smooth.results["gradient"].similarity[metric], equal_nan=True)
    # the option reached the function: the smoothed maps compare differently from the plain ones
    assert any(abs(smooth.final("gradient", m) - plain.final("gradient", m)) > 1e-4 for m in METRICS)

    # recorded: the report JSON and the verdict table's legend
    (path,) = glob.glob(os.path.join(trainer.logger.log_dir, "lens", "sanity", "report", "*.json"))
    with open(path) as f:
        assert json.load(f)["smooth_mprt"] == {"samples": 3, "noise": 0.2}
    table = events.Tensors("sanity/verdicts/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "Smooth MPRT: every map is the mean over 3 noisy copies of the probes (noise 0.2" in table


def test_the_plain_check_records_no_smoothing_and_keeps_its_state_key():
    plain = RandomizationSanityCheck()
    assert plain.smooth_samples == 1 and plain.smooth_noise == 0.0
    assert RandomizationSanityCheck(smooth_samples=1, smooth_noise=0.0).state_key == plain.state_key
    assert RandomizationSanityCheck(smooth_samples=5, smooth_noise=0.1).state_key != plain.state_key


@pytest.mark.parametrize("kwargs, error, match", [
    ({"smooth_samples": 0}, ValueError, "smooth_samples"),
    ({"smooth_samples": 2.5}, TypeError, "smooth_samples"),
    ({"smooth_noise": -0.1}, ValueError, "smooth_noise"),
    ({"smooth_noise": "0.1"}, TypeError, "smooth_noise"),
])
def test_smooth_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomizationSanityCheck(**kwargs)
