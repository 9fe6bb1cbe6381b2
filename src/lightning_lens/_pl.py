"""The one place that chooses the Lightning namespace, so a later switch to ``lightning.pytorch`` is one edit."""

import pytorch_lightning as pl
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["Callback", "LightningModule", "Trainer", "pl", "rank_zero_warn"]
