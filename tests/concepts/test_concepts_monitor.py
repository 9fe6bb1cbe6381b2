"""ConceptMonitor end to end (TensorBoard read back) and the pure metrics behind it, on hand-built cases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import pl
from lightning_lens.callbacks import ConceptMonitor
from lightning_lens.interpretable_models import ConceptBottleneckModel, ConceptBottleneckModule
from lightning_lens.interpretable_models.concept_bottleneck import (
    concept_accuracy_auroc,
    intervention_curve,
    intervention_order,
    leakage_probe,
)


# ------------------------------------------------------------------------------------------ pure parts, by hand
class Identity(nn.Module):
    def forward(self, x):
        return x


def copy_first_concept_model():
    """Two concepts; the head predicts class 1 iff concept 0 is on (concept 1 is ignored)."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
        head.bias.copy_(torch.tensor([5.0, -5.0]))  # class 1 iff the concept-0 value is above 0.5
    return ConceptBottleneckModel(Identity(), 2, task_head=head, num_classes=2)


def test_intervention_curve_by_hand():
    model = copy_first_concept_model()
    n = 400
    truth = torch.stack([torch.arange(n) % 2, torch.zeros(n, dtype=torch.long)], 1).float()
    # concept 0 is predicted wrong but unsure (p = 0.4 / 0.6); concept 1 right and confident
    logits = torch.stack([torch.where(truth[:, 0] > 0, -0.4, 0.4), torch.full((n,), -5.0)], 1)
    labels = truth[:, 0].long()
    unc = intervention_curve(model, logits, truth, labels, "uncertainty")
    assert unc.tolist() == [[0.0, 1.0, 1.0]]
    rand = intervention_curve(model, logits, truth, labels, "random", num_orders=4,
                              generator=torch.Generator().manual_seed(0))
    assert rand.shape == (4, 3)
    assert rand[:, 0].tolist() == [0.0] * 4 and rand[:, 2].tolist() == [1.0] * 4
    assert abs(float(rand[:, 1].mean()) - 0.5) < 0.05  # half of the examples get concept 0 first
    assert intervention_curve(model, logits, truth, labels, "random", steps=[2]).tolist() == [[1.0]]


def test_intervention_order_policies():
    probs = torch.tensor([[0.9, 0.45, 0.2, 0.5]])
    assert intervention_order("uncertainty", probs).tolist() == [[3, 1, 2, 0]]
    state = torch.random.get_rng_state()
    a = intervention_order("random", probs.expand(50, 4), torch.Generator().manual_seed(1))
    b = intervention_order("random", probs.expand(50, 4), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.sort(1).values, torch.arange(4).expand(50, 4))
    reverse = intervention_order(lambda p, g: torch.arange(3, -1, -1).expand(p.shape[0], 4), probs)
    assert reverse.tolist() == [[3, 2, 1, 0]]
    with pytest.raises(ValueError, match="permutations"):
        intervention_order(lambda p, g: torch.zeros(1, 4), probs)
    with pytest.raises(ValueError, match="policy"):
        intervention_order("entropy", probs)


def test_concept_accuracy_and_auroc_against_hand_values():
    logits = torch.tensor([[2.0, 1.0], [-1.0, 1.0], [0.5, 1.0], [-3.0, 1.0]])
    truth = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    acc, auroc = concept_accuracy_auroc(logits, truth)
    assert acc.tolist() == [0.5, 1.0]
    # positives score 2.0 and -3.0, negatives -1.0 and 0.5: 2 of 4 pairs ranked right
    assert float(auroc[0]) == pytest.approx(0.5) and math.isnan(float(auroc[1]))


def test_leakage_probe_detects_information_beyond_the_concepts():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    hard = torch.zeros(300, 3)  # every concept is "off" ...
    soft = 0.1 + 0.3 * y[:, None].float() * torch.tensor([1.0, 0.0, 0.0])  # ... but its probability encodes y
    leak = leakage_probe(soft, hard, y)
    assert leak["soft_acc"] == 1.0 and abs(leak["hard_acc"] - 0.5) < 0.1 and leak["gap"] > 0.4
    none = leakage_probe(hard + y[:, None].float(), hard + y[:, None].float(), y)
    assert none == {"soft_acc": 1.0, "hard_acc": 1.0, "gap": 0.0}
    assert leakage_probe(soft[:3], hard[:3], torch.tensor([0, 1, 1])) is None  # one example of class 0


# ----------------------------------------------------------------------------------------------------- callback
def make_module(digits, bottleneck="soft"):
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 7))
    return ConceptBottleneckModule(concept_encoder=enc, num_concepts=7, num_classes=10, lr=3e-3,
                                   bottleneck=bottleneck, concept_names=digits["train"].concept_names)


def run(digits, helpers, tmp_path, callbacks, epochs=2, logger=None, bottleneck="soft", module=None):
    pl.seed_everything(0, verbose=False)
    module = module or make_module(digits, bottleneck)
    trainer = helpers.trainer(tmp_path, epochs, logger=logger if logger is not None else False,
                              callbacks=callbacks, limit_train_batches=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(digits["train"], batch_size=32, shuffle=True),
                    DataLoader(digits["val"], batch_size=128))
    return trainer, module


