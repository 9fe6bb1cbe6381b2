"""Membership inference: AUC equals scikit-learn's (ties included), TPR at low FPR by hand, an overfit model leaks,
NaN/inf are excluded and counted, the model is left as it was."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score, roc_curve

from lightning_lens.attribution import Gradient
from lightning_lens.privacy import (
    DIRECTIONS,
    SCORES,
    membership_inference,
    membership_statistics,
    roc_auc,
    threshold_attack,
    tpr_at_fpr,
)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (80,), generator=gen).double() / 2  # few distinct values: many ties
    labels = torch.randint(0, 2, (80,), generator=gen)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    continuous = torch.randn(80, generator=gen, dtype=torch.float64)
    assert roc_auc(continuous, labels) == pytest.approx(roc_auc_score(labels.numpy(), continuous.numpy()), abs=1e-12)


def test_tpr_at_low_fpr_by_hand():
    # members (1) score 10, 9, 7, 4; non-members (0) score 8, 6, 5, 3, 2, 1 (higher = member)
    scores = torch.tensor([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    # FPR 0: thresholds 10 and 9 flag two of four members -> 0.5 at threshold 9
    assert tpr_at_fpr(scores, labels, 0.0) == (0.5, 9.0)
    # FPR <= 1/6: threshold 7 flags 10, 9, 8, 7 -> 3/4 members, 1/6 non-members
    assert tpr_at_fpr(scores, labels, 1 / 6) == (0.75, 7.0)
    assert tpr_at_fpr(scores, labels, 0.3) == (0.75, 7.0)  # 2/6 > 0.3
    # the same as the best point of sklearn's ROC curve within the FPR bound
    fpr, tpr, _ = roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    assert max(t for f, t in zip(fpr, tpr) if f <= 0.5) == tpr_at_fpr(scores, labels, 0.5)[0]


def test_tpr_with_ties_flags_the_whole_tied_group():
    scores = torch.tensor([3.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0])
    assert tpr_at_fpr(scores, labels, 0.0) == (0.0, math.inf)  # the tie at 3 costs a false positive
    assert tpr_at_fpr(scores, labels, 0.5) == (1.0, 2.0)


def test_threshold_attack_direction_threshold_and_exclusions():
    members = torch.tensor([0.1, 0.2, 0.3, float("nan"), float("inf")])
    others = torch.tensor([0.25, 0.4, 0.5, float("-inf")])
    attack = threshold_attack(members, others, "loss", "lower", fpr=0.0)
    labels = [1, 1, 1, 0, 0, 0]
    values = [0.1, 0.2, 0.3, 0.25, 0.4, 0.5]
    assert attack.auc == pytest.approx(roc_auc_score(labels, [-v for v in values]))
    assert (attack.excluded_members, attack.excluded_non_members) == (2, 1)
    assert (attack.n_members, attack.n_non_members) == (3, 3)
    assert attack.tpr_at_fpr == pytest.approx(2 / 3) and attack.threshold == pytest.approx(0.2)  # member if <= 0.2
    assert threshold_attack(torch.tensor([float("nan")]), others, "loss").auc != threshold_attack(
        torch.tensor([float("nan")]), others, "loss").auc  # NaN: nothing left to attack with


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


@pytest.fixture(scope="module")
def overfit(digits):
    x, y = digits
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(500):  # memorise 50 digits
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:50]), y[:50]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("score", SCORES)
def test_overfit_model_leaks_through_its_loss_and_auc_matches_sklearn(digits, overfit, score):
    x, y = digits
    members, non_members = (x[:50], y[:50]), (x[1000:1050], y[1000:1050])
    overfit.train()
    before = {k: v.clone() for k, v in overfit.state_dict().items()}
    result = membership_inference(overfit, members, non_members, batch_size=16, score=score)
    assert result.score == score
    assert overfit.training and all(p.grad is None for p in overfit.parameters())
    assert all(torch.equal(before[k], v) for k, v in overfit.state_dict().items())
    assert result.auc("loss") > 0.7
    for name, attack in result.attacks.items():
        assert attack.direction == DIRECTIONS[name] == "lower"
        values = torch.cat([result.member_statistics[name], result.non_member_statistics[name]])
        labels = torch.cat([torch.ones(50), torch.zeros(50)])
        assert attack.auc == pytest.approx(roc_auc_score(labels.numpy(), (-values).numpy()), abs=1e-12)
    columns, rows = result.table()
    assert columns[:3] == ["statistic", "direction", "auc"] and [r[0] for r in rows] == list(result.attacks)


def test_statistics_are_the_gradient_maps_norm_and_variance(digits, overfit):
    x, y = digits[0][:6], digits[1][:6]
    stats = membership_statistics(overfit, x, y, ["loss", "gradient_norm", "gradient_variance"], batch_size=4,
                                  score="logit")
    maps = Gradient(overfit).attribute(x, target=y).double()
    assert torch.allclose(stats["gradient_norm"], maps.norm(dim=1))
    assert torch.allclose(stats["gradient_variance"], maps.var(dim=1, correction=0))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(overfit(x).double(), y, reduction="none")
    assert torch.allclose(stats["loss"], loss)
    # any registered method stands in for the explanation
    ixg = membership_statistics(overfit, x, y, ["gradient_norm"], method="gradient_x_input",
                                score="logit")["gradient_norm"]
    assert torch.allclose(ixg, (maps * x.double()).norm(dim=1))


def test_nonfinite_statistics_are_excluded_and_counted():
    class Poisoned(torch.nn.Module):  # NaN logits for inputs whose first feature is negative
        def forward(self, x):
            out = torch.stack([x[:, 0], -x[:, 0]], 1)
            return torch.where(x[:, :1] < 0, torch.full_like(out, float("nan")), out)

    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    result = membership_inference(Poisoned(), (x[:2], torch.tensor([0, 0])), (x[2:], torch.tensor([0, 0])), ["loss"])
    attack = result.attacks["loss"]
    assert (attack.excluded_members, attack.excluded_non_members, attack.n_non_members) == (0, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"statistics": "loss"}, TypeError, "did you mean"),
        ({"statistics": ["entropy"]}, ValueError, "statistics"),
        ({"method": "no_such_method"}, ValueError, "unknown attribution method"),
        ({"fpr": 2.0}, ValueError, "fpr"),
        ({"score": "softmax"}, ValueError, "score must be one of"),
        ({"score": 1}, TypeError, "score"),
        ({"members": torch.zeros(2, 3)}, TypeError, "members"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    model = torch.nn.Linear(3, 2)
    args = {"members": (torch.zeros(2, 3), torch.tensor([0, 1])),
            "non_members": (torch.ones(2, 3), torch.tensor([0, 1]))}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        membership_inference(model, **args)


def _toy_linear():
    """logits (z0, z1) = (x0, -x1): at x = (ln 3, 0, 0) the softmax is (3/4, 1/4)."""
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    return model, torch.tensor([[math.log(3.0), 0.0, 0.0]] * 2), torch.tensor([0, 1])


def test_scores_by_hand_on_a_linear_softmax():
    # d p_c / dx = p_c (w_c - sum_j p_j w_j); here w_0 - w_1 = (1, 1, 0) and p = (3/4, 1/4):
    #   probability:     d p_0/dx = 3/4 * 1/4 * (1, 1, 0) = (3/16, 3/16, 0);  d p_1/dx = -(3/16, 3/16, 0)
    #   log_probability: d log p_0/dx = 1/4 (1, 1, 0);                          d log p_1/dx = -3/4 (1, 1, 0)
    #   logit:           w_0 = (1, 0, 0);                                      w_1 = (0, -1, 0)
    model, x, y = _toy_linear()
    maps = {
        "probability": torch.tensor([[3 / 16, 3 / 16, 0.0], [-3 / 16, -3 / 16, 0.0]]),
        "log_probability": torch.tensor([[1 / 4, 1 / 4, 0.0], [-3 / 4, -3 / 4, 0.0]]),
        "logit": torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    }
    assert SCORES[0] == "probability"  # the default, as Shokri et al. explain the output probability
    for score, expected in maps.items():
        stats = membership_statistics(model, x, y, ["gradient_norm", "gradient_variance"], score=score)
        expected = expected.double()
        assert torch.allclose(stats["gradient_norm"], expected.norm(dim=1), atol=1e-7), score
        assert torch.allclose(stats["gradient_variance"], expected.var(dim=1, correction=0), atol=1e-8), score
    # 3 sqrt(2) / 16 and the variance of (3/16, 3/16, 0): 1/128
    probability = membership_statistics(model, x, y, ["gradient_norm", "gradient_variance"])
    assert probability["gradient_norm"].tolist() == pytest.approx([3 * math.sqrt(2) / 16] * 2, abs=1e-7)
    assert probability["gradient_variance"].tolist() == pytest.approx([1 / 128] * 2, abs=1e-8)


def test_score_reaches_every_kind_of_method_spec_and_leaves_the_callers_object_alone():
    model, x, y = _toy_linear()
    expected = membership_statistics(model, x, y, ["gradient_norm"], score="log_probability")["gradient_norm"]
    method = Gradient(model)
    via_object = membership_statistics(model, x, y, ["gradient_norm"], method=method, score="log_probability")
    assert method.output_fn is None  # a copy got the output_fn
    via_class = membership_statistics(model, x, y, ["gradient_norm"], method=Gradient, score="log_probability")
    for got in (via_object, via_class):
        assert torch.allclose(got["gradient_norm"], expected)
    # a (name, kwargs) pair's own output_fn runs first: halving the logits changes p to softmax(z / 2)
    halved = membership_statistics(model, x, y, ["gradient_norm"], method=("gradient", {"output_fn": lambda o: o / 2}),
                                   score="probability")["gradient_norm"]
    p0 = 3 ** 0.5 / (3 ** 0.5 + 1)  # softmax((ln 3 / 2, 0))
    assert halved.tolist() == pytest.approx([p0 * (1 - p0) / 2 * math.sqrt(2)] * 2, abs=1e-7)

    def explain(model, inputs, target):
        return inputs

    with pytest.raises(ValueError, match="score='logit'"):
        membership_statistics(model, x, y, ["gradient_norm"], method=explain, score="probability")
    assert membership_statistics(model, x, y, ["gradient_norm"], method=explain, score="logit")["gradient_norm"][0] \
        == pytest.approx(math.log(3.0))
    one_output = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="two or more classes"):
        membership_statistics(one_output, x, torch.tensor([0, 0]), ["gradient_norm"])
