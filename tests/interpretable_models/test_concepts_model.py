"""ConceptBottleneckModel: bottlenecks, interventions and intervention values checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.interpretable_models import ConceptBottleneckModel
from lightning_lens.interpretable_models.concept_bottleneck import (
    ConceptEvaluation,
    check_policies,
    concept_leakage,
    concept_pos_weight,
    evaluate_concepts,
    intervention_curve,
    intervention_mask,
    intervention_steps,
    leakage_probe,
    logit_intervention_values,
)


class FixedLogits(nn.Module):
    """An "encoder" whose concept logits are the inputs themselves (times a trainable scale for gradient tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


LOGITS = torch.tensor([[2.0, -1.0, 0.0, 3.0], [-2.0, 0.5, -0.5, 1.0]])


def head(num_concepts=4, num_classes=3):
    lin = nn.Linear(num_concepts, num_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(num_concepts * num_classes, dtype=torch.float32).reshape(num_classes, -1) / 10)
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return lin


def cbm(bottleneck="soft", **kw):
    return ConceptBottleneckModel(FixedLogits(), 4, task_head=head(), num_classes=3, bottleneck=bottleneck, **kw)


# ----------------------------------------------------------------------------------------------- bottlenecks
def test_soft_bottleneck_is_the_sigmoid_and_the_head_sees_it():
    m = cbm("soft")
    out = m(LOGITS)
    assert torch.equal(out.concept_logits, LOGITS)
    assert torch.allclose(out.bottleneck, torch.sigmoid(LOGITS))
    assert torch.allclose(out.concept_probs, torch.sigmoid(LOGITS))
    assert torch.allclose(out.task_logits, m.task_head(torch.sigmoid(LOGITS)))
    assert out.intervened is None


def test_logit_bottleneck_passes_logits():
    m = cbm("logit", intervention_values=(-5.0, 5.0))
    out = m(LOGITS)
    assert torch.equal(out.bottleneck, LOGITS)


def test_hard_bottleneck_thresholds_at_one_half_with_straight_through_gradient():
    m = cbm("hard")
    x = LOGITS.clone()
    out = m(x)
    assert torch.equal(out.bottleneck, torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]))  # p=0.5 -> 1
    out.task_logits[:, 0].sum().backward()
    # straight-through: d bottleneck / d scale is the soft path's sigmoid'(z) * z
    s = torch.sigmoid(LOGITS)
    expected = (m.task_head.weight[0] * s * (1 - s) * LOGITS).sum()
    assert torch.allclose(m.concept_encoder.scale.grad, expected)


def test_hard_bottleneck_without_gradient_blocks_the_task_loss():
    m = cbm("hard", hard_gradient="none")
    out = m(LOGITS.clone())
    out.task_logits.sum().backward()
    assert m.concept_encoder.scale.grad is None or float(m.concept_encoder.scale.grad) == 0.0


# --------------------------------------------------------------------------------------------- interventions
@pytest.mark.parametrize(
    "intervene, expected",
    [
        ([1, 3], [[0, 1, 0, 1], [0, 1, 0, 1]]),
        (2, [[0, 0, 1, 0], [0, 0, 1, 0]]),
        (torch.tensor([0]), [[1, 0, 0, 0], [1, 0, 0, 0]]),
        (torch.tensor([True, False, False, True]), [[1, 0, 0, 1], [1, 0, 0, 1]]),
        (torch.tensor([[True, False, False, False], [False, False, True, True]]), [[1, 0, 0, 0], [0, 0, 1, 1]]),
        (torch.tensor([[3], [1]]), [[0, 0, 0, 1], [0, 1, 0, 0]]),
        ("all", [[1, 1, 1, 1], [1, 1, 1, 1]]),
        ([], [[0, 0, 0, 0], [0, 0, 0, 0]]),
    ],
)
def test_intervention_replaces_exactly_the_chosen_concepts(intervene, expected):
    m = cbm("soft")
    truth = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    out = m(LOGITS, intervene=intervene, concept_values=truth)
    mask = torch.tensor(expected, dtype=torch.bool)
    assert torch.equal(out.intervened, mask)
    want = torch.where(mask, truth, torch.sigmoid(LOGITS))
    assert torch.equal(out.bottleneck, want)
    assert torch.allclose(out.task_logits, m.task_head(want))
    # the model's own predictions are reported untouched
    assert torch.equal(out.concept_logits, LOGITS)


def test_values_outside_the_intervention_may_be_unknown():
    m = cbm("soft")
    truth = torch.tensor([[1.0, float("nan"), float("nan"), float("nan")]] * 2)
    out = m(LOGITS, intervene=[0], concept_values=truth)
    assert torch.equal(out.bottleneck[:, 0], torch.ones(2))
    assert torch.isfinite(out.task_logits).all()