def read_scalars(log_dir):
    ea = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_monitor_logs_scalars_figure_and_table_to_tensorboard(digits, helpers, tmp_path):
    monitor = ConceptMonitor(num_random_orders=3)
    trainer, _ = run(digits, helpers, tmp_path, [monitor], logger=TensorBoardLogger(str(tmp_path), name="tb"))
    ea = read_scalars(trainer.logger.log_dir)
    scalars = set(ea.Tags()["scalars"])
    expected = {f"concepts/{s}/{m}" for s in "abcdefg" for m in ("acc", "auroc")}
    expected |= {f"concepts/intervention/{p}/{k}" for p in ("random", "uncertainty") for k in range(8)}
    expected |= {"concepts/task_acc", "concepts/mean_acc", "concepts/mean_auroc", "concepts/leakage",
                 "concepts/leakage/soft_acc", "concepts/leakage/hard_acc", "concepts/leakage/head_gap"}
    assert expected <= scalars, expected - scalars
    for tag in expected:
        events = ea.Scalars(tag)
        assert len(events) == 2  # one per validation epoch; the sanity check is skipped
        assert events[-1].value == pytest.approx(monitor.last_metrics[tag], abs=1e-6)
    assert "concepts/intervention_curve" in ea.Tags()["images"] and len(ea.Images("concepts/intervention_curve")) == 2
    assert any(t.startswith("concepts/per_concept") for t in ea.Tags()["tensors"])
    # consistent with the model: full intervention with a partly trained head is whatever the head decodes,
    # k = 0 is the task accuracy and every value is an accuracy
    m = monitor.last_metrics
    assert m["concepts/intervention/random/0"] == pytest.approx(m["concepts/task_acc"])
    assert m["concepts/intervention/uncertainty/0"] == pytest.approx(m["concepts/task_acc"])
    assert m["concepts/intervention/random/7"] == pytest.approx(m["concepts/intervention/uncertainty/7"])
    assert m["concepts/leakage"] == pytest.approx(m["concepts/leakage/soft_acc"] - m["concepts/leakage/hard_acc"])
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if "leakage" not in k)


def test_monitor_does_not_change_training(digits, helpers, tmp_path):
    _, plain = run(digits, helpers, tmp_path / "a", [])
    _, watched = run(digits, helpers, tmp_path / "b", [ConceptMonitor()])
    for (name, p), q in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(p, q), name


def test_monitor_compute_restores_modes_records_nothing_and_spares_the_global_rng(digits):
    module = make_module(digits, bottleneck="logit")
    model = module.model
    model.train()
    model(digits["train"].images[:64])  # a training pass: 64 logit rows recorded for the intervention values
    count = int(model.logit_buffer_count)
    val = digits["val"]
    with torch.no_grad():
        logits = model.encode(val.images)
    state = torch.random.get_rng_state()
    metrics, curves = ConceptMonitor().compute(model, logits, val.concepts, val.labels.float())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules()) and int(model.logit_buffer_count) == count
    assert set(curves) == {"random", "uncertainty"} and curves["random"].shape == (5, 8)
    assert "concepts/leakage" in metrics


def test_monitor_works_under_validate_with_inference_mode_and_without_step_outputs(digits, helpers, tmp_path):
    class NoOutputs(ConceptBottleneckModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx, dataloader_idx)
            return None

    with_outputs, without_outputs = ConceptMonitor(), ConceptMonitor()
    pl.seed_everything(0, verbose=False)
    module = make_module(digits)
    plain = NoOutputs(concept_encoder=module.model.concept_encoder, task_head=module.model.task_head,
                      num_concepts=7, num_classes=10, concept_names=list("abcdefg"))
    for mod, monitor in ((module, with_outputs), (plain, without_outputs)):
        trainer = helpers.trainer(tmp_path, 1, logger=TensorBoardLogger(str(tmp_path), name="v"), callbacks=[monitor])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(mod, DataLoader(digits["val"], batch_size=128))
    assert with_outputs.last_metrics and with_outputs.last_metrics == pytest.approx(without_outputs.last_metrics)
    ea = read_scalars(trainer.logger.log_dir)
    assert "concepts/leakage" in ea.Tags()["scalars"]


def test_monitor_errors(digits, helpers, tmp_path):
    with pytest.raises(ValueError, match="policies"):
        ConceptMonitor(policies=("random", "entropy"))
    with pytest.raises(ValueError, match="num_random_orders"):
        ConceptMonitor(num_random_orders=0)

    class NoCBM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 10)

        def validation_step(self, batch, batch_idx):
            return None

    trainer = helpers.trainer(tmp_path, 1, callbacks=[ConceptMonitor()])
    with pytest.raises(ValueError, match="model_attr"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(NoCBM(), DataLoader(digits["val"], batch_size=128))
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        ConceptMonitor(intervention_steps=[0, 9])._steps(7)
