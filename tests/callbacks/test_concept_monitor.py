"""ConceptMonitor end to end (TensorBoard read back) and the pure metrics behind it, on hand-built cases."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import _ddp
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Subset

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
def make_module(seven_segment_digits, bottleneck="soft"):
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 7))
    return ConceptBottleneckModule(concept_encoder=enc, num_concepts=7, num_classes=10, lr=3e-3,
                                   bottleneck=bottleneck, concept_names=seven_segment_digits["train"].concept_names)


def run(seven_segment_digits, concept_helpers, tmp_path, callbacks, epochs=2, logger=None, bottleneck="soft",
        module=None):
    pl.seed_everything(0, verbose=False)
    module = module or make_module(seven_segment_digits, bottleneck)
    trainer = concept_helpers.trainer(tmp_path, epochs, logger=logger if logger is not None else False,
                              callbacks=callbacks, limit_train_batches=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(seven_segment_digits["train"], batch_size=32, shuffle=True),
                    DataLoader(seven_segment_digits["val"], batch_size=128))
    return trainer, module


def read_scalars(log_dir):
    ea = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_monitor_logs_scalars_figure_and_table_to_tensorboard(seven_segment_digits, concept_helpers, tmp_path):
    monitor = ConceptMonitor(num_random_orders=3)
    trainer, _ = run(seven_segment_digits, concept_helpers, tmp_path, [monitor],
                     logger=TensorBoardLogger(str(tmp_path), name="tb"))
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


def test_monitor_does_not_change_training(seven_segment_digits, concept_helpers, tmp_path):
    _, plain = run(seven_segment_digits, concept_helpers, tmp_path / "a", [])
    _, watched = run(seven_segment_digits, concept_helpers, tmp_path / "b", [ConceptMonitor()])
    for (name, p), q in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(p, q), name


def test_monitor_compute_restores_modes_records_nothing_and_spares_the_global_rng(seven_segment_digits):
    module = make_module(seven_segment_digits, bottleneck="logit")
    model = module.model
    model.train()
    model(seven_segment_digits["train"].images[:64])  # a training pass: 64 logit rows recorded for intervention values
    count = int(model.logit_buffer_count)
    val = seven_segment_digits["val"]
    with torch.no_grad():
        logits = model.encode(val.images)
    state = torch.random.get_rng_state()
    metrics, curves = ConceptMonitor().compute(model, logits, val.concepts, val.labels.float())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules()) and int(model.logit_buffer_count) == count
    assert set(curves) == {"random", "uncertainty"} and curves["random"].shape == (5, 8)
    assert "concepts/leakage" in metrics


def test_monitor_works_under_validate_with_inference_mode_and_without_step_outputs(
    seven_segment_digits, concept_helpers, tmp_path
):
    class NoOutputs(ConceptBottleneckModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx, dataloader_idx)
            return None

    with_outputs, without_outputs = ConceptMonitor(), ConceptMonitor()
    pl.seed_everything(0, verbose=False)
    module = make_module(seven_segment_digits)
    plain = NoOutputs(concept_encoder=module.model.concept_encoder, task_head=module.model.task_head,
                      num_concepts=7, num_classes=10, concept_names=list("abcdefg"))
    for mod, monitor in ((module, with_outputs), (plain, without_outputs)):
        trainer = concept_helpers.trainer(tmp_path, 1, logger=TensorBoardLogger(str(tmp_path), name="v"),
                                          callbacks=[monitor])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(mod, DataLoader(seven_segment_digits["val"], batch_size=128))
    assert with_outputs.last_metrics and with_outputs.last_metrics == pytest.approx(without_outputs.last_metrics)
    ea = read_scalars(trainer.logger.log_dir)
    assert "concepts/leakage" in ea.Tags()["scalars"]


def test_monitor_errors(seven_segment_digits, concept_helpers, tmp_path):
    with pytest.raises(ValueError, match="policies"):
        ConceptMonitor(policies=("random", "entropy"))
    with pytest.raises(ValueError, match="num_random_orders"):
        ConceptMonitor(num_random_orders=0)
    with pytest.raises(TypeError, match="leakage must be a bool"):
        ConceptMonitor(leakage="yes")
    with pytest.raises(TypeError, match="concept_names must be a sequence"):
        ConceptMonitor(concept_names="abcdefg")
    with pytest.raises(TypeError, match="intervention_steps must be an int"):
        ConceptMonitor(intervention_steps=[0, 1.5])
    with pytest.raises(TypeError, match="concept_key must be an int, a str"):
        ConceptMonitor(concept_key=1.0)

    class NoCBM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 10)

        def validation_step(self, batch, batch_idx):
            return None

    trainer = concept_helpers.trainer(tmp_path, 1, callbacks=[ConceptMonitor()])
    with pytest.raises(ValueError, match="model_attr"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.validate(NoCBM(), DataLoader(seven_segment_digits["val"], batch_size=128))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"intervention_steps": [0, 9]}, ValueError, r"intervention_steps \[9\] lie outside \[0, 7\]"),
    ({"concept_names": list("abc")}, ValueError, "concept_names has 3 names but the model has 7 concepts"),
    ({"concept_key": "segments"}, ValueError, "concept_key='segments' does not select anything"),
    ({"target_key": "digit"}, ValueError, "target_key='digit' does not select anything"),
    ({"index_key": "row"}, ValueError, "index_key='row' does not select anything"),
    ({"model_attr": "model.task_head"}, TypeError, "model_attr='model.task_head' is a Linear"),
    ({"model_attr": "model.head"}, ValueError, "model_attr='model.head' is not a module of the model"),
    ({"concept_key": "label"}, ValueError, r"concept_key selects concepts of shape \(128,\)"),
])
def test_configuration_errors_stop_the_fit_before_the_first_training_step(
    seven_segment_digits, concept_helpers, tmp_path, kwargs, error, match
):
    """Before: a wrong concept_key only warned ("logs nothing") and intervention_steps failed after the first epoch."""
    module = make_module(seven_segment_digits)
    trainer = concept_helpers.trainer(tmp_path, 1, callbacks=[ConceptMonitor(**kwargs)], limit_train_batches=2)
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(seven_segment_digits["train"], batch_size=32),
                    DataLoader(seven_segment_digits["val"], batch_size=128))
    assert trainer.global_step == 0


def test_due_epochs_count_from_one_like_every_other_callback(seven_segment_digits, concept_helpers, tmp_path):
    """Regression: ConceptMonitor ran on ``epoch % n == 0`` (epochs 0, 2 of 4); now ``(epoch + 1) % n == 0`` plus the
    first and the last epoch of fit (0, 1, 3)."""
    monitor = ConceptMonitor(every_n_epochs=2, leakage=False, max_overhead=None)
    trainer, _ = run(seven_segment_digits, concept_helpers, tmp_path, [monitor], epochs=4,
                     logger=TensorBoardLogger(str(tmp_path), name="tb"))
    ea = read_scalars(trainer.logger.log_dir)
    epoch_steps = [e.step for e in ea.Scalars("val/task_acc")]  # one per validation epoch
    assert len(epoch_steps) == 4
    logged = [epoch_steps.index(e.step) for e in ea.Scalars("concepts/task_acc")]
    assert logged == [0, 1, 3]


def test_a_failing_part_is_reported_and_the_rest_is_logged(seven_segment_digits, concept_helpers, tmp_path,
                                                           monkeypatch):
    import lightning_lens.callbacks.concept_monitor as concept_monitor

    def broken_figure(*args, **kwargs):
        raise RuntimeError("the figure broke")

    monkeypatch.setattr(concept_monitor, "intervention_curve_figure", broken_figure)
    monitor = ConceptMonitor(num_random_orders=2, leakage=False, max_overhead=None)
    module = make_module(seven_segment_digits)
    trainer = concept_helpers.trainer(tmp_path, 2, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                                      callbacks=[monitor], limit_train_batches=3)
    with pytest.warns(RuntimeWarning, match=r"ConceptMonitor: 'figures' failed at epoch 0 with RuntimeError: the "
                                            r"figure broke"):
        trainer.fit(module, DataLoader(seven_segment_digits["train"], batch_size=32),
                    DataLoader(seven_segment_digits["val"], batch_size=128))
    assert trainer.current_epoch == 2  # trained to the end
    ea = read_scalars(trainer.logger.log_dir)
    assert len(ea.Scalars("concepts/task_acc")) == 2 and "concepts/intervention_curve" not in ea.Tags()["images"]
    assert any(t.startswith("lens_errors/ConceptMonitor") for t in ea.Tags()["tensors"])

    strict = ConceptMonitor(leakage=False, strict=True)
    trainer = concept_helpers.trainer(tmp_path, 1, callbacks=[strict], limit_train_batches=2)
    with pytest.raises(RuntimeError, match="the figure broke"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_module(seven_segment_digits), DataLoader(seven_segment_digits["train"], batch_size=32),
                    DataLoader(seven_segment_digits["val"], batch_size=128))


class NaNFirstImage(torch.utils.data.Dataset):
    """The validation digits with a NaN image at position 0 (its concept logits become NaN)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if i == 0:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_non_finite_samples_are_left_out_and_counted(seven_segment_digits, concept_helpers, tmp_path):
    val = seven_segment_digits["val"]
    module = make_module(seven_segment_digits)
    with_nan, without = ConceptMonitor(num_random_orders=2), ConceptMonitor(num_random_orders=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for monitor, data in ((with_nan, NaNFirstImage(val)), (without, Subset(val, range(1, len(val))))):
            trainer = concept_helpers.trainer(tmp_path, 1, callbacks=[monitor])
            trainer.validate(module, DataLoader(data, batch_size=128), verbose=False)
    assert with_nan.excluded == 1 and without.excluded == 0
    assert with_nan.last_num_samples == without.last_num_samples == len(val) - 1
    assert sum(f"left 1 of {len(val)} validation samples out" in str(w.message) for w in caught) == 1
    assert with_nan.last_metrics == pytest.approx(without.last_metrics, abs=1e-6)


def test_summary_line_at_the_end_of_fit(seven_segment_digits, concept_helpers, tmp_path, caplog):
    monitor = ConceptMonitor(num_random_orders=2, leakage=False)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        run(seven_segment_digits, concept_helpers, tmp_path, [monitor])
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_lens"]
    lines = [m for m in messages if "ConceptMonitor" in m]
    assert len(lines) == 1
    m = monitor.last_metrics
    assert lines[0].startswith("ConceptMonitor (epoch 1): task_acc ")
    assert f"task_acc {m['concepts/task_acc']:.3f}" in lines[0] and "intervention random k=0" in lines[0]


# ------------------------------------------------------------------------------- issue 18: a falling intervention curve
FALLING = [0.964, 0.867, 0.870, 0.880, 0.885, 0.890, 0.900, 0.903]  # the random curve, k = 0..7
RISING = [0.964, 0.970, 0.975, 0.980, 0.985, 0.990, 0.995, 1.0]


def test_monitor_flags_and_warns_once_about_a_falling_curve(seven_segment_digits, concept_helpers, tmp_path,
                                                            monkeypatch):
    """Fake curves (the issue's 0.964 -> 0.867 -> 0.903) through the monitor: drop and flag logged every epoch; one
    warning at the end of fit, naming the policy, the drop and where it happens, if the last evaluation falls; a
    fall of the barely trained head of epoch 0 alone is logged but not warned about."""
    import lightning_lens.interpretable_models.concept_bottleneck as concept_bottleneck

    def fit(random_curves):
        calls = iter(random_curves)

        def fake_curve(model, logits, concepts, targets, policy="random", steps=None, num_orders=1, generator=None):
            curve = torch.tensor(next(calls) if policy == "random" else RISING)
            return curve[list(steps)].expand(num_orders if policy == "random" else 1, -1)

        monkeypatch.setattr(concept_bottleneck, "intervention_curve", fake_curve)
        monitor = ConceptMonitor(num_random_orders=2, leakage=False, max_overhead=None)
        pl.seed_everything(0, verbose=False)
        trainer = concept_helpers.trainer(tmp_path, 2, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                                          callbacks=[monitor], limit_train_batches=6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(make_module(seven_segment_digits), DataLoader(seven_segment_digits["train"], batch_size=32),
                        DataLoader(seven_segment_digits["val"], batch_size=128))
        messages = [str(w.message) for w in caught if "intervention curve falls" in str(w.message)]
        return monitor, read_scalars(trainer.logger.log_dir), messages

    monitor, ea, messages = fit([FALLING, FALLING])
    for tag, values in (("random/drop", [0.097] * 2), ("random/falls", [1.0] * 2), ("uncertainty/drop", [0.0] * 2),
                        ("uncertainty/falls", [0.0] * 2)):
        assert [e.value for e in ea.Scalars(f"concepts/intervention/{tag}")] == pytest.approx(values), tag
    assert len(messages) == 1 and messages[0].startswith(
        "ConceptMonitor: the 'random' intervention curve falls by 0.097 at epoch 1 (task accuracy 0.964 with k=0 true "
        "concepts, 0.867 with k=1)")
    assert "leakage" in messages[0]  # a soft bottleneck: the advice points at leakage
    summary = monitor.last_evaluation.summary()  # the line logged at the end of fit
    assert "intervention random k=0 0.964 -> k=7 0.903 (falls by 0.097)" in summary
    assert "intervention uncertainty k=0 0.964 -> k=7 1.000," in summary + ","

    _, ea, messages = fit([FALLING, RISING])  # only the first epoch falls
    assert [e.value for e in ea.Scalars("concepts/intervention/random/falls")] == [1.0, 0.0]
    assert messages == []


def test_monitor_flags_the_old_logit_intervention_values_and_not_the_new(concept_helpers):
    """Regression (issue 18): the 95th-percentile values of a hand-set logit model make both curves fall from 0.9 to
    0.6; the default values do not, and nothing is flagged."""
    _, logits, concepts, labels = concept_helpers.tail_data()
    old = ConceptMonitor(leakage=False)
    with pytest.warns(UserWarning, match=r"intervention_calibration='percentile', intervention_rule='replace'"):
        metrics, _ = old.compute(concept_helpers.tail_model(**concept_helpers.KOH_INTERVENTIONS), logits, concepts,
                                 labels)
    for policy in ("random", "uncertainty"):
        assert metrics[f"concepts/intervention/{policy}/falls"] == 1.0
    assert metrics["concepts/intervention/uncertainty/drop"] == pytest.approx(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        metrics, _ = ConceptMonitor(leakage=False).compute(concept_helpers.tail_model(), logits, concepts, labels)
    for policy in ("random", "uncertainty"):
        assert metrics[f"concepts/intervention/{policy}/falls"] == 0.0
        assert metrics[f"concepts/intervention/{policy}/drop"] == 0.0
        assert metrics[f"concepts/intervention/{policy}/2"] == 1.0
    with pytest.raises(ValueError, match="curve_drop_tolerance must be <= 1.0"):
        ConceptMonitor(curve_drop_tolerance=2.0)


def test_validate_warns_about_the_old_logit_values_at_once(concept_helpers, tmp_path):
    """trainer.validate() evaluates once: the flag is logged and the warning given right away."""
    _, logits, concepts, labels = concept_helpers.tail_data()
    module = ConceptBottleneckModule(concept_helpers.tail_model(**concept_helpers.KOH_INTERVENTIONS))
    monitor = ConceptMonitor(leakage=False)
    trainer = concept_helpers.trainer(tmp_path, 1, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"the 'uncertainty' intervention curve falls by 0.300 at epoch 0 \(task "
                                         r"accuracy 0.900 with k=0 true concepts, 0.600 with k=2\)"):
        trainer.validate(module, DataLoader(torch.utils.data.TensorDataset(logits, concepts, labels), batch_size=50),
                         verbose=False)
    assert monitor.last_metrics["concepts/intervention/uncertainty/falls"] == 1.0


def test_state_key_tells_monitors_of_two_models_apart():
    assert ConceptMonitor(model_attr="a").state_key != ConceptMonitor(model_attr="b").state_key
    assert ConceptMonitor().state_key == ConceptMonitor().state_key


@pytest.mark.slow
def test_ddp_two_processes_log_the_same_numbers_as_one(tmp_path):
    """2 gloo processes vs 1 on 301 validation digits without an index key (the DistributedSampler repeats one):
    rank-safe position ids drop the repeat and put rows in the same order, so every logged number is equal."""
    script = Path(__file__).with_name("concept_monitor_ddp_script.py")
    one = _ddp.load_script(script).run_validate(devices=1, root=str(tmp_path / "one"))
    rank0, _ = _ddp.run(script, tmp_path / "two")
    assert rank0["num_samples"] == one["num_samples"] == 301
    assert rank0["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
    event_files = list((tmp_path / "two").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1  # only rank zero logs
    logged = {k: v for k, v in _ddp.read_scalars(str(event_files[0].parent)).items() if k.startswith("concepts/")}
    assert set(logged) == set(one["metrics"])
    assert logged == pytest.approx({k: one["logged"][k] for k in logged}, abs=1e-6)
