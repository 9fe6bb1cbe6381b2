"""Images are encoded once, at a cheap zlib level, and decode back to the logged pixels."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lens import loggers
from lightning_lens.loggers import sinks


def _trainer(*logs, step=3):
    return SimpleNamespace(loggers=list(logs), global_step=step, is_global_zero=True)


def _picture(h=40, w=56):
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = [200, 30, 30]
    img[h // 2:, w // 2:] = rng.integers(0, 256, (h - h // 2, w - w // 2, 3), dtype=np.uint8)
    return img


def _counting_png(monkeypatch):
    calls = []
    original = sinks._png_bytes

    def png(arr):
        calls.append(arr.shape)
        return original(arr)

    monkeypatch.setattr(sinks, "_png_bytes", png)
    return calls


def test_tensorboard_gets_one_cheap_png_that_decodes_to_the_pixels(tmp_path, monkeypatch):
    calls = _counting_png(monkeypatch)
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    img = _picture()
    loggers.log_image(_trainer(tb, step=4), "saliency/gradient", img)
    assert calls == [img.shape]  # encoded once, by the sinks' encoder (add_image re-encodes at level 6)
    tb.experiment.flush()
    ea = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    ea.Reload()
    (event,) = ea.Images("saliency/gradient")
    assert event.step == 4 and (event.width, event.height) == (56, 40)
    assert event.encoded_image_string == sinks._png_bytes(img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")), img)


def test_png_files_use_the_cheap_zlib_level_and_are_lossless(tmp_path, monkeypatch):
    calls = _counting_png(monkeypatch)
    csv = CSVLogger(save_dir=tmp_path, name="csv")
    img = _picture()
    loggers.log_image(_trainer(csv), "slices/worst_examples", img)
    assert calls == [img.shape]
    (path,) = list((tmp_path / "csv").rglob("*.png"))
    data = path.read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), img)
    level6 = io.BytesIO()
    Image.fromarray(img).save(level6, format="PNG")  # Pillow's default level
    assert sinks._PNG_COMPRESS_LEVEL == 1 and data != level6.getvalue()
