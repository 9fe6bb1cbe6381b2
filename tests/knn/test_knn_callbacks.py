"""KNNMemoryRefresh and NeighborGallery inside a real Trainer, read back from TensorBoard."""

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule, Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens.callbacks import KNNMemoryRefresh, NeighborGallery
from lightning_lens.interpretable_models import KNNClassifier, KNNHead


class IndexedDigits(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i].view(1, 8, 8), "label": self.y[i], "index": i}


class LitKNN(LightningModule):
    def __init__(self, n_train):
        super().__init__()
        enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        self.net = KNNClassifier(enc, KNNHead(32, 10, k=5, temperature=0.1, memory_size=n_train,
                                              refresh="reencode"))

    def training_step(self, batch, _):
        logp = self.net(batch["image"], labels=batch["label"], ids=batch["index"])
        return F.nll_loss(logp, batch["label"])

    def validation_step(self, batch, _):
        logp = self.net(batch["image"])
        self.log("val_acc", (logp.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def test_gallery_and_refresh_end_to_end(tmp_path, digits):
    seed_everything(0)
    train = IndexedDigits(digits.x[digits.train], digits.y[digits.train])
    val = IndexedDigits(digits.x[digits.test], digits.y[digits.test])
    model = LitKNN(len(train))
    refresh = KNNMemoryRefresh(every_n_epochs=1)
    gallery = NeighborGallery(num_probes=4, k=3)
    logger = TensorBoardLogger(tmp_path, name="knn")
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[refresh, gallery],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=128))
    head = model.net.head
    assert bool(head.filled.all()) and refresh.refreshed_at_epoch == 1
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("knn/gallery")] == [e.step for e in ea.Scalars("knn/accuracy")]
    assert len(ea.Images("knn/gallery")) == 2
    for tag in ("knn/linear_probe_accuracy", "knn/neighbor_label_agreement", "knn/mean_credibility",
                "knn/memory/filled_fraction"):
        assert tag in ea.Tags()["scalars"], tag
    assert ea.Scalars("knn/accuracy")[-1].value > 0.8
    assert ea.Scalars("knn/memory/filled_fraction")[-1].value == 1.0
    # the gallery's probes are fixed: another validation run shows the same ones
    first = gallery.probes.indices.clone()
    trainer.validate(model, DataLoader(val, batch_size=128), verbose=False)
    assert torch.equal(gallery.probes.indices, first)
