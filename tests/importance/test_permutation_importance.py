"""Permutation importance: planted features first, scikit-learn agreement, exact values for known permutations,
feature groups, batching, and non-perturbation of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from lightning_lens.importance import permutation_importance
from lightning_lens.importance.permutation import accuracy, neg_log_loss

PLANTED = (1, 4)  # the only features the label depends on


def planted_data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (2.0 * x[:, 1] - 1.5 * x[:, 4] + 0.1 * torch.randn(n, generator=gen) > 0).long()
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP fitted for a second on data where only features 1 and 4 matter."""
    x, y = planted_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x_val, y_val = planted_data(300, seed=1)
    return model, x_val, y_val


class TorchEstimator(ClassifierMixin, BaseEstimator):
    """The torch model as a fitted scikit-learn classifier (fit is a no-op)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classes_ = np.array([0, 1])

    def fit(self, X, y):
        return self

    def _logits(self, X):
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(X), dtype=torch.float32))

    def predict(self, X):
        return self._logits(X).argmax(1).numpy()

    def predict_proba(self, X):
        return self._logits(X).softmax(1).double().numpy()

    def score(self, X, y):
        return float((self.predict(X) == np.asarray(y)).mean())


def test_planted_features_rank_first(trained):
    model, x, y = trained
    result = permutation_importance(model, x, y, n_repeats=5, feature_names=[f"f{i}" for i in range(6)])
    assert result.baseline_score > 0.9 and result.metric == "accuracy"
    top = {name for name, _ in result.ranking()[:2]}
    assert top == {"f1", "f4"}
    others = [i for i in range(6) if i not in PLANTED]
    assert result.importances_mean[list(PLANTED)].min() > 0.15
    assert np.abs(result.importances_mean[others]).max() < 0.03
    assert result.importances.shape == (6, 5)
    np.testing.assert_allclose(result.importances_mean, result.importances.mean(1))
    np.testing.assert_allclose(result.importances_std, result.importances.std(1))
    assert result["importances_mean"] is result.importances_mean  # Bunch-style access, as scikit-learn's


@pytest.mark.parametrize("metric, scoring", [("accuracy", None), ("neg_log_loss", "neg_log_loss")])
def test_agrees_with_scikit_learn_on_the_same_model_wrapped_as_an_estimator(trained, metric, scoring):
    inspection = pytest.importorskip("sklearn.inspection")
    model, x, y = trained
    ours = permutation_importance(model, x, y, metric=metric, n_repeats=30, seed=0)
    theirs = inspection.permutation_importance(TorchEstimator(model), x.numpy(), y.numpy(), scoring=scoring,
                                               n_repeats=30, random_state=0)
    # the same statistic with different random permutations: means agree within the Monte-Carlo error
    assert ours.baseline_score == pytest.approx(
        accuracy(model(x), y) if metric == "accuracy" else neg_log_loss(model(x), y), abs=1e-6)
    scale = max(np.abs(theirs.importances_mean).max(), 1e-3)
    np.testing.assert_allclose(ours.importances_mean, theirs.importances_mean, atol=0.1 * scale)
    assert list(np.argsort(-ours.importances_mean)[:2]) == list(np.argsort(-theirs.importances_mean)[:2])
    # the spread of the repeats is of the same size
    np.testing.assert_allclose(ours.importances_std[list(PLANTED)], theirs.importances_std[list(PLANTED)], rtol=0.6)


def test_regression_with_neg_mse_agrees_with_scikit_learn():
    inspection = pytest.importorskip("sklearn.inspection")
    linear_model = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 4, generator=gen)
    y = 3 * x[:, 0] - x[:, 2] + 0.1 * torch.randn(500, generator=gen)
    sk = linear_model.LinearRegression().fit(x.numpy(), y.numpy())
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(sk.coef_, dtype=torch.float32)[None])
        model.bias.fill_(float(sk.intercept_))
    ours = permutation_importance(model, x, y, n_repeats=20)
    assert ours.metric == "neg_mse"
    theirs = inspection.permutation_importance(sk, x.numpy(), y.numpy(), scoring="neg_mean_squared_error",
                                               n_repeats=20, random_state=0)
    # analytically the drop is 2 w_j^2 var(x_j): 18 and 2
    np.testing.assert_allclose(ours.importances_mean, theirs.importances_mean, rtol=0.15, atol=0.01)
    assert list(np.argsort(-ours.importances_mean)[:2]) == [0, 2]


def test_exact_values_for_the_documented_permutations():
    # repeat r of group g uses the (g * n_repeats + r)-th randperm of a generator seeded with `seed`
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen)
    y = torch.randn(12, generator=gen)
    model = nn.Linear(3, 1)
    mask = torch.tensor([0, 1, 0])  # columns 0 and 2 form one group, shuffled together
    result = permutation_importance(model, x, y, n_repeats=2, feature_mask=mask, seed=7, metric="neg_mse")
    draws = torch.Generator().manual_seed(7)
    with torch.no_grad():
        base = -float((model(x).squeeze(1) - y).square().mean())
        expected = np.zeros((2, 2))
        for g, columns in enumerate([[0, 2], [1]]):
            for r in range(2):
                perm = torch.randperm(12, generator=draws)
                shuffled = x.clone()
                shuffled[:, columns] = x[perm][:, columns]
                expected[g, r] = base + float((model(shuffled).squeeze(1) - y).square().mean())
    np.testing.assert_allclose(result.importances, expected, rtol=1e-6, atol=1e-7)
    assert result.baseline_score == pytest.approx(base, rel=1e-6) and result.feature_names == ("x0", "x1")


def test_a_callable_metric_and_batch_size_give_the_same_result(trained):
    model, x, y = trained

    def balanced_accuracy(outputs, targets):
        predicted = outputs.argmax(1)
        return float(sum((predicted[targets == c] == c).float().mean() for c in (0, 1)) / 2)

    a = permutation_importance(model, x, y, metric=balanced_accuracy, n_repeats=3)
    b = permutation_importance(model, x, y, metric=balanced_accuracy, n_repeats=3, batch_size=7)
    np.testing.assert_allclose(a.importances, b.importances)
    assert a.metric == "balanced_accuracy"
    assert not np.array_equal(a.importances, permutation_importance(model, x, y, n_repeats=3, seed=1).importances)


def test_image_patches_are_the_default_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[:, [0, 1, 8, 9]] = torch.randn(3, 4)  # only the top-left 2x2 patch of the 4x4 grid matters
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1).detach()
    result = permutation_importance(model, x, y, n_repeats=2)
    assert result.importances.shape == (16, 2)
    assert result.importances_mean[0] > 0.2 and np.abs(result.importances_mean[1:]).max() == 0


def test_the_model_and_global_rng_are_untouched(trained):
    model, x, y = trained
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # left over from the fit
    saw_eval = []
    handle = model.register_forward_pre_hook(lambda m, a: saw_eval.append(not m.training))
    rng = torch.get_rng_state()
    try:
        with torch.inference_mode():
            result = permutation_importance(model, x, y, n_repeats=2, seed=None)
        after = [m.training for m in model.modules()]
    finally:
        handle.remove()
        model.eval()
    assert saw_eval and all(saw_eval)
    assert after == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng) and np.isfinite(result.importances).all()


def test_modes_are_restored():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()
    permutation_importance(model, torch.randn(10, 3), torch.randint(0, 2, (10,)), n_repeats=1)
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_errors_name_the_argument():
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="targets must hold one entry per example"):
        permutation_importance(model, x, y[:5])
    with pytest.raises(ValueError, match="metric must be one of"):
        permutation_importance(model, x, y, metric="f1")
    with pytest.raises(ValueError, match="feature_names holds 2 names for 3 features"):
        permutation_importance(model, x, y, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="n_repeats must be >= 1"):
        permutation_importance(model, x, y, n_repeats=0)
    with pytest.raises(TypeError, match="feature_mask must be an integer tensor"):
        permutation_importance(model, x, y, feature_mask=torch.zeros(3))
    with pytest.raises(ValueError, match="per-example masks"):
        permutation_importance(model, x, y, feature_mask=torch.zeros(10, 3, dtype=torch.long))


def test_model_outputs_tuple_mapping_and_output_fn_give_the_same_result(trained):
    model, x, y = trained

    class AsTuple(nn.Module):
        def forward(self, inputs):
            return model(inputs), inputs

    class AsDict(nn.Module):
        def forward(self, inputs):
            return {"scores": model(inputs)}

    plain = permutation_importance(model, x, y, n_repeats=2)
    np.testing.assert_allclose(permutation_importance(AsTuple(), x, y, n_repeats=2).importances, plain.importances)
    via_fn = permutation_importance(AsDict(), x, y, n_repeats=2, output_fn=lambda out: out["scores"])
    np.testing.assert_allclose(via_fn.importances, plain.importances)
    with pytest.raises(TypeError, match="output_fn"):
        permutation_importance(AsDict(), x, y)


# ------------------------------------------------------------------------------------ structured inputs (issue 12)
class TwoInputs(nn.Module):
    """``w . a + v . b`` on two float inputs, with an optional per-example ``scale`` keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.b = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
            self.b.weight.copy_(torch.tensor([[3.0, 0.0]]))

    def forward(self, a, b, scale=None):
        out = self.a(a) + self.b(b)
        return {"logits": out if scale is None else out * scale[:, None]}


