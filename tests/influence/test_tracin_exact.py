"""TracInCP / TracInCPFast against closed forms, and the properties of the streamed computation (no Captum needed).

For logits ``z = W x + b`` and the squared loss ``L = |z - t|^2 / 2`` the residual is ``r = z - t``, the gradients
are ``dL/dW = r x^T`` and ``dL/db = r``, so ``grad L . grad L' = (r . r') (x . x' + 1)`` (weight only:
``(r . r') (x . x')``, the fast path's factorisation).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens.influence import TracInCP, TracInCPFast

LRS = [0.5, 0.25, 0.125]


def squared(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - t) ** 2).sum(1)


@pytest.fixture
def linear_setup():
    gen = torch.Generator().manual_seed(0)
    checkpoints = [
        {"weight": torch.randn(2, 3, generator=gen), "bias": torch.randn(2, generator=gen)} for _ in LRS
    ]
    x_train, t_train = torch.randn(7, 3, generator=gen), torch.randn(7, 2, generator=gen)
    x_test, t_test = torch.randn(3, 3, generator=gen), torch.randn(3, 2, generator=gen)
    return checkpoints, x_train, t_train, x_test, t_test


def closed_form(checkpoints, x_test, t_test, x_train, t_train, bias=True):
    total = torch.zeros(x_test.shape[0], x_train.shape[0], dtype=torch.float64)
    for ckpt, lr in zip(checkpoints, LRS):
        w, b = ckpt["weight"].double(), ckpt["bias"].double()
        r_test = x_test.double() @ w.T + b - t_test.double()
        r_train = x_train.double() @ w.T + b - t_train.double()
        total += lr * (r_test @ r_train.T) * (x_test.double() @ x_train.double().T + (1.0 if bias else 0.0))
    return total


def test_influence_and_self_influence_equal_the_closed_form(linear_setup):
    checkpoints, x_train, t_train, x_test, t_test = linear_setup
    tracin = TracInCP(nn.Linear(3, 2), checkpoints, LRS, loss_fn=squared)
    expected = closed_form(checkpoints, x_test, t_test, x_train, t_train)
    assert torch.allclose(tracin.influence(x_test, t_test, x_train, t_train).double(), expected, rtol=1e-5, atol=1e-5)
    expected_self = closed_form(checkpoints, x_train, t_train, x_train, t_train).diagonal()
    assert torch.allclose(tracin.self_influence(x_train, t_train).double(), expected_self, rtol=1e-5, atol=1e-5)


def test_fast_path_equals_the_weight_only_closed_form(linear_setup):
    checkpoints, x_train, t_train, x_test, t_test = linear_setup
    fast = TracInCPFast(nn.Linear(3, 2), "", checkpoints, LRS, loss_fn=squared)
    expected = closed_form(checkpoints, x_test, t_test, x_train, t_train, bias=False)
    assert torch.allclose(fast.influence(x_test, t_test, x_train, t_train).double(), expected, rtol=1e-5, atol=1e-5)
    # and the exact path restricted to the weight gives the same numbers
    exact = TracInCP(nn.Linear(3, 2, bias=False), [{"weight": c["weight"]} for c in checkpoints], LRS, loss_fn=squared)
    no_bias = [{"weight": c["weight"], "bias": torch.zeros(2)} for c in checkpoints]
    assert torch.allclose(
        exact.influence(x_test, t_test, x_train, t_train).double(),
        closed_form(no_bias, x_test, t_test, x_train, t_train, bias=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_layers_restrict_the_gradients_to_the_named_modules():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ckpt = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    x, t = torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)
    h = x @ ckpt["0.weight"].T + ckpt["0.bias"]  # the last layer's input
    r = h @ ckpt["1.weight"].T + ckpt["1.bias"] - t
    last = TracInCP(model, [ckpt], 1.0, layers=["1"], loss_fn=squared)
    assert torch.allclose(last.influence(x, t, x, t), (r @ r.T) * (h @ h.T + 1), rtol=1e-5, atol=1e-5)
    # the first layer's gradients: dL/dW0 = (W1^T r) x^T, dL/db0 = W1^T r
    back = r @ ckpt["1.weight"]
    first = TracInCP(model, [ckpt], 1.0, layers=["0"], loss_fn=squared)
    assert torch.allclose(first.influence(x, t, x, t), (back @ back.T) * (x @ x.T + 1), rtol=1e-5, atol=1e-5)
    both = TracInCP(model, [ckpt], 1.0, loss_fn=squared).influence(x, t, x, t)
    assert torch.allclose(both, last.influence(x, t, x, t) + first.influence(x, t, x, t), rtol=1e-5, atol=1e-5)


def test_proponents_and_opponents_are_the_extremes_of_the_influence_matrix(linear_setup):
    checkpoints, x_train, t_train, x_test, t_test = linear_setup
    tracin = TracInCP(nn.Linear(3, 2), checkpoints, LRS, loss_fn=squared, batch_size=2)  # streamed in 4 batches
    full = tracin.influence(x_test, t_test, x_train, t_train)
    top = tracin.proponents(x_test, t_test, x_train, t_train, k=3)
    bottom = tracin.opponents(x_test, t_test, x_train, t_train, k=3)
    assert torch.equal(top.indices, full.topk(3, dim=1).indices)
    assert torch.allclose(top.scores, full.topk(3, dim=1).values)
    assert torch.equal(bottom.indices, full.topk(3, dim=1, largest=False).indices)
    assert torch.allclose(bottom.scores, full.gather(1, bottom.indices))


@pytest.fixture
def mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(2)
    checkpoints = [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
                   for _ in LRS]
    x, y = torch.randn(21, 6, generator=gen), torch.randint(0, 4, (21,), generator=gen)
    return model, checkpoints, x, y


def test_batching_chunking_and_the_per_example_loop_give_the_same_scores(mlp_setup):
    model, checkpoints, x, y = mlp_setup
    reference = TracInCP(model, checkpoints, LRS, batch_size=64).influence(x[:4], y[:4], x, y)
    # one example per call, one checkpoint per call, small batches, a DataLoader of dict batches
    tiny = TracInCP(model, checkpoints, LRS, batch_size=5, max_gradient_elements=1)
    assert torch.allclose(tiny.influence(x[:4], y[:4], x, y), reference, rtol=1e-5, atol=1e-6)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    assert torch.allclose(TracInCP(model, checkpoints, LRS).influence(x[:4], y[:4], loader), reference, atol=1e-6)
    dataset = TensorDataset(x, y)
    assert torch.allclose(TracInCP(model, checkpoints, LRS, batch_size=4).influence(x[:4], y[:4], dataset),
                          reference, atol=1e-6)
    looped = TracInCP(model, checkpoints, LRS)
    looped._vmap_failed = True  # the fallback: one example at a time
    assert torch.allclose(looped.influence(x[:4], y[:4], x, y), reference, rtol=1e-5, atol=1e-6)
    # self-influence is the diagonal of the influence of the set on itself
    square = TracInCP(model, checkpoints, LRS).influence(x, y, x, y)
    assert torch.allclose(TracInCP(model, checkpoints, LRS).self_influence(x, y), square.diagonal(), rtol=1e-5)


def test_fast_path_equals_the_exact_path_on_the_final_weight(mlp_setup):
    _, checkpoints, x, y = mlp_setup
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False))  # layer "2" is its weight only
    no_bias = [{k: v for k, v in c.items() if k != "2.bias"} for c in checkpoints]
    fast = TracInCPFast(model, "2", no_bias, LRS, batch_size=8)
    exact = TracInCP(model, no_bias, LRS, layers=["2"])
    assert torch.allclose(fast.influence(x[:5], y[:5], x, y), exact.influence(x[:5], y[:5], x, y), rtol=1e-4,
                          atol=1e-6)
    assert torch.allclose(fast.self_influence(x, y), exact.self_influence(x, y), rtol=1e-4)


def test_the_model_is_left_as_it_was(mlp_setup):
    model, checkpoints, x, y = mlp_setup
    model[1].train()
    model[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)  # its iterator draws from the global RNG
    rng = torch.get_rng_state()
    for engine in (TracInCP(model, checkpoints, LRS), TracInCPFast(model, "2", checkpoints, LRS)):
        engine.self_influence(loader)
        engine.proponents(x[:2], y[:2], x, y, k=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model] == [False, True, True]
    assert all(not m._forward_hooks for m in model.modules())


def test_inputs_from_inference_mode_and_no_grad_callers_work(mlp_setup):
    model, checkpoints, x, y = mlp_setup
    reference = TracInCP(model, checkpoints, LRS).self_influence(x, y)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
        inside = TracInCP(model, checkpoints, LRS).self_influence(x_inf, y_inf)
    with torch.no_grad():
        fast = TracInCPFast(model, "2", checkpoints, LRS).self_influence(x, y)
    assert torch.allclose(inside, reference)
    assert torch.isfinite(fast).all() and (fast > 0).all()


def test_the_projection_is_skipped_when_it_cannot_compress(mlp_setup):
    model, checkpoints, x, y = mlp_setup
    with pytest.warns(UserWarning, match="not smaller than the 92 gradient coordinates"):
        projected = TracInCP(model, checkpoints, LRS, projection_dim=500)
    assert projected.projection_dim is None
    assert torch.allclose(projected.self_influence(x, y), TracInCP(model, checkpoints, LRS).self_influence(x, y))
