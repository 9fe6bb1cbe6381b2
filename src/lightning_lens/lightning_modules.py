"""The LightningModules lightning-lens ships, and the one Trainer it runs itself: the only module outside
:mod:`lightning_lens.callbacks` that imports Lightning (through :mod:`lightning_lens._pl`).

- :class:`LitClassifier`: a plain cross-entropy classifier around any ``nn.Module`` (examples, tests, the demo).
- :class:`ConceptBottleneckModule`: trains a :class:`~lightning_lens.interpretable_models.ConceptBottleneckModel`
  jointly, sequentially or independently (Koh et al. 2020).
- :class:`SpuriousDigitsDataModule`: the ``SpuriousDigits`` splits as a ``LightningDataModule`` (quick start, examples,
  LightningCLI).
- :func:`fit_random_label_twin`: the fresh ``Trainer`` of :func:`~lightning_lens.sanity.data_randomization_test`.

Everything else in the package is plain PyTorch and imports without Lightning installed; the public names stay
``lightning_lens.testing.LitClassifier`` and ``lightning_lens.interpretable_models.ConceptBottleneckModule``.

ConceptBottleneckModule
-----------------------
A LightningModule that trains a :class:`ConceptBottleneckModel` jointly, sequentially or independently.

The three schemes of Koh et al. 2020 ("Concept Bottleneck Models", ICML), with ``L_c = sum_j BCE(c_hat_j, c_j)``
(per-concept binary cross-entropy, batch-mean, summed over concepts, optionally ``pos_weight``-ed for imbalance):

- ``"joint"``: minimise ``L_y + lambda * L_c`` end to end (``concept_loss_weight`` = lambda; 0 gives the "standard"
  model with an unsupervised bottleneck). With ``normalize_loss`` the total is divided by ``1 + lambda * C`` as in
  Koh et al.'s ``-normalize_loss``.
- ``"independent"``: the encoder learns ``x -> c`` from ``L_c``; the head learns ``c -> y`` from the *true*
  concepts; at test time the head receives predicted concepts. Needs a probability bottleneck (``"soft"``/``"hard"``)
  because the true concepts are 0/1.
- ``"sequential"``: the first ``concept_epochs`` epochs train the encoder on ``L_c`` only; the later epochs freeze it
  (eval mode, no gradient) and train the head on its *predicted* bottleneck values. Both stages share one optimizer:
  frozen parameters receive no gradient, so it does not move them.

Batches: dicts with ``image``/``x``... , ``concepts`` and ``label``/``y`` keys, or ``(x, concepts, y)`` tuples
(torch_explain's order); override with ``input_key``, ``concept_key``, ``target_key``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import LightningModule, Trainer, pl, rank_zero_warn
from lightning_lens.interpretable_models.concept_bottleneck import (
    ConceptBottleneckModel,
    ConceptBottleneckOutput,
    split_concept_batch,
    task_predictions,
    task_targets,
)
from lightning_lens.interpretable_models.moe import moe_aux_loss, moe_layers
from lightning_lens.testing.models import SmallCNN
from lightning_lens.utils import BatchAccessor, preserve_modes
from lightning_lens.utils.checks import (
    check_bool,
    check_choice,
    check_float,
    check_instance,
    check_int,
    check_key,
    check_positive_number,
)

__all__ = ["ConceptBottleneckModule", "LitClassifier", "SpuriousDigitsDataModule", "check_lightning_module",
           "fit_random_label_twin"]

_OPTIMIZERS = ("adam", "adamw", "sgd")
_TRAINING = ("joint", "sequential", "independent")


# ------------------------------------------------------------------------------------------------------ LitClassifier
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
        if model is not None:
            check_instance(model, "model", nn.Module, hint="or None for the default SmallCNN")
        check_int(num_classes, "num_classes", minimum=2)
        check_positive_number(lr, "lr")
        check_choice(optimizer, "optimizer", _OPTIMIZERS)
        check_float(weight_decay, "weight_decay", minimum=0.0)
        check_key(input_key, "input_key")
        check_key(target_key, "target_key")
        check_int(in_channels, "in_channels", minimum=1)
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else SmallCNN(in_channels=in_channels, num_classes=num_classes)
        self.num_classes = num_classes
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.accessor = BatchAccessor(input_key=input_key, target_key=target_key)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def _call(self, x: Any) -> torch.Tensor:
        """The model on a batch's inputs: a tuple is passed positionally, a dict as keyword arguments (text)."""
        if isinstance(x, dict):
            return self(**x)
        return self(*x) if isinstance(x, tuple) else self(x)

    def _shared_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.accessor.inputs(batch)
        y = self.accessor.targets(batch)
        if y is None:
            raise ValueError("LitClassifier found no labels in the batch; pass target_key='<your key>'")
        logits = self._call(x)
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
        return self._call(self.accessor.inputs(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


# ---------------------------------------------------------------------------------------------- ConceptBottleneckModule
class ConceptBottleneckModule(LightningModule):
    """Trains a concept bottleneck model; logs losses, task accuracy and mean concept accuracy.

    Args:
        model: a ready :class:`ConceptBottleneckModel`; or build one from ``concept_encoder``, ``num_concepts``,
            ``num_classes``, ``task_head``, ``bottleneck``, ``concept_names``.
        training: ``"joint"``, ``"sequential"`` or ``"independent"`` (see the module docstring).
        concept_loss_weight: lambda in ``L_y + lambda * L_c`` (joint). For the other schemes it only scales the
            encoder's loss.
        concept_weights: per-concept ``pos_weight`` of the concept BCE, a ``(C,)`` sequence or tensor (e.g.
            :func:`~lightning_lens.interpretable_models.concept_bottleneck.concept_pos_weight` of the training
            concepts), or None.
        normalize_loss: divide the joint loss by ``1 + lambda * C``.
        concept_epochs: sequential only: epochs of the concept stage (the task stage runs for the rest of
            ``max_epochs``).
        lr, weight_decay: Adam(W) settings (``weight_decay > 0`` uses AdamW).
        input_key, concept_key, target_key: where batches hold inputs, concepts and labels (defaults above).

    ``validation_step`` / ``test_step`` return ``{"loss", "concept_logits", "task_logits"}`` (read by
    :class:`~lightning_lens.callbacks.ConceptMonitor`) and log ``val/task_acc``, ``val/concept_acc``, ``val/loss``,
    ``val/task_loss``, ``val/concept_loss`` (``test/...`` likewise), so EarlyStopping can monitor them.

    Example:
        >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7))
        >>> module = ConceptBottleneckModule(concept_encoder=enc, num_concepts=7, num_classes=10,
        ...                                  training="joint", concept_loss_weight=1.0)
        >>> # Trainer(max_epochs=20).fit(module, DataLoader(SevenSegmentDigits("train"), batch_size=64))
    """

    def __init__(
        self,
        model: Optional[ConceptBottleneckModel] = None,
        *,
        concept_encoder: Optional[nn.Module] = None,
        num_concepts: Optional[int] = None,
        num_classes: Optional[int] = None,
        task_head: Optional[nn.Module] = None,
        bottleneck: str = "soft",
        concept_names: Optional[Sequence[str]] = None,
        training: str = "joint",
        concept_loss_weight: float = 1.0,
        concept_weights: Union[Sequence[float], torch.Tensor, None] = None,
        normalize_loss: bool = False,
        concept_epochs: Optional[int] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        input_key: Union[int, str, None] = None,
        concept_key: Union[int, str, None] = None,
        target_key: Union[int, str, None] = None,
    ) -> None:
        super().__init__()
        if model is not None:
            check_instance(model, "model", ConceptBottleneckModel,
                           hint="or pass concept_encoder=..., num_concepts=..., num_classes=... to build one")
            if concept_encoder is not None or task_head is not None:
                raise ValueError("pass either model or concept_encoder/task_head, not both")
        else:
            if concept_encoder is None or num_concepts is None:
                raise ValueError("pass model=ConceptBottleneckModel(...) or concept_encoder=... and num_concepts=...")
            model = ConceptBottleneckModel(concept_encoder, num_concepts, task_head=task_head, num_classes=num_classes,
                                           bottleneck=bottleneck, concept_names=concept_names)
        check_choice(training, "training", _TRAINING)
        if training == "independent" and model.bottleneck_kind == "logit":
            raise ValueError("training='independent' feeds the true 0/1 concepts to the head, which needs a "
                             "probability bottleneck: use bottleneck='soft' or 'hard' (or training='joint' or "
                             "'sequential')")
        if training == "sequential":
            if concept_epochs is None:
                raise ValueError("training='sequential' needs concept_epochs (int >= 1): the epochs that train the "
                                 "encoder before the head trains on its predictions")
            check_int(concept_epochs, "concept_epochs", minimum=1)
        elif concept_epochs is not None:
            raise ValueError(f"concept_epochs only applies to training='sequential' (got training={training!r})")
        check_float(concept_loss_weight, "concept_loss_weight", minimum=0.0)
        check_positive_number(lr, "lr")
        check_float(weight_decay, "weight_decay", minimum=0.0)
        check_bool(normalize_loss, "normalize_loss")
        for name, key in (("input_key", input_key), ("concept_key", concept_key), ("target_key", target_key)):
            check_key(key, name)
        self.model = model
        self.training_scheme = training
        self.concept_loss_weight = float(concept_loss_weight)
        self.normalize_loss = bool(normalize_loss)
        self.concept_epochs = concept_epochs
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.input_key, self.concept_key, self.target_key = input_key, concept_key, target_key
        if concept_weights is not None:
            pw = torch.as_tensor(concept_weights, dtype=torch.float32).reshape(-1)
            if pw.shape[0] != model.num_concepts or bool((pw <= 0).any()):
                raise ValueError(f"concept_weights must be {model.num_concepts} positive pos_weight values, got "
                                 f"{pw.tolist()}")
            self.register_buffer("concept_pos_weight", pw)
        else:
            self.register_buffer("concept_pos_weight", None)
        self.save_hyperparameters(ignore=["model", "concept_encoder", "task_head"])

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def stage(self) -> str:
        """``"joint"``, ``"independent"``, or for sequential training ``"concepts"`` then ``"task"``."""
        if self.training_scheme != "sequential":
            return self.training_scheme
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return "concepts" if epoch < self.concept_epochs else "task"

    def forward(self, x: torch.Tensor, intervene: Any = None, concept_values: Optional[torch.Tensor] = None
                ) -> ConceptBottleneckOutput:
        return self.model(x, intervene=intervene, concept_values=concept_values)

    def _split(self, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        return split_concept_batch(batch, self.input_key, self.concept_key, self.target_key)

    def concept_loss(self, concept_logits: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """``sum_j mean_batch BCE(logit_j, c_j)`` with the optional ``pos_weight``."""
        if concepts.shape != concept_logits.shape:
            raise ValueError(f"the batch's concepts have shape {tuple(concepts.shape)} but the model predicts "
                             f"{tuple(concept_logits.shape)}; check concept_key and num_concepts")
        losses = F.binary_cross_entropy_with_logits(
            concept_logits, concepts.to(concept_logits.dtype), pos_weight=self.concept_pos_weight, reduction="none"
        )
        return losses.mean(0).sum()

    def task_loss(self, task_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (K > 1 logits) or binary cross-entropy (one logit)."""
        labels = task_targets(targets, task_logits)
        if task_logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(task_logits[:, 0], labels.to(task_logits.dtype))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= task_logits.shape[1]):
            raise ValueError(f"labels must lie in [0, {task_logits.shape[1] - 1}] for {task_logits.shape[1]} task "
                             f"logits, got values up to {int(labels.max())}")
        return F.cross_entropy(task_logits, labels)

    def _require(self, value: Optional[torch.Tensor], what: str) -> torch.Tensor:
        if value is None:
            key = "concept_key" if what == "concepts" else "target_key"
            raise KeyError(f"the batch has no {what}; {self.training_scheme} training needs them (set {key})")
        return value

    # ---------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c, y = self._split(batch)
        c = self._require(c, "concepts")
        stage = self.stage
        lam = self.concept_loss_weight
        task_loss = concept_loss = None
        if stage == "joint":
            out = self.model(x)
            concept_loss = self.concept_loss(out.concept_logits, c)
            task_loss = self.task_loss(out.task_logits, self._require(y, "labels"))
            loss = task_loss + lam * concept_loss
            if self.normalize_loss:
                loss = loss / (1.0 + lam * self.model.num_concepts)
        elif stage == "independent":
            concept_loss = self.concept_loss(self.model.encode(x), c)
            task_logits = self.model.predict_task(self.model.hard_bottleneck(c))
            task_loss = self.task_loss(task_logits, self._require(y, "labels"))
            loss = task_loss + lam * concept_loss
        elif stage == "concepts":
            concept_loss = self.concept_loss(self.model.encode(x), c)
            loss = concept_loss
        else:  # sequential, task stage: the encoder is frozen and in eval mode
            with torch.no_grad(), preserve_modes(self.model.concept_encoder, mode=False):
                logits = self.model.encode(x)
            values, _ = self.model.bottleneck_values(logits)
            task_loss = self.task_loss(self.model.predict_task(values.detach()), self._require(y, "labels"))
            loss = task_loss
        n = x.shape[0]
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        if task_loss is not None:
            self.log("train/task_loss", task_loss, batch_size=n)
        if concept_loss is not None:
            self.log("train/concept_loss", concept_loss, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, prefix: str) -> dict[str, torch.Tensor]:
        x, c, y = self._split(batch)
        out = self.model(x)
        n = x.shape[0]
        result: dict[str, torch.Tensor] = {
            "concept_logits": out.concept_logits.detach(),
            "task_logits": out.task_logits.detach(),
        }
        losses = []
        if c is not None:
            concept_loss = self.concept_loss(out.concept_logits, c)
            acc = ((out.concept_logits >= 0) == (c.to(out.concept_logits.device) >= 0.5)).float().mean()
            self.log(f"{prefix}/concept_loss", concept_loss, batch_size=n, sync_dist=True)
            self.log(f"{prefix}/concept_acc", acc, batch_size=n, sync_dist=True, prog_bar=True)
            losses.append(self.concept_loss_weight * concept_loss)
        if y is not None:
            task_loss = self.task_loss(out.task_logits, y)
            acc = (task_predictions(out.task_logits) == task_targets(y, out.task_logits)).float().mean()
            self.log(f"{prefix}/task_loss", task_loss, batch_size=n, sync_dist=True)
            self.log(f"{prefix}/task_acc", acc, batch_size=n, sync_dist=True, prog_bar=True)
            losses.append(task_loss)
        if losses:
            result["loss"] = torch.stack(losses).sum().detach()
            self.log(f"{prefix}/loss", result["loss"], batch_size=n, sync_dist=True)
        return result

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> ConceptBottleneckOutput:
        x, _, _ = self._split(batch)
        return self.model(x)

    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if self.training_scheme == "sequential" and max_epochs is not None and 0 <= max_epochs <= self.concept_epochs:
            rank_zero_warn(f"training='sequential' with concept_epochs={self.concept_epochs} and max_epochs="
                           f"{max_epochs}: the task head never trains; raise max_epochs")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.weight_decay > 0:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr)


# ------------------------------------------------------------------------------------------- data randomization twin
def check_lightning_module(module: Any, argument: str = "module", fix: str = "") -> LightningModule:
    """``module`` if it is a ``LightningModule``; the ``TypeError`` names ``argument`` and adds ``fix``.

    Example:
        >>> check_lightning_module(LitClassifier()).__class__.__name__
        'LitClassifier'
    """
    if not isinstance(module, LightningModule):
        raise TypeError(f"{argument} must be a LightningModule, got {type(module).__name__}" + (f"; {fix}" if fix
                                                                                                 else ""))
    return module


def fit_random_label_twin(
    twin: LightningModule, loader: DataLoader, max_epochs: int, trainer_kwargs: Optional[dict[str, Any]] = None
) -> int:
    """Fit ``twin`` (a deep copy of the user's module) on ``loader`` with a fresh, quiet ``Trainer``; return the
    epochs trained. Used by :func:`~lightning_lens.sanity.data_randomization_test`; the caller seeds the RNG.

    Args:
        twin: the module to train (modified in place); its trainer reference is dropped afterwards so the fitting
            Trainer (and its data) is not kept alive.
        loader: the permuted-label training data.
        max_epochs: training epochs.
        trainer_kwargs: overrides for the Trainer (defaults: ``max_epochs``, ``devices=1``, no logger, no
            checkpointing, no progress bar, no model summary, no validation).

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,)))
        >>> fit_random_label_twin(LitClassifier(), DataLoader(data, batch_size=4), max_epochs=1,
        ...                       trainer_kwargs={"accelerator": "cpu"})  # doctest: +SKIP
        1
    """
    check_lightning_module(twin, "twin")
    check_int(max_epochs, "max_epochs", minimum=1)
    settings = {"max_epochs": max_epochs, "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                "limit_val_batches": 0, **(trainer_kwargs or {})}
    trainer = Trainer(**settings)
    twin.train()
    with warnings.catch_warnings():
        # expected here: the twin has no validation data on purpose
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        trainer.fit(twin, train_dataloaders=loader)
    epochs = int(trainer.current_epoch)
    twin._trainer = None
    return epochs


# ----------------------------------------------------------------------------------------- SpuriousDigitsDataModule
class SpuriousDigitsDataModule(pl.LightningDataModule):
    """:class:`~lightning_lens.datasets.SpuriousDigits` as a ``LightningDataModule`` (train / val / test splits built
    in memory from scikit-learn's bundled digits: nothing downloads).

    Batches are dicts: ``image`` ``(B, 1, 32, 32)``, ``label``, ``index``, the metadata columns (``digit``,
    ``shortcut_present``, ``thickness``, ...) that :class:`~lightning_lens.callbacks.SubgroupErrorSlices` slices on,
    and the ``digit_mask``/``square_mask`` ground truth the quality metrics use.

    Args:
        batch_size: training batch size (the training loader shuffles with a generator seeded by ``seed``).
        eval_batch_size: validation and test batch size.
        seed: seed of the data set (split, shortcut positions) and of the shuffling.
        train_shortcut_fraction: share of training images carrying the class-specific square.
        eval_shortcut_mode: where the square sits in validation/test images (see ``SpuriousDigits``).
        num_workers: DataLoader worker processes.

    Example:
        >>> dm = SpuriousDigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["image"].shape), len(dm.val_dataset) > 0
        ((32, 1, 32, 32), True)
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        seed: int = 0,
        train_shortcut_fraction: float = 0.9,
        eval_shortcut_mode: str = "random",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        from lightning_lens.utils.checks import check_fraction

        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self.train_shortcut_fraction = check_fraction(train_shortcut_fraction, "train_shortcut_fraction",
                                                      allow_zero=True)
        self.eval_shortcut_mode = check_choice(eval_shortcut_mode, "eval_shortcut_mode",
                                               ("random", "conflicting", "consistent", "absent"))
        self.num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.save_hyperparameters()
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None

    def setup(self, stage: Optional[str] = None) -> None:
        from lightning_lens.datasets import SpuriousDigits

        if self.train_dataset is None:  # built once (well under a second), the same for every stage
            splits = SpuriousDigits.splits(seed=self.seed, train_shortcut_fraction=self.train_shortcut_fraction,
                                           eval_shortcut_mode=self.eval_shortcut_mode)
            self.train_dataset, self.val_dataset, self.test_dataset = splits["train"], splits["val"], splits["test"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)