def _two_input_data(n: int = 10):
    gen = torch.Generator().manual_seed(4)
    return torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen), torch.randn(n, generator=gen)


@pytest.mark.parametrize("wrap", ["tuple", "dict"])
def test_one_tensor_in_a_structure_gives_the_single_tensor_result(trained, wrap):
    model, x, y = trained
    plain = permutation_importance(model, x, y, n_repeats=3, seed=2)
    structured = permutation_importance(model, (x,) if wrap == "tuple" else {"input": x}, y, n_repeats=3, seed=2)
    np.testing.assert_array_equal(structured.importances, plain.importances)
    assert structured.baseline_score == plain.baseline_score
    assert structured.feature_names == tuple(f"{0 if wrap == 'tuple' else 'input'}/{j}" for j in range(6))
    assert plain.feature_names == tuple(f"x{j}" for j in range(6))


def _expected_by_hand(model, a, b, y, seed, n_repeats, features, scale=None):
    """The documented draws: the f-th feature's r-th repeat uses the (f * n_repeats + r)-th randperm."""
    draws = torch.Generator().manual_seed(seed)

    def score(a_, b_):
        return -float((model(a_, b_, scale)["logits"].squeeze(1).double() - y.double()).square().mean())

    with torch.no_grad():
        base = score(a, b)
        expected = np.zeros((len(features), n_repeats))
        for f, (which, column) in enumerate(features):
            for r in range(n_repeats):
                perm = torch.randperm(a.shape[0], generator=draws)
                a_, b_ = a.clone(), b.clone()
                target = a_ if which == "a" else b_
                source = a if which == "a" else b
                target[:, column] = source[perm, column]
                expected[f, r] = base - score(a_, b_)
    return base, expected


