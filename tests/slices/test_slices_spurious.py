"""End to end on SpuriousDigits: a shortcut that half the validation images lack, and a subgroup mislabeled in training.

Training: every image carries the class-position square; the thick 3s (``digit=3 & thickness=2``) are labeled 8.
Validation: true labels, and only half of the images carry the square (at the class position). A model that learned
the shortcut and the wrong labels errs on ``shortcut_present=0`` and on the 3s; the callback must name both.
A small MLP keeps the run to seconds.
"""

import json
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import SubgroupErrorSlices
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier

EPOCHS = 30


def test_callback_names_the_planted_groups_of_spurious_digits(tmp_path):
    options = dict(seed=0, train_shortcut_fraction=1.0, eval_shortcut_mode="consistent", eval_shortcut_fraction=0.5,
                   mislabel_group={"digit": 3, "thickness": 2}, mislabel_as=8, split_fractions=(0.55, 0.4, 0.05))
    train, val = SpuriousDigits("train", **options), SpuriousDigits("val", **options)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 128), nn.ReLU(), nn.Linear(128, 10))
    model = LitClassifier(mlp, lr=3e-3)
    cb = SubgroupErrorSlices(min_support=10, embedding_layer="model.2", every_n_epochs=EPOCHS, num_images=8,
                             metadata_keys=["digit", "thickness", "shortcut_present"])
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=[tb, csv], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      check_val_every_n_epoch=EPOCHS, num_sanity_val_steps=0, callbacks=[cb])
    # Training batches are plain (image, label) tuples; validation batches are the dicts that carry the metadata.
    train_loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    trainer.fit(model, train_loader, DataLoader(val, batch_size=256))

    slices = cb.last_slices
    names = [s.name + " " + " ".join(d["text"] for d in s.description) for s in slices[:3]]
    # The mislabeled digit leads, and the reported digit-3 slices hold the planted group.
    top = slices[0]
    assert "digit=3" in [p.text for p in top.predicates], [s.name for s in slices]
    assert top.accuracy < 0.6 and top.q_value <= 0.05
    group = np.flatnonzero((val.metadata["digit"] == 3) & (val.metadata["thickness"] == 2))
    covered = np.concatenate([s.indices for s in slices if "digit=3" in [p.text for p in s.predicates]])
    assert np.isin(group, covered).mean() >= 0.9
    # The missing shortcut is named, as a predicate or as the description of a cluster.
    assert any("shortcut_present=0" in n for n in names), names

    # What a user sees: the table, the curves, the examples and the JSON.
    ea = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    table = ea.Tensors("slices/top/text_summary")[0].tensor_proto.string_val[0].decode()
    assert top.name in table
    assert ea.Scalars("slices/worst_accuracy")[0].value <= top.accuracy + 1e-6
    assert ea.Images("slices/worst_examples")
    artifact = next((Path(csv.log_dir) / "lens" / "slices" / "all").glob("*.json"))
    assert json.loads(artifact.read_text())["slices"][0]["name"] == top.name
