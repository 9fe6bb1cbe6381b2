"""ConceptBottleneckModel: bottlenecks, interventions and intervention values checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lens.interpretable_models import ConceptBottleneckModel
from lightning_lens.interpretable_models.concept_bottleneck import (
    concept_pos_weight,
    intervention_mask,
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
    m = cbm("logit", logit_buffer_size=4)
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
    m = cbm("logit")
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
