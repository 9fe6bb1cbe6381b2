"""A kNN-head LightningModule and indexed digits, shared by the kNN callback tests and their DDP script (importable as
``_knn``: tests/conftest.py puts tests/ on ``sys.path``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lightning_lens._pl import LightningModule
from lightning_lens.interpretable_models import KNNClassifier, KNNHead


class IndexedDigits(Dataset):
    """8x8 digits as ``{"image": (1, 8, 8), "label", "index"}``; ``with_index=False`` gives ``(image, label)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_index: bool = True) -> None:
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        image = self.x[i].view(1, 8, 8)
        if not self.with_index:
            return image, self.y[i]
        return {"image": image, "label": self.y[i], "index": i}


class LitKNN(LightningModule):
    """MLP encoder + KNNHead on dict or tuple batches; records what the sanity pass and the first step saw."""

    def __init__(self, n_train: int, refresh: str = "reencode", lr: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        self.net = KNNClassifier(enc, KNNHead(32, 10, k=5, temperature=0.1, memory_size=n_train, refresh=refresh))
        self.lr = lr
        self.trained_steps = 0
        self.sanity_memory_filled: list[float] = []
        self.first_loss: torch.Tensor | None = None

    @staticmethod
    def _parts(batch):
        if isinstance(batch, dict):
            return batch["image"], batch["label"], batch["index"]
        return batch[0], batch[1], None

    def training_step(self, batch, _):
        x, y, ids = self._parts(batch)
        loss = F.nll_loss(self.net(x, labels=y, ids=ids), y)
        if self.trained_steps == 0:
            self.first_loss = loss.detach().clone()
        self.trained_steps += 1
        return loss

    def validation_step(self, batch, _):
        x, y, _ids = self._parts(batch)
        if self.trainer.sanity_checking:
            self.sanity_memory_filled.append(float(self.net.head.filled.float().mean()))
        logp = self.net(x)
        self.log("val_acc", (logp.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.encoder.parameters(), self.lr)
