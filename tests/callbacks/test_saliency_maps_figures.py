"""Issue 14: what the saliency grids and scalars show, read back from TensorBoard: the colour scale, wrong predictions
marked, a note under an all-zero map, the epoch in the title, timing scalars only on request, and each chance level
on its metric's chart (custom-scalar layout)."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.image import imread
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.render import MISTAKE_COLOR, colorize
from lightning_lens.testing import LitClassifier
from lightning_lens.utils import ProbeSet


def _png(data: bytes) -> np.ndarray:
    return (imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def _grid(preds, attributions=None, targets=(0, 1, 2)):
    n = len(targets)
    probes = ProbeSet(inputs=torch.rand(n, 1, 8, 8), targets=torch.tensor(targets), indices=torch.arange(n))
    cb = SaliencyMapCallback(methods=["gradient"], probes=probes, cell_size=32)
    maps = torch.randn(n, 1, 8, 8) if attributions is None else attributions
    preds = torch.tensor(preds)
    probs = torch.full((n, 3), 1 / 3)
    return cb._method_grid("gradient", probes, probes.inputs, maps, preds, probs)


def _mistake_pixels(image: np.ndarray) -> int:
    return int((image == np.array(MISTAKE_COLOR, np.uint8)).all(axis=-1).sum())


def test_wrong_predictions_are_marked_in_red_and_named_in_the_caption():
    torch.manual_seed(0)
    right, caption_right = _grid([0, 1, 2])
    torch.manual_seed(0)
    wrong, caption_wrong = _grid([0, 2, 2])  # probe 1 (label 1) predicted as 2
    assert _mistake_pixels(right) == 0
    # a 3-pixel frame around one 32-pixel input cell, plus the red label text
    assert _mistake_pixels(wrong) >= 4 * 3 * 32
    assert "red label and frame: wrong prediction" in caption_wrong and "wrong" not in caption_right


def test_the_colour_scale_is_the_heatmaps_and_the_legend_explains_it():
    torch.manual_seed(0)
    image, caption = _grid([0, 1, 2])  # random normal maps have negative values: the diverging scale
    height, width = image.shape[:2]
    # the bar: the first column of the strip right of the grid, from its top to 4 px above the bottom
    for x in range(width - 1, 0, -1):
        column = image[:, x]
        top = colorize(np.ones((1, 1)), signed=True)[0, 0]
        rows = np.flatnonzero((column == top).all(axis=-1))
        if rows.size and (image[rows[0]:, x] != 255).any():
            bar = image[rows[0] : height - 4, x]
            break
    expected = colorize(np.linspace(1.0, -1.0, len(bar))[:, None], signed=True)[:, 0]
    assert len(bar) > 3 * 32 and np.array_equal(bar, expected)
    assert "blue negative, red positive" in caption and "99th percentile" in caption


def test_an_all_zero_map_gets_a_note_under_it():
    torch.manual_seed(0)
    maps = torch.randn(3, 1, 8, 8)
    maps[1] = 0.0
    noted, caption = _grid([0, 1, 2], attributions=maps)
    torch.manual_seed(0)
    plain, _ = _grid([0, 1, 2], attributions=torch.randn(3, 1, 8, 8))
    assert noted.shape[0] > plain.shape[0]  # a line of text under the zero map's row
    assert "'map is zero: no attribution'" in caption


def _layout(ea) -> dict:
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def test_fit_logs_chance_beside_its_metric_timing_only_on_request_and_the_epoch(
    tmp_path, saliency_loaders, trainer_kwargs, read_tensorboard
):
    train, val = saliency_loaders()
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=4, quality_metrics=["pointing_game"],
                             mask_regions=["digit"], max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    Trainer(**trainer_kwargs(max_epochs=1, logger=logger, callbacks=[cb])).fit(LitClassifier(), train, val)
    ea = read_tensorboard(logger.log_dir)
    scalars = ea.Tags()["scalars"]
    assert "quality/gradient/pointing_game/digit_chance" in scalars
    assert not [t for t in scalars if t.endswith("/seconds")]  # log_timing=False by default
    charts = _layout(ea)["quality vs chance"]
    assert charts == {"quality/gradient/pointing_game/digit (with chance)": [
        r"quality/gradient/pointing_game/digit", r"quality/gradient/pointing_game/digit_chance"]}
    assert cb._grid_title("gradient") == "gradient (target: label, epoch 0)"

    timed = SaliencyMapCallback(methods=["gradient"], num_probes=2, log_timing=True, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="timed", version=0)
    Trainer(**trainer_kwargs(max_epochs=1, logger=logger, callbacks=[timed])).fit(LitClassifier(), train, val)
    assert "saliency/gradient/seconds" in read_tensorboard(logger.log_dir).Tags()["scalars"]
