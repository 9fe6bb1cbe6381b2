"""Hostile names and text in the sink layer: paths stay under the log directory, W&B accepts every name, HTML is
inert, and one failing logger does not cost the others the entry (issue 11, point 4 "Paths and text")."""

import glob
import json
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lens import loggers as sinks
from lightning_lens.loggers import sanitize_tag
from lightning_lens.loggers import sinks as sinks_module

HOSTILE_TAGS = [
    "a/../../../x",
    "../../x",
    "/abs/olute",
    "a\\..\\..\\x",
    "..\\..\\x",
    "nul\x00byte/../x",
    "./././x",
    "c:/windows/x",
    "~/x",
    "...",
    "a/.../b",
    "slices/digit=3 & size<2",
    "x" * 400,
    "é" * 200,
]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(sinks_module, "_warned", set())


def _trainer(*loggers, step=3):
    return SimpleNamespace(loggers=list(loggers), global_step=step, is_global_zero=True)


def _files_under(folder):
    return {os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
            if os.path.isfile(p)}


def _text(ea, tag):
    return ea.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _events(logger):
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    ea.Reload()
    return ea


# ------------------------------------------------------------------------------------------------------ sanitize_tag
@pytest.mark.parametrize("tag", HOSTILE_TAGS)
def test_sanitized_tags_are_confined_idempotent_and_portable(tag, tmp_path):
    safe = sanitize_tag(tag)
    assert sanitize_tag(safe) == safe
    assert safe or set(tag) <= set("./\\")  # only dots and separators leave nothing
    parts = safe.split("/") if safe else []
    assert all(p and p not in (".", "..") and not p.startswith(".") for p in parts)
    assert "\\" not in safe and "\x00" not in safe and ":" not in safe and "<" not in safe
    assert all(len(p.encode()) <= 120 for p in parts)
    root = os.path.realpath(tmp_path)
    assert os.path.commonpath([root, os.path.realpath(os.path.join(root, *parts))]) == root


def test_sanitize_tag_values():
    assert sanitize_tag("a/../../../x") == "a/x"
    assert sanitize_tag("..\\..\\x") == "x"
    assert sanitize_tag("saliency/integrated_gradients") == "saliency/integrated_gradients"
    assert sanitize_tag("moe/model.1/expert_class_counts") == "moe/model.1/expert_class_counts"
    assert sanitize_tag("../..") == ""
    long_a, long_b = sanitize_tag("x" * 300 + "a"), sanitize_tag("x" * 300 + "b")
    assert long_a != long_b and len(long_a) <= 120
    with pytest.raises(TypeError, match="tag must be a str"):
        sanitize_tag(3)


# ---------------------------------------------------------------------------------------------------------- paths
def _log_everything(trainer, tag):
    sinks.log_text(trainer, tag, "note")
    sinks.log_image(trainer, tag, np.zeros((4, 4, 3), np.uint8), caption="c")
    sinks.log_table(trainer, tag, ["a"], [[1]])
    return sinks.log_json(trainer, tag, {"k": 1})


@pytest.mark.parametrize("tag", ["a/../../../x", "../../../x", "/tmp/abs", "a\\..\\..\\..\\x", "a/\x00/../../x"])
def test_file_logger_never_writes_outside_its_log_dir(tag, tmp_path):
    csv_logger = CSVLogger(save_dir=tmp_path / "logs", name="csv")
    log_dir = csv_logger.log_dir
    path = _log_everything(_trainer(csv_logger, step=2), tag)
    outside = _files_under(tmp_path) - {os.path.relpath(os.path.join(log_dir, f), tmp_path)
                                        for f in _files_under(log_dir)}
    assert outside == set()
    safe = sanitize_tag(tag)
    folder = os.path.join(log_dir, "lens", *safe.split("/"))
    assert sorted(os.listdir(folder)) == ["step_0000002." + s for s in ("csv", "json", "md", "png", "txt")]
    assert path == os.path.join(os.path.realpath(folder), "step_0000002.json")
    assert json.load(open(path)) == {"k": 1}


def test_tensorboard_gets_the_sanitized_tag(tmp_path):
    tb = TensorBoardLogger(save_dir=tmp_path / "logs", name="tb")
    _log_everything(_trainer(tb, step=4), "a/../../../x")
    ea = _events(tb)
    assert _text(ea, "a/x") == "| a |\n| --- |\n| 1 |"
    assert [e.step for e in ea.Images("a/x")] == [4]
    # TensorBoard writes event files only: nothing named after the tag, nothing outside the logger's folder
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path.parent / "x")


