"""Issue 14's tables and scalars: one number format, a legend under each table, numbers stored as numbers in W&B,
and custom-scalar layouts (a metric beside its chance level, one chart for every expert), read back from what was
logged."""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_lens import loggers as sinks
from lightning_lens.slices import TABLE_COLUMNS, TABLE_LEGEND


def _trainer(*loggers, step=3):
    return SimpleNamespace(loggers=list(loggers), global_step=step, is_global_zero=True)


def _events(logger):
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.51234, "0.512"), (0.0009554, "<1e-3"), (3.3e-25, "<1e-3"), (-2e-7, "-<1e-3"), (0.001, "0.001"),
        (0.0123456, "0.0123"), (1.0, "1"), (12.345, "12.3"), (99.94, "99.9"), (123.456, "123"), (1234.5, "1234"),
        (2.5e7, "2.5e+07"), (0.0, "0"), (-0.0, "0"), (42, "42"), (float("nan"), "nan"), (float("inf"), "inf"),
        (float("-inf"), "-inf"), (-0.25, "-0.25"),
    ],
)
def test_format_number_follows_one_rule(value, text):
    assert sinks.format_number(value) == text


def test_markdown_cells_use_the_number_format_and_the_legend_goes_under_the_table():
    md = sinks.table_to_markdown(["q", "n", "note"], [[3.3e-25, 12, None], [0.0009554, 3, "x|y"]],
                                 legend="q: adjusted p-value <b>")
    assert md.splitlines() == [
        "| q | n | note |",
        "| --- | --- | --- |",
        "| <1e-3 | 12 |  |",
        "| <1e-3 | 3 | x\\|y |",
        "",
        "*q: adjusted p-value &lt;b&gt;*",
    ]


def test_tensorboard_and_files_get_the_legend_the_csv_keeps_full_values(tmp_path):
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    trainer = _trainer(tb, csv_logger, step=2)
    sinks.log_table(trainer, "slices/top", ["slice", "q"], [["a=1", 3.3e-25]], legend="q: adjusted p-value")
    text = _events(tb).Tensors("slices/top/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| a=1 | <1e-3 |" in text and text.endswith("*q: adjusted p-value*")
    root = os.path.join(csv_logger.log_dir, "lens", "slices", "top")
    assert open(os.path.join(root, "step_0000002.md")).read().rstrip().endswith("*q: adjusted p-value*")
    assert open(os.path.join(root, "step_0000002.csv")).read().splitlines() == ["slice,q", "a=1,3.3e-25"]


def test_wandb_tables_hold_numbers_in_the_numeric_columns(tmp_path, monkeypatch):
    """Regression (issue 14): share, q and the error's CI were strings ("12.3%", "3.3e-25", "0.1 [0.05, 0.2]") in W&B,
    so they did not sort."""
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    from lightning_lens.slices import find_slices, slice_table_rows

    rng = np.random.default_rng(0)
    meta = {"site": rng.choice(["a", "b"], 2000), "age": rng.integers(0, 3, 2000)}
    errors = rng.random(2000) < np.where((meta["site"] == "b") & (meta["age"] == 2), 0.5, 0.1)
    slices = find_slices(errors, meta)
    rows = slice_table_rows(slices, n_samples=2000, accuracy=1 - errors.mean(), alpha=0.05, min_gap=0.05, excluded=3)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-test")
    try:
        sinks.log_table(_trainer(logger, step=4), "slices/top", TABLE_COLUMNS, rows, legend=TABLE_LEGEND)
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    (path,) = glob.glob(os.path.join(run_dir, "media", "table", "slices", "top_*.table.json"))
    table = json.load(open(path))
    assert table["columns"] == TABLE_COLUMNS
    column = {name: [row[i] for row in table["data"]] for i, name in enumerate(TABLE_COLUMNS)}
    top = slices[0]
    for name in ("share", "accuracy", "error", "CI low", "CI high", "q", "score"):
        assert isinstance(column[name][0], float), name
    assert column["q"][0] == top.q_value and column["CI low"][0] < column["error"][0] < column["CI high"][0]
    assert all(v is None or isinstance(v, (int, float)) for v in column["share"] + column["q"])


def _layout(ea) -> layout_pb2.Layout:
    events = ea.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    return layout


def test_custom_scalar_layout_puts_chance_beside_its_metric_and_merges_callbacks(tmp_path):
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    trainer = _trainer(tb)
    metric = "quality/gradient/pointing_game/digit"
    sinks.log_scalars(trainer, {metric: 0.8, metric + "_chance": 0.1})
    chance = {"quality vs chance": {"pointing_game": [metric, metric + "_chance"]}}
    sinks.log_scalar_layout(trainer, chance)
    sinks.log_scalar_layout(trainer, chance)  # every epoch: nothing new, nothing written
    sinks.log_scalar_layout(trainer, {"moe/l0": {"load per expert": [r"moe/l0/load/expert_\d+"]}})
    ea = _events(tb)
    assert len(ea.Tensors(metadata.CONFIG_SUMMARY_TAG)) == 2  # written when a chart was added, not on repeats
    layout = _layout(ea)  # TensorBoard reads the last one: it holds both callbacks' charts
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert charts == {"quality vs chance": {"pointing_game": [metric, metric + "_chance"]},
                      "moe/l0": {"load per expert": [r"moe/l0/load/expert_\d+"]}}


def test_layout_arguments_are_checked():
    trainer = _trainer()
    with pytest.raises(TypeError, match="must be a non-empty list of scalar tags"):
        sinks.log_scalar_layout(trainer, {"c": {"chart": "tag"}})
    with pytest.raises(TypeError, match="layout must be"):
        sinks.log_scalar_layout(trainer, [("c", "chart")])


def test_wandb_draws_one_line_series_chart_per_layout_chart(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-test")
    trainer = _trainer(logger, step=1)
    try:
        sinks.log_scalar_layout(trainer, {"moe/l0": {"load per expert": [r"moe/l0/load/expert_\d+"]}})
        for step in (1, 2, 3):
            trainer.global_step = step
            sinks.log_scalars(trainer, {f"moe/l0/load/expert_{e}": 0.25 + 0.01 * e * step for e in range(2)})
        sinks.log_scalars(trainer, {"other/metric": 1.0})  # not in the layout: no chart redrawn
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    tables = glob.glob(os.path.join(run_dir, "media", "table", "moe", "l0", "load_per_expert_table_*.table.json"))
    assert len(tables) == 3  # redrawn at each of the three steps
    last = max((json.load(open(p)) for p in tables), key=lambda t: len(t["data"]))
    assert last["columns"] == ["step", "lineKey", "lineVal"]
    assert [row[:2] for row in last["data"]] == [[s, f"moe/l0/load/expert_{e}"] for e in range(2) for s in (1, 2, 3)]
    assert last["data"][-1][2] == pytest.approx(0.28)