def test_intervened_concepts_get_no_gradient_from_the_task():
    m = cbm("soft")
    x = LOGITS.clone().requires_grad_(True)
    m(x, intervene=[0, 2], concept_values=torch.zeros(2, 4)).task_logits.sum().backward()
    assert torch.equal(x.grad[:, [0, 2]], torch.zeros(2, 2))
    assert bool((x.grad[:, [1, 3]] != 0).all())


def test_hard_intervention_takes_binary_values():
    m = cbm("hard")
    out = m(LOGITS, intervene=[1], concept_values=torch.ones(2, 4))
    assert torch.equal(out.bottleneck[:, 1], torch.ones(2))
    with pytest.raises(ValueError, match="0/1"):
        m(LOGITS, intervene=[1], concept_values=torch.full((2, 4), 0.5))


def test_intervention_mask_forms():
    assert intervention_mask(None, 2, 3) is None
    assert intervention_mask(torch.tensor([[0, 2]]), 1, 3).tolist() == [[True, False, True]]
    assert intervention_mask([True, False, True], 1, 3).tolist() == [[True, False, True]]  # a mask, not indices
    assert intervention_mask((0, 2), 1, 3).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        intervention_mask([3], 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        intervention_mask([-1], 2, 3)
    with pytest.raises(TypeError, match="bool"):
        intervention_mask(torch.tensor([1.0, 0.0, 0.0]), 2, 3)
    with pytest.raises(ValueError, match="shape"):
        intervention_mask(torch.ones(3, 3, dtype=torch.bool), 2, 3)
    with pytest.raises(ValueError, match="'all'"):
        intervention_mask("some", 2, 3)
    with pytest.raises(TypeError):
        intervention_mask(True, 2, 3)


# ---------------------------------------------------------------------------------- logit intervention values
def test_logit_bottleneck_needs_intervention_values_first():
    m = cbm("logit")
    m(LOGITS)  # train mode: two rows recorded, too few for percentiles
    with pytest.raises(RuntimeError, match="calibrate_intervention_values"):
        m(LOGITS, intervene=[0], concept_values=torch.ones(2, 4))


def test_running_percentiles_come_from_recent_training_logits_only():
    m = cbm("logit", logit_buffer_size=4, intervention_calibration="percentile", intervention_rule="replace")
    rows = torch.arange(24, dtype=torch.float32).reshape(6, 4)  # 6 rows into a ring of 4: the last 4 stay
    m.train()
    m(rows[:3])
    m(rows[3:])
    m.eval()
    m(torch.full((5, 4), 1000.0))  # eval passes are not recorded
    off, on = m.intervention_values()
    kept = rows[2:]
    assert torch.allclose(off, torch.quantile(kept, 0.05, dim=0))
    assert torch.allclose(on, torch.quantile(kept, 0.95, dim=0))
    out = m(LOGITS, intervene=[0, 1], concept_values=torch.tensor([[1.0, 0.0, 0, 0], [0.5, 1.0, 0, 0]]))
    assert torch.allclose(out.bottleneck[0, :2], torch.stack([on[0], off[1]]))
    assert torch.allclose(out.bottleneck[1, :2], torch.stack([(off[0] + on[0]) / 2, on[1]]))


def test_calibration_uses_exact_percentiles_restores_modes_and_survives_state_dict():
    m = cbm("logit", intervention_calibration="percentile")
    data = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    loader = [(data[i:i + 50], torch.zeros(50, 4), torch.zeros(50)) for i in range(0, 200, 50)]
    m.train()
    off, on = m.calibrate_intervention_values(loader)
    assert m.training and all(mod.training for mod in m.modules())
    assert int(m.logit_buffer_count) == 0  # calibration passes are not training logits
    assert torch.allclose(off, torch.quantile(data, 0.05, dim=0)) and torch.allclose(on, torch.quantile(data, 0.95, 0))
    clone = cbm("logit")
    clone.load_state_dict(m.state_dict())
    assert torch.equal(clone.intervention_values()[1], on)
    m.reset_intervention_values()
    with pytest.raises(RuntimeError):
        m.intervention_values()
    # the default calibration: the median logit on each side of 0, per concept
    off, on = cbm("logit").calibrate_intervention_values(loader)
    for j in range(4):
        col = data[:, j]
        assert off[j] == pytest.approx(float(torch.quantile(col[col < 0], 0.5)))
        assert on[j] == pytest.approx(float(torch.quantile(col[col >= 0], 0.5)))


def test_state_median_values_mirror_a_side_without_logits():
    logits = torch.tensor([[1.0, -2.0, -1.0], [3.0, -4.0, 2.0], [5.0, -6.0, 8.0]])
    off, on = logit_intervention_values(logits)
    assert off.tolist() == [-3.0, -4.0, -1.0] and on.tolist() == [3.0, 4.0, 5.0]
    off, on = logit_intervention_values(torch.zeros(4, 1))  # every logit exactly 0: keep off < on
    assert off.tolist() == [pytest.approx(-1e-3)] and on.tolist() == [0.0]
    with pytest.raises(ValueError, match="calibration must be one of"):
        logit_intervention_values(logits, "mean")
    with pytest.raises(ValueError, match="intervention_calibration must be one of"):
        cbm("logit", intervention_calibration="quantile")
    with pytest.raises(ValueError, match="intervention_rule must be one of"):
        cbm("logit", intervention_rule="max")


def test_clamp_rule_only_moves_logits_towards_the_true_state():
    m = cbm("logit", intervention_values=(-2.0, 1.5))
    x = LOGITS.clone().requires_grad_(True)  # [[2, -1, 0, 3], [-2, 0.5, -0.5, 1]]
    truth = torch.tensor([[1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.0]])
    out = m(x, intervene="all", concept_values=truth)
    # on: max(logit, 1.5); off: min(logit, -2); the fractional 0.5 interpolates: -2 + 0.5 * 3.5
    assert out.bottleneck.tolist() == [[2.0, 1.5, -2.0, -0.25], [-2.0, 1.5, 1.5, -2.0]]
    out.task_logits.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 4))  # kept logits are given values too: no task gradient
    replace = cbm("logit", intervention_values=(-2.0, 1.5), intervention_rule="replace")
    assert replace(LOGITS, intervene="all", concept_values=truth).bottleneck.tolist() == [
        [1.5, 1.5, -2.0, -0.25], [-2.0, 1.5, 1.5, -2.0]]
    states = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # hard_bottleneck has no logits to keep: the values themselves
    assert m.hard_bottleneck(states).tolist() == replace.hard_bottleneck(states).tolist() == [[1.5, -2.0, -2.0, 1.5]]


