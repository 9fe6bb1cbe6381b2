"""log_html: an .html page under the file logger's directory, the image in TensorBoard, wandb.Html in W&B; tags
confined, captions escaped, nothing off rank zero."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lens.loggers import log_html


def _trainer(*loggers, rank_zero=True):
    return SimpleNamespace(loggers=list(loggers), global_step=3, is_global_zero=rank_zero)


def test_the_file_logger_gets_a_page_with_the_fragment_and_an_escaped_caption(tmp_path):
    csv = CSVLogger(str(tmp_path))
    log_html(_trainer(csv), "saliency/text/../../x", '<div class="t">ok</div>', caption="a <b> & c")
    pages = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".html")]
    assert len(pages) == 1 and os.path.realpath(pages[0]).startswith(os.path.realpath(csv.log_dir))
    page = open(pages[0], encoding="utf-8").read()
    assert '<div class="t">ok</div>' in page and "a &lt;b&gt; &amp; c" in page and "<b>" not in page
    assert pages[0].endswith(os.path.join("step_0000003.html"))


def test_tensorboard_gets_the_image_and_nothing_without_one(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :10] = 255
    log_html(_trainer(tb), "saliency/a", "<div>x</div>", image=image)
    log_html(_trainer(tb), "saliency/b", "<div>x</div>")
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["saliency/a"]
    assert (acc.Images("saliency/a")[0].width, acc.Images("saliency/a")[0].height) == (20, 10)


def test_wandb_gets_an_html_object_at_the_step(tmp_path):
    import wandb

    class WandbLogger:  # the sink recognises the W&B logger by its class name
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((metrics, step))

    logger = WandbLogger()
    log_html(_trainer(logger), "saliency/x y", "<div>x</div>")
    (metrics, step), = logger.logged
    assert step == 3 and list(metrics) == ["saliency/x_y"] and isinstance(metrics["saliency/x_y"], wandb.Html)


def test_nothing_is_written_off_rank_zero(tmp_path):
    log_html(_trainer(CSVLogger(str(tmp_path)), rank_zero=False), "saliency/a", "<div>x</div>")
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".html")]
