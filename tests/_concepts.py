"""Concept bottleneck test helpers, importable as ``_concepts`` (tests/conftest.py puts tests/ on ``sys.path``).

The ``concept_helpers`` fixture (tests/callbacks and tests/interpretable_models conftests) hands out this module.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import LightningModule, Trainer, pl
from lightning_lens.interpretable_models import ConceptBottleneckModule

EPOCHS = 30
LR = 3e-3  # a linear c -> y head on probabilities needs large weights; at 1e-3 Adam reaches them in ~60 epochs
HIDDEN = 128


def mlp_body(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def trainer(tmp_path, max_epochs: int, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kwargs)


class Baseline(LightningModule):
    """The same backbone with a plain linear classifier: no bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(mlp_body(), nn.Linear(HIDDEN, 10))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


def _fit(module, train_ds, tmp_path, seed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, EPOCHS, limit_val_batches=0).fit(
            module, DataLoader(train_ds, batch_size=64, shuffle=True))


def train_joint_run(digits, tmp_path_factory) -> tuple[ConceptBottleneckModule, float]:
    """(trained joint ConceptBottleneckModule in eval mode, baseline test accuracy), both seeded, same loop."""
    pl.seed_everything(0, verbose=False)
    module = ConceptBottleneckModule(concept_encoder=nn.Sequential(mlp_body(), nn.Linear(HIDDEN, 7)),
                                     num_concepts=7, num_classes=10, concept_names=digits["train"].concept_names,
                                     training="joint", concept_loss_weight=1.0, lr=LR)
    _fit(module, digits["train"], tmp_path_factory.mktemp("joint"), seed=0)
    pl.seed_everything(0, verbose=False)
    base = Baseline()
    _fit(base, digits["train"], tmp_path_factory.mktemp("base"), seed=0)
    base.eval()
    test = digits["test"]
    with torch.no_grad():
        base_acc = (base.net(test.images).argmax(1) == test.labels).float().mean().item()
    module.eval()
    return module, base_acc


# ------------------------------------------------------------------------ issue 18: a head the tail values mislead
KOH_INTERVENTIONS = {"intervention_calibration": "percentile", "intervention_rule": "replace"}  # before the fix


def tail_head() -> nn.Linear:
    """Three classes over two concept logits: 0 = (off, off), 1 = (on, off), 2 = (on, on). Class 1 owns large
    concept-0 logits (``s1 - s2 = 0.5 z0 - 1.5 z1``), so a concept-0 value from the far tail reads as class 1."""
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, -1.0], [0.5, 0.5]]))
        head.bias.zero_()
    return head


def tail_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_logits, eval_logits, eval_concepts, eval_labels)``. The head classifies the 90 training rows
    perfectly; a third of class 1 has concept-0 logits of 30 (the tail), so the 95th percentile of concept 0 is 30
    while its typical "on" logit is 3. Evaluation: the training rows plus 10 class-2 rows whose concept 1 the encoder
    got wrong (logit -0.5): task accuracy 0.9."""
    rows = [[-3.0, -3.0]] * 30 + [[3.0, -3.0]] * 20 + [[30.0, -3.0]] * 10 + [[3.0, 3.0]] * 30
    logits = torch.tensor(rows)
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 30)
    eval_logits = torch.cat([logits, torch.tensor([[3.0, -0.5]] * 10)])
    eval_concepts = torch.cat([(logits > 0).float(), torch.ones(10, 2)])
    eval_labels = torch.cat([labels, torch.full((10,), 2)])
    return logits, eval_logits, eval_concepts, eval_labels


def tail_model(**kwargs):
    """A logit ConceptBottleneckModel over :func:`tail_data` (identity encoder, :func:`tail_head`) that has seen the
    training logits in one training-mode pass (its running calibration); returned in eval mode."""
    from lightning_lens.interpretable_models import ConceptBottleneckModel

    model = ConceptBottleneckModel(nn.Identity(), 2, task_head=tail_head(), num_classes=3, bottleneck="logit",
                                   concept_names=["p", "q"], **kwargs)
    model.train()
    model(tail_data()[0])
    return model.eval()
