"""The sink layer writes what it is given to every logger kind, and reads back from their files."""

import glob
import json
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import DummyLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lens import loggers as sinks
from lightning_lens.loggers.sinks import _as_hwc_uint8


def _trainer(*loggers, step=3, rank_zero=True):
    return SimpleNamespace(loggers=list(loggers), global_step=step, is_global_zero=rank_zero)


def _events(logger):
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _checker(h=4, w=6):
    img = np.zeros((h, w, 3), np.uint8)
    img[::2, ::2] = [255, 0, 0]
    return img


def test_image_conversions():
    gray = torch.tensor([[[0.0, 1.0], [0.5, float("nan")]]])  # (1, 2, 2) float in [0, 1]
    out = _as_hwc_uint8(gray)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 1].tolist() == [255, 255, 255] and out[1, 0, 0] == 128 and out[1, 1, 0] == 0
    assert _as_hwc_uint8(np.full((3, 5), 7, np.uint8)).shape == (3, 5, 3)
    with pytest.raises(ValueError, match="image must be"):
        _as_hwc_uint8(np.zeros((2, 3, 4, 5)))


def test_tensorboard_images_text_scalars(tmp_path):
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    trainer = _trainer(tb, step=5)
    sinks.log_image(trainer, "saliency/gradient", _checker())
    sinks.log_image(trainer, "saliency/gradient", _checker(), step=9)
    sinks.log_table(trainer, "slices/top", ["slice", "acc"], [["digit=3", 0.51234], ["digit=5", 0.75]])
    sinks.log_text(trainer, "notes", "**hello**")
    sinks.log_scalars(trainer, {"sanity/gradient/spearman": torch.tensor(0.25), "x": 1})
    ea = _events(tb)
    images = ea.Images("saliency/gradient")
    assert [e.step for e in images] == [5, 9]
    assert (images[0].width, images[0].height) == (6, 4)
    text = ea.Tensors("slices/top/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| digit=3 | 0.512 |" in text  # 3 significant figures (format_number)
    assert ea.Tensors("notes/text_summary")[0].tensor_proto.string_val[0].decode() == "**hello**"
    assert ea.Scalars("sanity/gradient/spearman")[0].value == pytest.approx(0.25)
    assert ea.Scalars("sanity/gradient/spearman")[0].step == 5


def test_csv_logger_gets_files(tmp_path):
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    trainer = _trainer(csv_logger, step=2)
    sinks.log_image(trainer, "saliency/gradient", _checker(), caption="probe 0")
    sinks.log_table(trainer, "slices/top", ["slice", "n"], [["a=1", 3]])
    path = sinks.log_json(trainer, "slices/all", {"slices": [{"name": "a=1", "size": np.int64(3)}]})
    root = os.path.join(csv_logger.log_dir, "lens")
    png = os.path.join(root, "saliency", "gradient", "step_0000002.png")
    assert os.path.exists(png) and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(png[:-4] + ".txt").read() == "probe 0"
    assert open(os.path.join(root, "slices", "top", "step_0000002.csv")).read().splitlines() == ["slice,n", "a=1,3"]
    assert json.load(open(path)) == {"slices": [{"name": "a=1", "size": 3}]}


def test_wandb_offline_run_holds_images_and_tables(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-test")
    try:
        trainer = _trainer(logger, step=4)
        sinks.log_image(trainer, "saliency/gradient", _checker(), caption="c")
        sinks.log_table(trainer, "slices/top", ["slice", "acc"], [["digit=3", 0.5]])
        sinks.log_json(trainer, "slices/all", [1, 2])
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    images = glob.glob(os.path.join(run_dir, "media", "images", "saliency", "gradient_*.png"))
    tables = glob.glob(os.path.join(run_dir, "media", "table", "slices", "top_*.table.json"))
    assert images and tables
    table = json.load(open(tables[0]))
    assert table["columns"] == ["slice", "acc"] and table["data"] == [["digit=3", 0.5]]
    assert json.load(open(os.path.join(run_dir, "lens", "slices", "all", "step_0000004.json"))) == [1, 2]


def test_rank_nonzero_logs_nothing(tmp_path):
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    trainer = _trainer(csv_logger, rank_zero=False)
    sinks.log_image(trainer, "a", _checker())
    sinks.log_table(trainer, "b", ["x"], [[1]])
    assert sinks.log_json(trainer, "c", {}) is None
    assert not os.path.exists(os.path.join(tmp_path, "csv"))


def test_unsupported_logger_warned_once():
    class Opaque(DummyLogger):
        pass

    trainer = _trainer(Opaque())
    with pytest.warns(UserWarning, match="cannot log images, tables or text to Opaque"):
        sinks.log_image(trainer, "a", _checker())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinks.log_image(trainer, "a", _checker())


def test_bad_arguments_name_the_problem(tmp_path):
    trainer = _trainer(CSVLogger(save_dir=tmp_path))
    with pytest.raises(ValueError, match=r"rows\[0\] has 1 values but there are 2 columns"):
        sinks.log_table(trainer, "t", ["a", "b"], [[1]])
    with pytest.raises(ValueError, match="tag must be a non-empty string"):
        sinks.log_image(trainer, "", _checker())
    with pytest.raises(ValueError, match="must be a scalar"):
        sinks.log_scalars(trainer, {"m": torch.ones(2)})


def test_images_share_the_step_of_lightnings_own_validation_scalars(tmp_path):
    from pytorch_lightning import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader, Subset

    from lightning_lens.datasets import SpuriousDigits
    from lightning_lens.testing import LitClassifier

    class ImageEachValidation(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                sinks.log_image(trainer, "probe", _checker())

    seed_everything(0)
    data = SpuriousDigits("train", seed=0)
    tb = TensorBoardLogger(save_dir=tmp_path, name="align")
    trainer = Trainer(max_epochs=2, logger=tb, callbacks=[ImageEachValidation()], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path)
    trainer.fit(LitClassifier(), DataLoader(Subset(data, range(64)), batch_size=16),
                DataLoader(Subset(data, range(32)), batch_size=16))
    ea = _events(tb)
    image_steps = [e.step for e in ea.Images("probe")]
    assert image_steps == [e.step for e in ea.Scalars("val/acc")] == [3, 7]
