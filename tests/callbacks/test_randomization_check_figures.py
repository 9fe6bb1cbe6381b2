"""Issue 14: what RandomizationSanityCheck shows, read back from TensorBoard: one similarity figure per metric (the
deciding one under sanity/similarity), a verdict table that states the deciding metric and the controls' expected
verdicts with a legend line, and a cascade whose layer names are shortened."""

from __future__ import annotations

import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import RandomizationSanityCheck
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


def test_figures_and_table_are_readable(tmp_path):
    train = DataLoader(Subset(SpuriousDigits("train", seed=0), range(64)), batch_size=32)
    val = DataLoader(Subset(SpuriousDigits("val", seed=0), range(32)), batch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LitClassifier(model=SmallCNN(width=4), lr=3e-3)
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, grid_probes=1)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[check],
            num_sanity_val_steps=0).fit(module, train, val)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    # the default figure_metrics are the two Spearman correlations; the rule decides on spearman_signed
    assert {"sanity/similarity", "sanity/similarity/spearman_abs"} <= images
    figure = events.Images("sanity/similarity")[-1]
    assert figure.width <= 600 and figure.height <= 600  # one panel: a TensorBoard card (~350 px) shrinks it little

    table = events.Tensors("sanity/verdicts/text_summary")[-1].tensor_proto.string_val[0].decode()
    lines = table.splitlines()
    assert lines[0] == "| method | verdict | expected | decided by | similarity | floor | ceiling | normalized |"
    assert "| edge | fails | fails (control) | spearman_signed |" in table
    assert "| random | inconclusive | inconclusive (control) | spearman_signed |" in table
    legend = lines[-1]
    assert legend.startswith("*similarity: median over the probes of spearman_signed") and "Why: gradient: " in legend
    report = check.last_report
    random_row = next(line for line in lines if line.startswith("| random |"))
    if report.verdicts["random"].score != report.verdicts["random"].score:  # NaN: blank, not "nan"
        assert random_row.endswith("|  |") and "nan" not in random_row
