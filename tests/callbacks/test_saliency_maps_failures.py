"""A failure inside SaliencyMapCallback's own work never loses the run: it is reported (a warning and a text entry in
the logs), only the failing part is switched off after ``max_failures``, and ``strict=True`` raises instead."""

from __future__ import annotations

import glob
import io
import os
import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier, SmallCNN

STEPS_PER_EPOCH = 2  # 32 training digits in batches of 16


class Flaky:
    """An attribution method that works in the setup dry run (its first call) and raises afterwards."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def attribute(self, inputs, target=None):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("flaky method broke")
        return torch.zeros_like(inputs)


def broken_denormalize(x):
    return x * (1 // 0)  # ZeroDivisionError


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _png(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return (imread(io.BytesIO(f.read()), format="png")[..., :3] * 255).round().astype(np.uint8)


def _fit(cb, tmp_path, saliency_loaders, trainer_kwargs, epochs):
    model = LitClassifier(model=SmallCNN(width=4))
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = Trainer(**trainer_kwargs(max_epochs=epochs, logger=logger, callbacks=[cb]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, *saliency_loaders(n_train=32, n_val=16))
    reports = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
               and str(w.message).startswith("SaliencyMapCallback:")]
    return trainer, model, logger, reports


def test_a_raising_denormalize_is_reported_and_the_grids_are_logged_without_it(
    tmp_path, saliency_loaders, trainer_kwargs
):
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=2, denormalize=broken_denormalize, max_overhead=None)
    trainer, model, logger, reports = _fit(cb, tmp_path, saliency_loaders, trainer_kwargs, epochs=4)
    assert trainer.current_epoch == 4  # the fit finished
    first = reports[0]
    assert first.startswith("SaliencyMapCallback: 'denormalize' failed at epoch 0 with ZeroDivisionError")
    assert "Fix: denormalize must take one input sample" in first
    # reported once, then once more when it is switched off (setup, epoch 0 and epoch 1: three failures in a row)
    assert len(reports) == 2 and "switched off after 3 failures in a row" in reports[1]
    assert cb.disabled == {"denormalize"}
    # the text entries in the logs, read back from CSVLogger's files
    entries = sorted(glob.glob(os.path.join(logger.log_dir, "lens", "lens_errors", "SaliencyMapCallback", "*.md")))
    assert len(entries) == 2
    assert "ZeroDivisionError" in _read(entries[0]) and "switched off" in _read(entries[1])
    # every epoch's grid was logged, drawn from the inputs as they are
    grids = sorted(glob.glob(os.path.join(logger.log_dir, "lens", "saliency", "gradient", "step_*.png")))
    assert [os.path.basename(g) for g in grids] == [f"step_{(e + 1) * STEPS_PER_EPOCH - 1:07d}.png" for e in range(4)]
    preds, probs = _predictions(model, cb.probes.inputs)
    expected, _ = cb._method_grid("gradient", cb.probes, cb.probes.inputs, cb.last_attributions["gradient"], preds,
                                  probs)
    np.testing.assert_array_equal(_png(grids[-1]), expected)


def _predictions(model, inputs):
    with torch.no_grad():
        probs = model.eval()(inputs).softmax(dim=1)
    return probs.argmax(dim=1), probs


def test_a_failing_method_is_switched_off_after_max_failures_and_the_others_keep_logging(
    tmp_path, saliency_loaders, trainer_kwargs
):
    flaky = Flaky()
    cb = SaliencyMapCallback(methods=["gradient", flaky], num_probes=2, max_failures=2, max_overhead=None)
    trainer, _, logger, reports = _fit(cb, tmp_path, saliency_loaders, trainer_kwargs, epochs=4)
    assert trainer.current_epoch == 4
    assert flaky.calls == 3  # the dry run, then epochs 0 and 1; switched off after two failures in a row
    assert cb.disabled == {"method:flaky"}
    assert reports[0].startswith("SaliencyMapCallback: 'method:flaky' failed at epoch 0 with RuntimeError: flaky")
    assert "switched off after 2 failures" in reports[-1] and "at epoch 1" in reports[-1]
    for name, epochs in (("gradient", range(4)), ("flaky", [])):
        grids = glob.glob(os.path.join(logger.log_dir, "lens", "saliency", name, "step_*.png"))
        assert len(grids) == len(epochs)
    assert list(cb.last_attributions) == ["gradient"]


def test_strict_raises_instead(tmp_path, saliency_loaders, trainer_kwargs):
    model = LitClassifier(model=SmallCNN(width=4))
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=2, denormalize=broken_denormalize, strict=True)
    with pytest.raises(ZeroDivisionError):
        Trainer(**trainer_kwargs(max_epochs=1, logger=False, callbacks=[cb])).fit(
            model, *saliency_loaders(n_train=32, n_val=16))