def test_probability_bottlenecks_intervene_with_zero_and_one():
    off, on = cbm("soft").intervention_values()
    assert off.tolist() == [0.0] * 4 and on.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="logit"):
        cbm("soft").calibrate_intervention_values([])
    with pytest.raises(ValueError, match="only applies"):
        cbm("soft", intervention_values=(-5.0, 5.0))


# ------------------------------------------------------------------------------------------------- errors etc.
def test_clear_errors_for_bad_shapes_and_arguments():
    m = cbm("soft")
    with pytest.raises(ValueError, match=r"num_concepts\) = \(B, 4\)"):
        m(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="concept_values must have shape"):
        m(LOGITS, intervene=[0], concept_values=torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs concept_values"):
        m(LOGITS, intervene=[0])
    with pytest.raises(ValueError, match="without intervene"):
        m(LOGITS, concept_values=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(LOGITS, intervene=[0], concept_values=torch.full((2, 4), 2.0))
    with pytest.raises(ValueError, match="num_classes"):
        ConceptBottleneckModel(FixedLogits(), 4)
    with pytest.raises(ValueError, match="num_classes=5"):
        ConceptBottleneckModel(FixedLogits(), 4, task_head=head(), num_classes=5)(LOGITS)
    with pytest.raises(ValueError, match="bottleneck"):
        ConceptBottleneckModel(FixedLogits(), 4, num_classes=3, bottleneck="sigmoid")
    with pytest.raises(ValueError, match="concept_names"):
        ConceptBottleneckModel(FixedLogits(), 4, num_classes=3, concept_names=["a"])


def test_contributions_of_a_linear_head_add_up_to_the_logit():
    m = cbm("soft")
    out = m(LOGITS)
    contrib = m.concept_contributions(out)
    pred = out.task_logits.argmax(1)
    assert torch.allclose(contrib.sum(1) + m.task_head.bias[pred], out.task_logits.gather(1, pred[:, None])[:, 0])


def test_concept_pos_weight_is_negatives_over_positives():
    c = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert concept_pos_weight(c, max_weight=50.0).tolist() == pytest.approx([3.0, 3.0, 1.0 / 50.0])


# ------------------------------------------------------------------ what ConceptMonitor computes, without Lightning
def copy_first_concept_model(bottleneck="soft", **kw):
    """Two concepts ``a``, ``b``; the head predicts class 1 iff concept ``a``'s value is above 0.5 (``b`` ignored)."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
        lin.bias.copy_(torch.tensor([5.0, -5.0]))
    return ConceptBottleneckModel(nn.Identity(), 2, task_head=lin, num_classes=2, concept_names=["a", "b"],
                                  bottleneck=bottleneck, **kw)


def unsure_and_wrong(n=40):
    """Concept ``a`` predicted wrong but unsure (p = 0.4 / 0.6), ``b`` right and confident; labels = true ``a``."""
    truth = torch.stack([torch.arange(n) % 2, torch.zeros(n, dtype=torch.long)], 1).float()
    logits = torch.stack([torch.where(truth[:, 0] > 0, -0.4, 0.4), torch.full((n,), -5.0)], 1)
    return logits, truth, truth[:, 0].long()


def test_evaluate_concepts_by_hand():
    model = copy_first_concept_model()
    logits, truth, labels = unsure_and_wrong()
    result = evaluate_concepts(model, logits, truth, labels, policies=("uncertainty", "random"), num_random_orders=3,
                               leakage=False)
    m = result.metrics
    assert m["a/acc"] == 0.0 and m["b/acc"] == 1.0 and m["mean_acc"] == 0.5
    assert m["a/auroc"] == 0.0 and "b/auroc" not in m and m["mean_auroc"] == 0.0  # b is constant: no AUROC
    assert m["task_acc"] == 0.0 and m["leakage/head_gap"] == 0.0  # the hard states are as wrong as the soft ones
    assert [m[f"intervention/uncertainty/{k}"] for k in range(3)] == [0.0, 1.0, 1.0]
    assert m["intervention/random/0"] == 0.0 and m["intervention/random/2"] == 1.0
    assert result.steps == [0, 1, 2] and result.curves["uncertainty"].tolist() == [[0.0, 1.0, 1.0]]
    assert result.curves["random"].shape == (3, 3) and result.skipped == {}
    # the curves are intervention_curve's, with the seeded private generator
    random = intervention_curve(model, logits, truth, labels, "random", num_orders=3,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.curves["random"], random)
    assert result.table_rows()[0][:2] == ["a", 0.0] and result.table_rows()[1][2] != result.table_rows()[1][2]
    assert result.summary() == ("task_acc 0.000, concept mean_acc 0.500, concept mean_auroc 0.000, intervention "
                                "random k=0 0.000 -> k=2 1.000, intervention uncertainty k=0 0.000 -> k=2 1.000")


def test_evaluate_concepts_leakage_is_the_probe_on_soft_against_hard_concepts():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (120,), generator=gen)
    logits = torch.stack([torch.where(y > 0, -0.2, -3.0), torch.randn(120, generator=gen)], 1)  # a: off, but leaks y
    model = copy_first_concept_model()
    result = evaluate_concepts(model, logits, (logits >= 0).float(), y, leakage_folds=4, seed=3)
    probe = leakage_probe(torch.sigmoid(logits), (logits >= 0).float(), y, folds=4, seed=3)
    assert concept_leakage(logits, y, folds=4, seed=3) == {"leakage": probe["gap"], "leakage/soft_acc":
                                                           probe["soft_acc"], "leakage/hard_acc": probe["hard_acc"]}
    assert result.metrics["leakage"] == probe["gap"] and probe["gap"] > 0.3
    assert "leakage" in evaluate_concepts(model, logits[:3], (logits[:3] >= 0).float(), torch.tensor([0, 1, 1])).skipped


def test_evaluate_concepts_says_what_it_skipped():
    model = copy_first_concept_model()
    logits, truth, labels = unsure_and_wrong()
    unlabelled = evaluate_concepts(model, logits, truth, None)
    assert set(unlabelled.metrics) == {"a/acc", "b/acc", "a/auroc", "mean_acc", "mean_auroc"}
    assert "target_key" in unlabelled.skipped["task"] and unlabelled.curves == {}
    fresh = copy_first_concept_model(bottleneck="logit")  # no intervention values yet
    result = evaluate_concepts(fresh, logits, truth, labels, leakage=False)
    assert "task_acc" in result.metrics and not any(k.startswith("intervention/") for k in result.metrics)
    assert "no intervention values yet" in result.skipped["interventions"]


def test_evaluate_concepts_leaves_the_model_and_the_global_rng_alone():
    model = copy_first_concept_model(bottleneck="logit", intervention_values=(-4.0, 4.0)).train()
    logits, truth, labels = unsure_and_wrong()
    state, buffers = torch.random.get_rng_state(), {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_concepts(model, logits, truth, labels)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def test_evaluation_arguments_are_checked():
    model = copy_first_concept_model()
    logits, truth, labels = unsure_and_wrong()
    with pytest.raises(ValueError, match="concept_names has 3 names but there are 2 concepts"):
        evaluate_concepts(model, logits, truth, labels, concept_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"intervention_steps \[3\] lie outside \[0, 2\]"):
        evaluate_concepts(model, logits, truth, labels, steps=[0, 3])
    assert intervention_steps(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    with pytest.raises(ValueError, match="distinct names"):
        check_policies(["random", "random"])
    with pytest.raises(TypeError, match="policies must be a policy or a sequence"):
        check_policies(3)
    assert isinstance(evaluate_concepts(model, logits, truth, labels, leakage=False), ConceptEvaluation)