def test_two_inputs_exact_values_for_the_documented_permutations():
    model = TwoInputs()
    a, b, y = _two_input_data()
    features = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    base, expected = _expected_by_hand(model, a, b, y, seed=3, n_repeats=2, features=features)
    as_dict = permutation_importance(model, {"a": a, "b": b}, y, n_repeats=2, seed=3, metric="neg_mse")
    np.testing.assert_allclose(as_dict.importances, expected, rtol=1e-6, atol=1e-7)
    assert as_dict.baseline_score == pytest.approx(base, rel=1e-6)
    assert as_dict.feature_names == ("a/0", "a/1", "a/2", "b/0", "b/1")
    assert np.all(as_dict.importances[4] == 0)  # b's second column has weight 0
    as_tuple = permutation_importance(model, (a, b), y, n_repeats=2, seed=3, metric="neg_mse", batch_size=3)
    np.testing.assert_allclose(as_tuple.importances, expected, rtol=1e-6, atol=1e-7)
    assert as_tuple.feature_names == ("0/0", "0/1", "0/2", "1/0", "1/1")
    # a selection: the draws follow the selected features' order
    _, chosen = _expected_by_hand(model, a, b, y, seed=3, n_repeats=2, features=[("a", 1), ("b", 0), ("b", 1)])
    some = permutation_importance(model, {"a": a, "b": b}, y, n_repeats=2, seed=3, metric="neg_mse",
                                  features=[("a", 1), "b"], feature_names=["a1", "b0", "b1"])
    np.testing.assert_allclose(some.importances, chosen, rtol=1e-6, atol=1e-7)
    assert some.feature_names == ("a1", "b0", "b1")


