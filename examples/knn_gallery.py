"""A classifier that explains each prediction by its nearest training images: a kNN head with NeighborGallery.

A small convolutional encoder maps SpuriousDigits images (scikit-learn's bundled digits at 32x32 with a planted
shortcut square) to 32-d embeddings; a ``KNNHead`` classifies them by a similarity-weighted vote of the 10 nearest
training embeddings (its memory holds the whole training set). ``KNNMemoryRefresh`` re-encodes the training set into
the memory every epoch (the encoder moves), and ``NeighborGallery`` logs, every validation epoch:

- ``knn/gallery``: each probe beside its nearest training images (a neighbour that shares the probe's square rather
  than its digit shows the shortcut at work), with the DkNN credibility of the prediction (Papernot & McDaniel 2018);
- ``knn/accuracy``, ``knn/linear_probe_accuracy``, ``knn/neighbor_label_agreement``, ``knn/mean_credibility``.

Run (about a minute on two CPU cores; ``--fast``: a few seconds, for a smoke test):

    python examples/knn_gallery.py
    python -m lightning_lens report lens_logs/knn_gallery -o lens_logs/knn_gallery/report.html
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule, Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_lens.callbacks import KNNMemoryRefresh, NeighborGallery
from lightning_lens.interpretable_models import KNNClassifier, KNNHead
from lightning_lens.lightning_modules import SpuriousDigitsDataModule
from lightning_lens.report.html import report_command


class LitKNNDigits(LightningModule):
    """Conv encoder + kNN head; batches are SpuriousDigits dicts (``image``, ``label``, ``index``)."""

    def __init__(self, memory_size: int, embedding_dim: int = 32, k: int = 10, lr: float = 2e-3) -> None:
        super().__init__()
        encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(32 * 16, embedding_dim),
        )
        head = KNNHead(embedding_dim, 10, k=k, temperature=0.1, memory_size=memory_size, refresh="reencode")
        self.net = KNNClassifier(encoder, head)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # log-probabilities of the neighbours' vote

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # the ids keep each training image from voting for itself
        log_probs = self.net(batch["image"], labels=batch["label"], ids=batch["index"])
        loss = F.nll_loss(log_probs, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        log_probs = self.net(batch["image"])
        self.log("val/loss", F.nll_loss(log_probs, batch["label"]), prog_bar=True)
        self.log("val/acc", (log_probs.argmax(1) == batch["label"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.encoder.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="one short epoch and fewer probes (a smoke test)")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    dm = SpuriousDigitsDataModule(seed=args.seed)
    dm.setup("fit")
    gallery = NeighborGallery(num_probes=4 if args.fast else 8, k=6, max_eval_samples=200 if args.fast else 5000)
    logger = TensorBoardLogger(args.log_dir, name="knn_gallery", default_hp_metric=False)
    trainer = Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=4 if args.fast else None,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[KNNMemoryRefresh(every_n_epochs=1), gallery],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.fast,
    )
    trainer.fit(LitKNNDigits(memory_size=len(dm.train_dataset)), datamodule=dm)

    metrics = {k: round(float(v), 3) for k, v in gallery.last_metrics.items()}
    print(f"\nkNN metrics at the last epoch: {metrics}")
    print(f"Logs: {os.path.abspath(logger.log_dir)}")
    print(f"Report: {report_command(logger.log_dir)}")
    return {"metrics": metrics, "log_dir": logger.log_dir}


if __name__ == "__main__":
    main()
