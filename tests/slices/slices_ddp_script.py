"""A deterministic validation run with SubgroupErrorSlices, on 1 process or under DDP (gloo, 2 CPU processes).

Used in-process by the callback tests and as a script by the DDP test:
``python slices_ddp_script.py --devices 2 --out result.json`` (Lightning relaunches this file for rank 1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens._pl import LightningModule, Trainer
from lightning_lens.callbacks import SubgroupErrorSlices

N_CLASSES = 4


class PlantedImages(Dataset):
    """1x4x4 "images" whose first four pixels one-hot encode a class; a planted group shows the wrong class.

    Metadata: ``colour`` (0-3), ``size`` (0-2), ``shade`` (uniform float). In ``colour=2 & size=1`` 80% of the images
    encode ``(label + 1) % 4`` (so a reader of those pixels errs); elsewhere 4% do.
    """

    def __init__(self, n: int = 1001, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.label = rng.integers(0, N_CLASSES, n)
        self.colour = rng.integers(0, 4, n)
        self.size = rng.integers(0, 3, n)
        self.shade = rng.uniform(0, 1, n)
        self.planted = (self.colour == 2) & (self.size == 1)
        wrong = rng.random(n) < np.where(self.planted, 0.8, 0.04)
        shown = np.where(wrong, (self.label + 1) % N_CLASSES, self.label)
        images = rng.uniform(0, 0.2, (n, 1, 4, 4)).astype(np.float32)
        images[np.arange(n), 0, 0, shown] = 1.0
        images[np.arange(n), 0, 1, :3] += np.eye(3, dtype=np.float32)[self.size]  # size is visible to the network
        self.images = torch.from_numpy(images)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.label[i]), "index": i, "colour": int(self.colour[i]),
                "size": int(self.size[i]), "shade": float(self.shade[i])}


class PixelReader(LightningModule):
    """Flatten -> Linear(16, 8) -> ReLU -> Linear(8, 4), initialised to read the class pixels (logit = 10 x pixel).

    ``return_logits=False`` makes ``validation_step`` return only the loss (the callback must then run a forward).
    """

    def __init__(self, return_logits: bool = True, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))
        with torch.no_grad():
            self.net[1].weight.zero_()
            self.net[1].bias.zero_()
            self.net[1].weight[:8, :8] = torch.eye(8)
            self.net[3].weight.zero_()
            self.net[3].bias.zero_()
            self.net[3].weight[:, :4] = 10 * torch.eye(4)
        self.return_logits = return_logits
        self.lr = lr
        self.forward_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        return self.net(x)

    @staticmethod
    def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = self._xy(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("val/loss", loss, sync_dist=True)
        return {"loss": loss, "logits": logits} if self.return_logits else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_callback(**kwargs: Any) -> SubgroupErrorSlices:
    defaults = dict(min_support=20, embedding_layer="net.2", num_images=8, n_clusters=6)
    defaults.update(kwargs)
    return SubgroupErrorSlices(**defaults)


def run_validate(devices: int = 1, root: str = ".", **cb_kwargs: Any) -> SubgroupErrorSlices:
    cb = make_callback(**cb_kwargs)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[cb],
    )
    trainer.validate(PixelReader(), DataLoader(PlantedImages(), batch_size=64))
    cb.trainer_is_global_zero = trainer.is_global_zero
    return cb


def summary(cb: SubgroupErrorSlices) -> dict[str, Any]:
    return {
        "n_samples": cb.last_result["n_samples"],
        "worst_accuracy": cb.last_result["worst_accuracy"],
        "slices": [{"name": s.name, "size": s.size, "errors": s.errors, "members": sorted(int(i) for i in s.indices),
                    "q": s.q_value} for s in cb.last_slices],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cb = run_validate(args.devices, args.root)
    if cb.trainer_is_global_zero:
        with open(args.out, "w") as f:
            json.dump(summary(cb), f)


if __name__ == "__main__":
    main()