def test_per_example_forward_kwargs_follow_their_rows_and_are_never_permuted():
    model = TwoInputs()
    a, b, y = _two_input_data()
    scale = torch.linspace(0.5, 2.0, a.shape[0])
    features = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    _, expected = _expected_by_hand(model, a, b, y, seed=1, n_repeats=2, features=features, scale=scale)
    for rows in (None, 4):
        result = permutation_importance(model, {"a": a, "b": b}, y, n_repeats=2, seed=1, metric="neg_mse",
                                        forward_kwargs={"scale": scale}, batch_size=rows)
        np.testing.assert_allclose(result.importances, expected, rtol=1e-6, atol=1e-7)


def test_token_ids_are_permuted_per_position_only_when_asked():
    class BagOfTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(5, 2)

        def forward(self, input_ids, attention_mask):
            return self.embedding(input_ids).mul(attention_mask[..., None]).sum(1)

    model = BagOfTokens()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (16, 3), generator=gen)
    mask = torch.ones(16, 3, dtype=torch.long)
    mask[:, 2] = 0  # the last position is padding: permuting it changes nothing
    y = model(ids, mask).argmax(1).detach()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(TypeError, match=r"no floating-point tensor.*features=\['input_ids'\]"):
        permutation_importance(model, inputs, y)
    result = permutation_importance(model, inputs, y, n_repeats=2, seed=5, features=["input_ids"])
    assert result.feature_names == ("input_ids/0", "input_ids/1", "input_ids/2")
    draws = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for position in range(3):
            for r in range(2):
                shuffled = ids.clone()
                shuffled[:, position] = ids[torch.randperm(16, generator=draws), position]
                drop = 1.0 - float((model(shuffled, mask).argmax(1) == y).double().mean())
                assert result.importances[position, r] == pytest.approx(drop, abs=1e-12)
    assert np.all(result.importances[2] == 0) and result.importances[:2].max() > 0
    # the whole sequence as one feature: a feature_mask for that input
    whole = permutation_importance(model, inputs, y, n_repeats=2, seed=5, features=["input_ids"],
                                   feature_mask={"input_ids": torch.zeros(3, dtype=torch.long)})
    assert whole.feature_names == ("input_ids/0",) and whole.importances_mean[0] > 0


def test_structured_errors_name_the_argument():
    model = TwoInputs()
    a, b, y = _two_input_data()
    inputs = {"a": a, "b": b}
    with pytest.raises(ValueError, match="features names 'c', but the inputs are \\['a', 'b'\\]"):
        permutation_importance(model, inputs, y, features=["c"])
    with pytest.raises(ValueError, match="input 'b' has 2 features"):
        permutation_importance(model, inputs, y, features=[("b", 2)])
    with pytest.raises(ValueError, match="selects 'a' twice"):
        permutation_importance(model, inputs, y, features=[("a", 0), "a"])
    with pytest.raises(TypeError, match="features must be a list"):
        permutation_importance(model, inputs, y, features="a")
    with pytest.raises(ValueError, match="feature_names holds 2 names for 5 features"):
        permutation_importance(model, inputs, y, feature_names=["x", "y"])
    with pytest.raises(TypeError, match=r"feature_mask\['a'\] must be an integer tensor"):
        permutation_importance(model, inputs, y, feature_mask={"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="targets must hold one entry per example"):
        permutation_importance(model, inputs, y[:4])


def test_a_model_output_mapping_through_output_fn_with_structured_inputs():
    model = TwoInputs()
    a, b, y = _two_input_data()

    class Wrapped(nn.Module):
        def forward(self, a, b):
            return {"scores": model(a, b)["logits"]}

    plain = permutation_importance(model, (a, b), y, n_repeats=2, metric="neg_mse")
    via_fn = permutation_importance(Wrapped(), (a, b), y, n_repeats=2, metric="neg_mse",
                                    output_fn=lambda out: out["scores"])
    np.testing.assert_array_equal(via_fn.importances, plain.importances)
