"""``LitClassifier``: a plain image-classification LightningModule for examples, tests and the demo."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.interpretable_models.moe import moe_aux_loss, moe_layers
from lightning_lens._pl import LightningModule
from lightning_lens.testing.models import SmallCNN
from lightning_lens.utils import BatchAccessor
from lightning_lens.utils.checks import check_choice, check_int

__all__ = ["LitClassifier"]

_OPTIMIZERS = ("adam", "adamw", "sgd")


class LitClassifier(LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` that maps inputs to logits; dict or tuple batches.

    Logs ``train/loss`` (per step and epoch), ``val/loss`` and ``val/acc`` (per epoch), ``test/loss`` and
    ``test/acc``. ``validation_step`` and ``test_step`` return ``{"loss": loss, "logits": logits}`` so callbacks can
    read the outputs in ``on_validation_batch_end`` without a second forward pass.

    Args:
        model: the network; default ``SmallCNN(in_channels, num_classes)``.
        num_classes: number of classes (used to build the default model and to check the logits' width).
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD with momentum 0.9).
        input_key: where the inputs are in a batch (see :class:`lightning_lens.utils.BatchAccessor`).
        target_key: where the labels are in a batch.
        weight_decay: weight decay passed to the optimizer.
        in_channels: input channels of the default model.

    Example:
        >>> lit = LitClassifier(num_classes=10)
        >>> lit(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        optimizer: str = "adam",
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        weight_decay: float = 0.0,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        check_int(num_classes, "num_classes", minimum=2)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        check_choice(optimizer, "optimizer", _OPTIMIZERS)
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else SmallCNN(in_channels=in_channels, num_classes=num_classes)
        self.num_classes = num_classes
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.accessor = BatchAccessor(input_key=input_key, target_key=target_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.accessor.inputs(batch)
        y = self.accessor.targets(batch)
        if y is None:
            raise ValueError("LitClassifier found no labels in the batch; pass target_key='<your key>'")
        logits = self(x)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected (B, {self.num_classes}); "
                "check num_classes"
            )
        y = y.to(logits.device).long()
        loss = F.cross_entropy(logits, y)
        return loss, logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, _ = self._shared_step(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=logits.shape[0])
        if moe_layers(self):  # mixture-of-experts layers train with their balance and z-losses
            aux = moe_aux_loss(self)
            self.log("train/moe_aux_loss", aux, on_step=False, on_epoch=True, batch_size=logits.shape[0])
            loss = loss + aux
        return loss

    def _eval_step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        loss, logits, y = self._shared_step(batch)
        acc = (logits.argmax(dim=1) == y).float().mean()
        n = logits.shape[0]
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log(f"{stage}/acc", acc, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        return {"loss": loss, "logits": logits}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(self.accessor.inputs(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
