"""Issue 18: interventions on a logit bottleneck must not lower task accuracy (the falling intervention curve).

Before the fix a ``bottleneck="logit"`` model intervened with the 5th/95th percentiles of all training logits (Koh et
al.'s ``tti.py``). A jointly trained head reads concept magnitudes, and those tail values lie outside the range it uses:
on the seven-segment digits, 20 epochs gave task accuracy 0.96-0.98 but 0.70-0.90 with every concept set to its true
value. Now the values are the median logit of the training examples on each side of the decision boundary, and an
intervention only ever moves a logit towards its true state (``intervention_rule="clamp"``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _concepts import KOH_INTERVENTIONS, tail_data, tail_model
from torch import nn

from lightning_lens.interpretable_models import ConceptBottleneckModel
from lightning_lens.interpretable_models.concept_bottleneck import (
    CurveDrop,
    falling_intervention_curves,
    intervention_curve,
    intervention_curve_drop,
)


def test_intervening_on_every_concept_does_not_lower_accuracy_with_a_hand_set_head():
    """Before: the "on" value of concept 0 was its 95th percentile, 30, and every class-2 prototype (30, 3) was read
    as class 1: intervening on all concepts dropped accuracy from 0.90 to 0.60."""
    _, logits, concepts, labels = tail_data()
    model = tail_model()
    off, on = model.intervention_values()
    assert off.tolist() == [-3.0, -3.0] and on.tolist() == [3.0, 3.0]  # medians of each side of 0
    for policy in ("random", "uncertainty"):
        curve = intervention_curve(model, logits, concepts, labels, policy, num_orders=4,
                                   generator=torch.Generator().manual_seed(0)).mean(0)
        assert curve[0] == pytest.approx(0.9) and curve[-1] == 1.0
        assert bool((curve[1:] >= curve[:-1]).all()), curve  # never falls
    koh = tail_model(**KOH_INTERVENTIONS)
    assert koh.intervention_values()[1][0] == 30.0
    old = intervention_curve(koh, logits, concepts, labels, "uncertainty")[0]
    assert old[0] == pytest.approx(0.9) and old[-1] == pytest.approx(60 / 100)  # class 2 (30 examples + 10) lost


# ------------------------------------------------------------------------------------ a trained joint logit model
def train_joint_logit_model(digits, epochs: int, seed: int, hidden: int, **kwargs) -> ConceptBottleneckModel:
    """ConceptBottleneckModule's joint loss (task CE + sum of concept BCEs, lambda = 1, Adam 3e-3, batches of 64) in
    a plain loop: a few seconds instead of Lightning's per-step overhead. Private generators, global RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, 7))
        model = ConceptBottleneckModel(enc, 7, num_classes=10, bottleneck="logit", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = digits["train"]
    x, c, y = train.images, train.concepts, train.labels
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(y), generator=gen).split(64):
            out = model(x[b])
            loss = F.cross_entropy(out.task_logits, y[b])
            loss = loss + F.binary_cross_entropy_with_logits(out.concept_logits, c[b], reduction="none").mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_intervening_on_every_concept_does_not_lower_accuracy_after_joint_training(seven_segment_digits):
    """Before (the same trained model with the old values): task accuracy 0.955, 0.70 with every concept intervened
    on; the random curve fell by 0.25. Now: 0.99, and neither curve falls."""
    model = train_joint_logit_model(seven_segment_digits, epochs=10, seed=0, hidden=128)
    test = seven_segment_digits["test"]
    with torch.no_grad():
        logits = model.encode(test.images)

    def curves(m):
        random = intervention_curve(m, logits, test.concepts, test.labels, "random", num_orders=5,
                                    generator=torch.Generator().manual_seed(0)).mean(0)
        return random, intervention_curve(m, logits, test.concepts, test.labels, "uncertainty")[0]

    random, uncertainty = curves(model)
    assert random[0] > 0.9  # the model is trained
    assert random[-1] >= random[0] and uncertainty[-1] >= uncertainty[0]
    assert intervention_curve_drop(random, range(8)).drop <= 0.01  # the curve does not fall
    assert intervention_curve_drop(uncertainty, range(8)).drop <= 0.01
    koh = ConceptBottleneckModel(copy.deepcopy(model.concept_encoder), 7, num_classes=10, bottleneck="logit",
                                 **KOH_INTERVENTIONS)
    koh.load_state_dict(model.state_dict())  # the same weights and training logits, the old intervention values
    old_random, _ = curves(koh.eval())
    assert old_random[0] == random[0] and old_random[-1] < random[0] - 0.1
    assert intervention_curve_drop(old_random, range(8)).drop > 0.1


# ------------------------------------------------------------------------------------ detecting a falling curve
def test_curve_drop_is_the_largest_fall_to_a_later_k():
    # the curve of the issue: 0.964 -> 0.867 -> 0.903
    assert intervention_curve_drop([0.964, 0.867, 0.903], [0, 1, 2]) == CurveDrop(0.097, 0, 1, 0.964, 0.867)
    # the largest fall need not start at k = 0: 0.95 (k=4) -> 0.80 (k=6) beats 0.90 (k=0) -> 0.85 (k=2)
    drop = intervention_curve_drop([0.90, 0.85, 0.95, 0.80, 1.0], [0, 2, 4, 6, 7])
    assert drop == CurveDrop(pytest.approx(0.15), 4, 6, 0.95, 0.80)
    assert intervention_curve_drop([0.5, 0.5, 0.7, 1.0], [0, 1, 2, 3]).drop == 0.0  # flat then rising
    # several orders: the mean curve (0.9, 0.8, 1.0) falls by 0.1
    assert intervention_curve_drop(torch.tensor([[0.9, 0.9, 1.0], [0.9, 0.7, 1.0]]), [0, 1, 2]).drop == \
        pytest.approx(0.1)
    with pytest.raises(ValueError, match="one value per step"):
        intervention_curve_drop([0.9, 1.0], [0, 1, 2])


def test_falling_curves_are_those_that_fall_by_more_than_the_tolerance():
    curves = {"random": torch.tensor([[0.964, 0.867, 0.903]]), "uncertainty": torch.tensor([[0.964, 0.96, 1.0]]),
              "mine": torch.tensor([[0.9, 0.95, 0.97]])}
    falling = falling_intervention_curves(curves, [0, 1, 2])
    assert list(falling) == ["random"] and falling["random"].to_k == 1  # 0.004 is within the default 0.01
    assert list(falling_intervention_curves(curves, [0, 1, 2], tolerance=0.0)) == ["random", "uncertainty"]
    assert falling_intervention_curves(curves, [0, 1, 2], tolerance=0.1) == {}
    with pytest.raises(ValueError, match="tolerance must be >= 0.0"):
        falling_intervention_curves(curves, [0, 1, 2], tolerance=-0.1)