def test_symlink_out_of_the_log_dir_is_refused_with_one_warning(tmp_path):
    csv_logger = CSVLogger(save_dir=tmp_path / "logs", name="csv")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(os.path.join(csv_logger.log_dir, "lens"))
    os.symlink(outside, os.path.join(csv_logger.log_dir, "lens", "evil"))
    trainer = _trainer(csv_logger)
    with pytest.warns(UserWarning, match="refused to write 'evil/x'.*outside the log directory"):
        assert sinks.log_json(trainer, "evil/x", {"k": 1}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinks.log_text(trainer, "evil/x", "again")
    assert list(outside.iterdir()) == []


def test_tags_with_nothing_usable_are_refused(tmp_path):
    trainer = _trainer(CSVLogger(save_dir=tmp_path))
    with pytest.raises(ValueError, match="tag '../..' has no usable path component"):
        sinks.log_text(trainer, "../..", "x")
    with pytest.raises(TypeError, match="tag must be a str, got NoneType"):
        sinks.log_text(trainer, None, "x")
    with pytest.raises(TypeError, match="metric name must be a str, got int"):
        sinks.log_scalars(trainer, {3: 1.0})


# ------------------------------------------------------------------------------------------------------------- W&B
def test_wandb_accepts_crafted_prefixes(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-test")
    try:
        trainer = _trainer(logger, step=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no logger failure may be swallowed here
            sinks.log_table(trainer, "../../x:y/top", ["slice"], [["digit=3 & <b>"]])
            sinks.log_text(trainer, "/abs/notes", "hello")
            sinks.log_image(trainer, "a/../../img", np.zeros((4, 4, 3), np.uint8))
            path = sinks.log_json(trainer, "../../../all", [1])
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    (table,) = glob.glob(os.path.join(run_dir, "media", "table", "x_y", "top_*.table.json"))
    assert json.load(open(table))["data"] == [["digit=3 & <b>"]]  # W&B shows values as they are
    assert glob.glob(os.path.join(run_dir, "media", "table", "abs", "notes_*.table.json"))
    assert glob.glob(os.path.join(run_dir, "media", "images", "a", "img_*.png"))
    assert path == os.path.join(os.path.realpath(run_dir), "lens", "all", "step_0000004.json")
    assert json.load(open(path)) == [1]


def test_wandb_keys_are_artifact_safe():
    for tag in HOSTILE_TAGS:
        key = sinks_module._wandb_key(sanitize_tag(tag))
        assert len(key) <= 100
        assert all(c.isascii() and (c.isalnum() or c in "_-./") for c in key), key


# ------------------------------------------------------------------------------------------------------------ HTML
def test_html_is_escaped_in_tensorboard_markdown_and_md_files(tmp_path):
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    trainer = _trainer(tb, csv_logger, step=1)
    cell = "<script>alert(1)</script>"
    sinks.log_table(trainer, "slices/top", ["<i>slice</i>", "acc"], [[cell, 0.5], ["conf<0.5 & a|b", 1]])
    sinks.log_text(trainer, "notes", "**bold** <img src=x onerror=alert(1)> in <lambda>")
    ea = _events(tb)
    table = _text(ea, "slices/top")
    assert table.splitlines() == [
        "| &lt;i&gt;slice&lt;/i&gt; | acc |",
        "| --- | --- |",
        "| &lt;script&gt;alert(1)&lt;/script&gt; | 0.5 |",
        "| conf&lt;0.5 & a\\|b | 1 |",
    ]
    assert _text(ea, "notes") == "**bold** &lt;img src=x onerror=alert(1)&gt; in &lt;lambda&gt;"
    folder = os.path.join(csv_logger.log_dir, "lens")
    assert open(os.path.join(folder, "slices", "top", "step_0000001.md")).read() == table + "\n"
    assert "<" not in open(os.path.join(folder, "notes", "step_0000001.md")).read()
    # the CSV keeps the data as it is
    rows = open(os.path.join(folder, "slices", "top", "step_0000001.csv")).read().splitlines()
    assert rows[1] == cell + ",0.5"


# -------------------------------------------------------------------------------------------------- failing logger
class BrokenTensorBoard(TensorBoardLogger):
    """A logger whose experiment rejects everything (a full disk, a closed writer, a tag it refuses)."""

    @property
    def experiment(self):
        raise RuntimeError("writer is closed")

    def log_metrics(self, metrics, step=None):
        raise RuntimeError("writer is closed")


def test_one_failing_logger_does_not_stop_the_others(tmp_path):
    broken = BrokenTensorBoard(save_dir=tmp_path, name="broken")
    csv_logger = CSVLogger(save_dir=tmp_path, name="csv")
    trainer = _trainer(broken, csv_logger, step=7)
    with pytest.warns(UserWarning) as record:
        sinks.log_text(trainer, "notes/first", "hello")
        sinks.log_image(trainer, "img", np.zeros((2, 2, 3), np.uint8))
        sinks.log_table(trainer, "tab", ["a"], [[1]])
        path = sinks.log_json(trainer, "js", {"a": 1})
        sinks.log_scalars(trainer, {"m": torch.tensor(2.0)})
    messages = [str(w.message) for w in record if "failed to log" in str(w.message)]
    # once per (logger kind, exception type), naming the logger, the tag and the error
    assert messages == [
        "lightning-lens: BrokenTensorBoard failed to log 'notes/first' (RuntimeError: writer is closed); the other "
        "loggers received it. Further RuntimeError errors from tensorboard loggers are not reported."
    ]
    root = os.path.join(csv_logger.log_dir, "lens")
    assert open(os.path.join(root, "notes", "first", "step_0000007.md")).read() == "hello\n"
    assert os.path.exists(os.path.join(root, "img", "step_0000007.png"))
    assert os.path.exists(os.path.join(root, "tab", "step_0000007.csv"))
    # JSON goes to every logger's folder (TensorBoard's needs no writer): the first logger's path is returned
    assert path == os.path.realpath(os.path.join(broken.log_dir, "lens", "js", "step_0000007.json"))
    assert json.load(open(os.path.join(root, "js", "step_0000007.json"))) == {"a": 1}
    csv_logger.save()
    metrics = open(os.path.join(csv_logger.log_dir, "metrics.csv")).read().splitlines()
    assert metrics[0].split(",") == ["m", "step"] and metrics[1].split(",") == ["2.0", "7"]


def test_other_exception_types_are_reported_separately(tmp_path):
    class Rejecting(BrokenTensorBoard):
        @property
        def experiment(self):
            raise ValueError("tag rejected")

    trainer = _trainer(BrokenTensorBoard(save_dir=tmp_path, name="a"), Rejecting(save_dir=tmp_path, name="b"))
    with pytest.warns(UserWarning) as record:
        sinks.log_text(trainer, "t", "x")
        sinks.log_text(trainer, "t", "x")
    assert sorted(str(w.message).split(" (")[1].split(":")[0] for w in record) == ["RuntimeError", "ValueError"]
