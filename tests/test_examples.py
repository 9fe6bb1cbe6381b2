"""The per-callback examples run in their ``--fast`` mode and log what their docstrings promise; the LightningCLI
YAML example configures and trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event_tags(log_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return acc.Tags()


@pytest.mark.slow
def test_sanity_and_slices_fast(tmp_path):
    out = _load("sanity_and_slices").main(["--fast", "--log-dir", str(tmp_path)])
    # the paper's finding and the controls: guided backprop fails, gradient passes, the edge control fails
    assert out["verdicts"]["gradient"] == "passes"
    assert out["verdicts"]["guided_backprop"] == "fails"
    assert out["verdicts"]["edge"] == "fails"
    tags = _event_tags(out["log_dir"])
    assert {"sanity/cascade", "sanity/similarity"} <= set(tags["images"])
    assert "sanity/verdicts/text_summary" in tags["tensors"] and "slices/top/text_summary" in tags["tensors"]


@pytest.mark.slow
def test_knn_gallery_fast(tmp_path):
    out = _load("knn_gallery").main(["--fast", "--log-dir", str(tmp_path)])
    assert out["metrics"]["memory/filled_fraction"] == 1.0
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0
    tags = _event_tags(out["log_dir"])
    assert "knn/gallery" in tags["images"] and "knn/accuracy" in tags["scalars"]


def test_the_cli_config_builds_the_trainer_the_yaml_describes(tmp_path):
    from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback, SubgroupErrorSlices
    from lightning_lens.lightning_modules import SpuriousDigitsDataModule

    spec = importlib.util.spec_from_file_location("example_cli_train", EXAMPLES / "cli" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli = module.main(["fit", "--config", str(EXAMPLES / "cli" / "config.yaml"),
                       f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
                       "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false"])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert {SaliencyMapCallback, RandomizationSanityCheck, SubgroupErrorSlices} <= set(kinds)
    assert isinstance(cli.datamodule, SpuriousDigitsDataModule) and cli.datamodule.batch_size == 64
    assert cli.model.lr == 0.003
    assert cli.trainer.state.finished  # `fit` ran (one short epoch)
    (check,) = [c for c in cli.trainer.callbacks if isinstance(c, RandomizationSanityCheck)]
    assert check.method_names == ["gradient", "guided_backprop"] and check.last_report is not None
