"""ConceptBottleneckModule: the three training schemes do what Koh et al. define, losses are the documented ones."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens._pl import Callback, pl
from lightning_lens.datasets import make_xor
from lightning_lens.interpretable_models import ConceptBottleneckModel, ConceptBottleneckModule


def encoder(hidden=32, batchnorm=False):
    layers = [nn.Flatten(), nn.Linear(64, hidden)] + ([nn.BatchNorm1d(hidden)] if batchnorm else [])
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden, 7))


def batch_of(ds, n=16):
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([i["image"] for i in items]), "concepts": torch.stack([i["concepts"] for i in items]),
            "label": torch.tensor([i["label"] for i in items])}


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer warns
        return fn(*args)


class Snapshots(Callback):
    """Parameters and buffers of the encoder and head at the end of every training epoch."""

    def __init__(self):
        self.enc, self.head = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        m = pl_module.model
        self.enc.append({k: v.detach().clone() for k, v in m.concept_encoder.state_dict().items()})
        self.head.append({k: v.detach().clone() for k, v in m.task_head.state_dict().items()})


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def fit(module, seven_segment_digits, concept_helpers, tmp_path, epochs, callbacks=(), **kw):
    pl.seed_everything(0, verbose=False)
    kw.setdefault("limit_train_batches", 4)
    kw.setdefault("limit_val_batches", 1)
    kw.setdefault("num_sanity_val_steps", 0)
    trainer = concept_helpers.trainer(tmp_path, epochs, callbacks=list(callbacks), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(seven_segment_digits["train"], batch_size=32, shuffle=True),
                    DataLoader(seven_segment_digits["val"], batch_size=64))
    return trainer


def test_sequential_trains_the_encoder_then_only_the_head(seven_segment_digits, concept_helpers, tmp_path):
    module = ConceptBottleneckModule(concept_encoder=encoder(batchnorm=True), num_concepts=7, num_classes=10,
                                     training="sequential", concept_epochs=2)
    initial_head = {k: v.clone() for k, v in module.model.task_head.state_dict().items()}
    snaps = Snapshots()
    fit(module, seven_segment_digits, concept_helpers, tmp_path, epochs=4, callbacks=[snaps])
    # concept stage: the head never moves, the encoder does
    assert same(snaps.head[0], initial_head) and same(snaps.head[1], initial_head)
    assert not same(snaps.enc[0], snaps.enc[1])
    # task stage: the encoder (weights AND BatchNorm running stats) is frozen, the head learns
    assert same(snaps.enc[1], snaps.enc[2]) and same(snaps.enc[2], snaps.enc[3])
    assert not same(snaps.head[1], snaps.head[2])


def test_independent_head_learns_from_true_concepts_and_encoder_from_concept_loss_only(seven_segment_digits):
    module = ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10,
                                     training="independent", concept_loss_weight=0.5)
    batch = batch_of(seven_segment_digits["train"])
    quiet(module.training_step, batch, 0).backward()
    enc_grads = [p.grad.clone() for p in module.model.concept_encoder.parameters()]
    head_grads = [p.grad.clone() for p in module.model.task_head.parameters()]
    module.zero_grad()
    (0.5 * module.concept_loss(module.model.encode(batch["image"]), batch["concepts"])).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(enc_grads, module.model.concept_encoder.parameters()))
    module.zero_grad()
    F.cross_entropy(module.model.task_head(batch["concepts"]), batch["label"]).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(head_grads, module.model.task_head.parameters()))


def test_joint_loss_is_task_plus_lambda_times_summed_concept_bce(seven_segment_digits):
    pw = torch.linspace(0.5, 2.0, 7)
    module = ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10,
                                     concept_loss_weight=0.3, concept_weights=pw)
    batch = batch_of(seven_segment_digits["train"])
    loss = quiet(module.training_step, batch, 0)
    out = module.model(batch["image"])
    per_concept = [F.binary_cross_entropy_with_logits(out.concept_logits[:, j], batch["concepts"][:, j],
                                                      pos_weight=pw[j]) for j in range(7)]
    expected = F.cross_entropy(out.task_logits, batch["label"]) + 0.3 * torch.stack(per_concept).sum()
    assert torch.allclose(loss, expected)
    module.normalize_loss = True
    assert torch.allclose(quiet(module.training_step, batch, 0), expected / (1 + 0.3 * 7))


def test_joint_training_moves_both_parts_and_logs_val_metrics(seven_segment_digits, concept_helpers, tmp_path):
    module = ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, lr=3e-3)
    snaps = Snapshots()
    trainer = fit(module, seven_segment_digits, concept_helpers, tmp_path, epochs=2, callbacks=[snaps])
    assert not same(snaps.enc[0], snaps.enc[1]) and not same(snaps.head[0], snaps.head[1])
    for key in ("val/task_acc", "val/concept_acc", "val/loss", "val/task_loss", "val/concept_loss"):
        assert key in trainer.callback_metrics
    fresh = ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10)
    out = quiet(fresh.validation_step, batch_of(seven_segment_digits["val"], 8), 0)
    assert out["concept_logits"].shape == (8, 7) and out["task_logits"].shape == (8, 10)


def test_binary_task_from_tuple_batches_learns_xor(concept_helpers, tmp_path):
    x, c, y = make_xor(600, seed=0)
    ds = TensorDataset(x, c, y)
    enc = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
    head = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    module = ConceptBottleneckModule(concept_encoder=enc, num_concepts=2, task_head=head, num_classes=1, lr=1e-2)
    pl.seed_everything(0, verbose=False)
    trainer = concept_helpers.trainer(tmp_path, 15, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(ds, batch_size=64, shuffle=True), DataLoader(ds, batch_size=600))
    assert float(trainer.callback_metrics["val/concept_acc"]) > 0.95
    assert float(trainer.callback_metrics["val/task_acc"]) > 0.9


def test_constructor_and_batch_errors_name_the_fix(seven_segment_digits):
    with pytest.raises(ValueError, match="probability bottleneck"):
        ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, bottleneck="logit",
                                training="independent")
    with pytest.raises(ValueError, match="concept_epochs"):
        ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, training="sequential")
    with pytest.raises(ValueError, match="only applies"):
        ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, concept_epochs=3)
    with pytest.raises(ValueError, match="training must be"):
        ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, training="joined")
    with pytest.raises(ValueError, match="not both"):
        ConceptBottleneckModule(ConceptBottleneckModel(encoder(), 7, num_classes=10), concept_encoder=encoder())
    with pytest.raises(ValueError, match="7 positive"):
        ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10, concept_weights=[1.0])
    module = ConceptBottleneckModule(concept_encoder=encoder(), num_concepts=7, num_classes=10)
    batch = batch_of(seven_segment_digits["train"])
    with pytest.raises(KeyError, match="concept_key"):
        quiet(module.training_step, {"image": batch["image"], "label": batch["label"]}, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        quiet(module.training_step, {**batch, "label": batch["label"] + 10}, 0)
    with pytest.raises(ValueError, match="check concept_key"):
        quiet(module.training_step, {**batch, "concepts": batch["concepts"][:, :5]}, 0)
