"""MixtureOfExperts: shapes, arguments, sorted == dense, capacity, aux losses, routing records, masking, copies."""

import copy
import math
import pickle

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from lightning_lens.interpretable_models import MixtureOfExperts, moe_aux_loss
from lightning_lens.interpretable_models.moe import (
    ROW_CALL,
    ROW_ID,
    ROW_LABEL,
    ROW_POSITION,
    ablation_accuracy,
    ablation_predictions,
    normalized_mutual_info,
    pack_ablation_rows,
    router_rows,
    routing_losses,
    routing_row_keys,
    routing_rows,
    routing_scalars,
    routing_statistics,
    routing_statistics_from_rows,
    routing_summary,
    token_labels,
    unpack_ablation_rows,
)


def _fixed_router_layer(num_experts: int, k: int, **kwargs) -> MixtureOfExperts:
    """in_features == num_experts and an identity router: each input row *is* its router logits.

    Expert e is ``x -> (e + 1) * sum(x)`` so every output says which experts contributed with which gates.
    """
    layer = MixtureOfExperts(num_experts, 1, num_experts, k=k, expert=lambda: nn.Linear(num_experts, 1, bias=False),
                             noisy_gating=False, **kwargs)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts))
        for e, expert in enumerate(layer.experts):
            expert.weight.fill_(e + 1.0)
    return layer


def _grads(layer: nn.Module, x: torch.Tensor, dense: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = layer(x, dense=dense)
    loss = out.sin().sum() + layer.aux_loss
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip([x, *params], grads)]


@pytest.mark.parametrize("capacity_factor,drop_policy", [(None, "order"), (0.7, "order"), (0.7, "gate")])
@pytest.mark.parametrize("shape", [(13, 6), (3, 5, 6)])
def test_sorted_dispatch_equals_dense_outputs_and_gradients(capacity_factor, drop_policy, shape):
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 4, num_experts=5, k=2, capacity_factor=capacity_factor, drop_policy=drop_policy,
                             noise_seed=3).train()
    x = torch.randn(*shape, requires_grad=True)
    layer.noise_generator.manual_seed(11)  # the same gating noise for both paths
    out_sorted, g_sorted = _grads(layer, x, dense=False)
    drops = (layer.dropped_assignments, layer.dropped_tokens)
    layer.noise_generator.manual_seed(11)
    out_dense, g_dense = _grads(layer, x, dense=True)
    assert out_sorted.shape == (*shape[:-1], 4)
    assert torch.allclose(out_sorted, out_dense, atol=1e-6)
    for a, b in zip(g_sorted, g_dense):
        assert torch.allclose(a, b, atol=1e-6)
    assert drops == (layer.dropped_assignments, layer.dropped_tokens)
    if capacity_factor is not None:
        assert layer.dropped_assignments > 0  # the capacity case really drops something
    assert g_sorted[0].abs().sum() > 0 and layer.router.weight.grad is None


def test_dispatch_argument_selects_dense_path():
    torch.manual_seed(0)
    sorted_layer = MixtureOfExperts(4, 3, 4, k=2, noisy_gating=False)
    dense_layer = copy.deepcopy(sorted_layer)
    dense_layer.dispatch = "dense"
    x = torch.randn(9, 4)
    assert torch.allclose(sorted_layer(x), dense_layer(x), atol=1e-6)


def _silu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 7, bias=False), nn.SiLU(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 4))


@pytest.mark.parametrize("capacity_factor,drop_policy", [(None, "order"), (0.7, "order"), (0.7, "gate")])
@pytest.mark.parametrize("shape", [(13, 6), (3, 5, 6)])
@pytest.mark.parametrize("k,expert", [(2, None), (1, None), (2, lambda: nn.Linear(6, 4)), (2, _silu_mlp)])
def test_grouped_dispatch_equals_dense_outputs_and_gradients(capacity_factor, drop_policy, shape, k, expert):
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 4, num_experts=5, k=k, expert=expert, capacity_factor=capacity_factor,
                             drop_policy=drop_policy, noise_seed=3, dispatch="grouped").train()
    x = torch.randn(*shape, requires_grad=True)
    layer.noise_generator.manual_seed(11)
    out_grouped, g_grouped = _grads(layer, x, dense=None)  # the layer's own dispatch: grouped
    drops = (layer.dropped_assignments, layer.dropped_tokens)
    layer.noise_generator.manual_seed(11)
    out_dense, g_dense = _grads(layer, x, dense=True)
    assert out_grouped.shape == (*shape[:-1], 4)
    assert (out_grouped - out_dense).abs().max() < 1e-6
    for a, b in zip(g_grouped, g_dense):
        assert (a - b).abs().max() < 1e-6
    assert drops == (layer.dropped_assignments, layer.dropped_tokens)
    assert all(g.abs().sum() > 0 for g in g_grouped[:2])  # the input and the router get gradients


def test_grouped_dispatch_equals_dense_with_masked_and_unused_experts():
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 4, num_experts=6, k=2, noisy_gating=False)
    x = torch.randn(10, 6)
    with torch.no_grad(), layer.masking([1, 4]):  # experts 1 and 4 get no tokens: groups of size 0
        grouped = layer(x, dispatch="grouped")
        assert layer.tokens_per_expert[[1, 4]].tolist() == [0, 0]
        assert (grouped - layer(x, dispatch="dense")).abs().max() < 1e-6
    one = torch.randn(1, 6)  # one token: every group has width 1 or 0
    assert (layer(one, dispatch="grouped") - layer(one, dispatch="dense")).abs().max() < 1e-6


def test_grouped_dispatch_runs_hooked_experts_one_by_one():
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 4, num_experts=3, k=2, noisy_gating=False, dispatch="grouped")
    seen = []
    handle = layer.experts[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    x = torch.randn(12, 6)
    out = layer(x)
    assert seen == [int(layer.tokens_per_expert[0])]  # the hook saw expert 0's own tokens (sorted dispatch ran)
    handle.remove()
    assert torch.allclose(out, layer(x), atol=1e-6) and len(seen) == 1  # without hooks: stacked, same outputs


def test_grouped_dispatch_rejects_experts_it_cannot_stack():
    with pytest.raises(ValueError, match="dispatch='grouped' stacks the experts' weights: every expert must be an "
                                         "nn.Linear or an nn.Sequential.*use dispatch='sorted'"):
        MixtureOfExperts(4, 2, 3, expert=lambda: nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)), dispatch="grouped")
    sizes = iter([3, 5, 3])
    with pytest.raises(ValueError, match="the same layer shapes"):
        MixtureOfExperts(4, 2, 3, expert=lambda: nn.Sequential(nn.Linear(4, (h := next(sizes))), nn.ReLU(),
                                                               nn.Linear(h, 2)), dispatch="grouped")
    with pytest.raises(ValueError, match="the same layer shapes"):
        MixtureOfExperts(2, 2, 2, expert=iter([nn.ReLU(), nn.GELU()]).__next__, dispatch="grouped")
    layer = MixtureOfExperts(4, 2, 3, expert=lambda: nn.Linear(4, 3))  # sorted: shapes checked when it runs
    with pytest.raises(ValueError, match="out_features=2"):
        layer(torch.randn(5, 4), dispatch="grouped")
    with pytest.raises(ValueError, match="either dense= or dispatch="):
        layer(torch.randn(5, 4), dense=True, dispatch="grouped")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        layer(torch.randn(5, 4), dispatch="bmm")


def test_sequence_inputs_equal_flattened_tokens():
    torch.manual_seed(1)
    layer = MixtureOfExperts(8, 3, 4, k=2).eval()
    x = torch.randn(2, 7, 8)
    with layer.recording():
        out = layer(x)
        record = layer.last_routing
    assert out.shape == (2, 7, 3)
    assert record.experts.shape == (2, 7, 2) and record.probs.shape == (2, 7, 4) and record.kept.all()
    assert torch.allclose(out.reshape(14, 3), layer(x.reshape(14, 8)), atol=1e-6)
    assert torch.allclose(record.probs.sum(-1), torch.ones(2, 7))
    assert torch.allclose(record.gates.sum(-1), torch.ones(2, 7))  # renormalized over the top-k


def _expected(x: torch.Tensor, experts: list, kept: list) -> torch.Tensor:
    """Outputs of ``_fixed_router_layer``: sum over kept (expert, gate) of gate * (expert + 1) * sum(x)."""
    top = torch.stack([x[t, experts[t]] for t in range(len(experts))])
    gates = torch.softmax(top, dim=1)
    out = [sum(gates[t, j] * (experts[t][j] + 1) * x[t].sum() for j in range(2) if kept[t][j]) for t in range(len(x))]
    return torch.stack(out).unsqueeze(1)


def test_capacity_drops_are_counted_exactly_and_follow_the_policy():
    # router logits per token; top-2 experts: [1, 0], [0, 1], [0, 2], [0, 1], [0, 2]
    x = torch.tensor([[2.0, 3.0, 0.0], [3.0, 1.0, 0.0], [5.0, 0.0, 1.0], [4.0, 1.0, 0.0], [6.0, 0.0, 1.0]])
    experts = [[1, 0], [0, 1], [0, 2], [0, 1], [0, 2]]
    layer = _fixed_router_layer(3, k=2, capacity_factor=0.9)  # capacity = ceil(0.9 * 5 * 2 / 3) = 3
    with layer.recording():
        out = layer(x)
    assert layer.last_routing.experts.tolist() == experts
    assert layer.tokens_per_expert.tolist() == [5, 3, 2]
    # expert 0 has 4 first choices (tokens 1-4) and token 0's second choice; first choices win, in token order:
    # token 4's first choice and token 0's second choice are dropped (plain token order would have kept token 0)
    order_kept = [[True, False], [True, True], [True, True], [True, True], [False, True]]
    assert layer.last_routing.kept.tolist() == order_kept
    assert (layer.dropped_assignments, layer.dropped_tokens, layer.drop_rate) == (2, 2, 0.2)
    assert torch.allclose(out, _expected(x, experts, order_kept), atol=1e-5)  # gates are not renormalized
    assert torch.allclose(layer(x, dense=True), _expected(x, experts, order_kept), atol=1e-5)

    by_gate = _fixed_router_layer(3, k=2, capacity_factor=0.9, drop_policy="gate")
    with by_gate.recording():
        out = by_gate(x)
    # expert 0's gates: token 0 0.27 (second choice), tokens 1-4 0.88, 0.98, 0.95, 0.99: the lowest two are dropped
    gate_kept = [[True, False], [False, True], [True, True], [True, True], [True, True]]
    assert by_gate.last_routing.kept.tolist() == gate_kept
    assert (by_gate.dropped_assignments, by_gate.dropped_tokens) == (2, 2)
    assert torch.allclose(out, _expected(x, experts, gate_kept), atol=1e-5)


def test_capacity_in_eval_uses_eval_capacity_factor():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])  # all to expert 0
    layer = _fixed_router_layer(2, k=1, capacity_factor=0.5, eval_capacity_factor=2.0)
    layer.train()(x)
    assert layer.dropped_assignments == 3  # capacity ceil(0.5 * 4 / 2) = 1
    layer.eval()(x)
    assert layer.dropped_assignments == 0  # capacity 4
    layer.capacity_factor = None
    layer.train()(x)
    assert layer.dropped_assignments == 0 and layer.drop_rate == 0.0


def test_aux_losses_match_hand_computation():
    logits = [[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]
    layer = _fixed_router_layer(2, k=1, balance_loss_weight=0.5, z_loss_weight=0.25)
    layer(torch.tensor(logits))
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))] for a, b in logits]
    f = [2 / 3, 1 / 3]  # top-1 experts: 0, 1, 0
    mean_p = [sum(p[i] for p in probs) / 3 for i in range(2)]
    balance = 2 * (f[0] * mean_p[0] + f[1] * mean_p[1])
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in logits) / 3
    assert layer.balance_loss.item() == pytest.approx(balance, rel=1e-6)
    assert layer.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert layer.aux_loss.item() == pytest.approx(0.5 * balance + 0.25 * z, rel=1e-6)
    # uniform routing gives the minimum 1, everything on one expert gives E
    layer(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert layer.balance_loss.item() == pytest.approx(1.0)
    layer(torch.tensor([[50.0, 0.0], [60.0, 0.0]]))
    assert layer.balance_loss.item() == pytest.approx(2.0, rel=1e-6)
    # k = 2 counts every top-k assignment: f is uniform and the loss is E * sum(P_i) / E = 1
    layer2 = _fixed_router_layer(2, k=2)
    layer2(torch.tensor(logits))
    assert layer2.balance_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_balance_loss_uses_clean_probabilities_and_noisy_assignments():
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 2, 4, k=2, noise_seed=0).train()
    with torch.no_grad():
        layer.noise.weight.fill_(0.3)  # large noise: noisy and clean routing differ
    x = torch.randn(64, 6)
    with layer.recording():
        layer(x)
    record = layer.last_routing
    clean = torch.softmax(x @ layer.router.weight.detach().t(), dim=1)
    assert not torch.allclose(record.probs, clean)
    share = torch.bincount(record.experts.reshape(-1), minlength=4).float() / 128
    assert layer.balance_loss.item() == pytest.approx(4 * float((share * clean.mean(0)).sum()), rel=1e-5)
    assert layer.balance_loss.requires_grad
    (grad_noise,) = torch.autograd.grad(layer.balance_loss, [layer.noise.weight], allow_unused=True)
    assert grad_noise is None  # the noise network cannot lower the balance loss by adding noise


def test_moe_aux_loss_sums_every_layer_and_backpropagates():
    torch.manual_seed(0)
    net = nn.Sequential(MixtureOfExperts(6, 6, 4), nn.ReLU(), nn.Sequential(MixtureOfExperts(6, 3, 3, k=1)))
    with pytest.raises(RuntimeError, match="after the model's forward"):
        moe_aux_loss(net)
    net(torch.randn(10, 6))
    total = moe_aux_loss(net)
    assert total.item() == pytest.approx(net[0].aux_loss.item() + net[2][0].aux_loss.item(), rel=1e-6)
    total.backward()
    assert net[0].router.weight.grad.abs().sum() > 0 and net[2][0].router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no MixtureOfExperts"):
        moe_aux_loss(nn.Linear(2, 2))


def test_top_k_warm_up_routes_to_warmup_k_experts_then_k_and_never_in_eval():
    torch.manual_seed(0)
    layer = MixtureOfExperts(6, 3, 4, k=1, noisy_gating=False, warmup_k=2, warmup_steps=2)
    top2 = copy.deepcopy(layer)
    top2.k, top2.warmup_k, top2.warmup_steps, top2.normalize_gates = 2, None, 0, True
    top1 = copy.deepcopy(top2)
    top1.k, top1.normalize_gates = 1, False
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.allclose(layer.eval()(x), top1.eval()(x), atol=1e-6) and layer.training_calls == 0  # eval: k
        layer.train(), top1.train(), top2.train()
        for call in range(3):
            with layer.recording():
                out = layer(x)
            # calls 0 and 1: top-2 with gates renormalized over the two experts; then top-1 with the raw probability
            expected = top2(x) if call < 2 else top1(x)
            assert torch.allclose(out, expected, atol=1e-6)
            assert layer.last_routing.experts.shape == (9, 2 if call < 2 else 1)
            assert int(layer.tokens_per_expert.sum()) == (18 if call < 2 else 9)
        assert layer.training_calls == 3
    restored = MixtureOfExperts(6, 3, 4, k=1, noisy_gating=False, warmup_k=2, warmup_steps=2)
    restored.load_state_dict(layer.state_dict())  # a resumed run does not repeat the warm-up
    assert restored.training_calls == 3
    with torch.no_grad(), restored.masking([0, 1, 2]):  # one expert left: the warm-up cannot use two
        assert restored.train()(x).shape == (9, 3) and restored.training_calls == 4
    assert "warmup_k=2, warmup_steps=2" in repr(layer)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(warmup_k=2), "warmup_k and warmup_steps go together"),
        (dict(warmup_steps=10), "warmup_k and warmup_steps go together"),
        (dict(warmup_k=1, warmup_steps=10), r"warmup_k must lie in \(k, num_experts\] = \(1, 4\], got 1"),
        (dict(warmup_k=5, warmup_steps=10), r"warmup_k must lie in \(k, num_experts\]"),
        (dict(warmup_k=2, warmup_steps=-1), "warmup_steps must be an int >= 0"),
    ],
)
def test_warm_up_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfExperts(4, 2, 4, k=1, **kwargs)


def test_k1_gate_keeps_router_gradient_from_task_loss():
    torch.manual_seed(0)
    layer = MixtureOfExperts(4, 2, 3, k=1, noisy_gating=False, balance_loss_weight=0.0, z_loss_weight=0.0)
    assert not layer.normalize_gates
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    renorm = MixtureOfExperts(4, 2, 3, k=1, noisy_gating=False, normalize_gates=True)
    renorm(torch.randn(8, 4)).pow(2).sum().backward()
    assert renorm.router.weight.grad is None or renorm.router.weight.grad.abs().sum() == 0  # gate is always 1


def test_noise_only_in_training_from_private_generator():
    torch.manual_seed(0)
    layer = MixtureOfExperts(5, 2, 4, k=2, noise_seed=7)
    x = torch.randn(32, 5)
    state = torch.get_rng_state()
    a, b = layer.train()(x), layer(x)
    assert not torch.allclose(a, b)  # fresh noise each training call
    assert torch.equal(torch.get_rng_state(), state)  # ... not from the global RNG
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    twin = MixtureOfExperts(5, 2, 4, k=2, noise_seed=7)
    twin.load_state_dict(copy.deepcopy(layer.state_dict()))
    layer.noise_generator.manual_seed(1)
    twin.noise_generator.manual_seed(1)
    assert torch.equal(layer.train()(x), twin.train()(x))
    plain = MixtureOfExperts(5, 2, 4, k=2, noisy_gating=False)
    assert plain.noise is None and torch.equal(plain.train()(x), plain(x))


def test_state_dict_restores_noise_stream_and_copies_drop_graph_tensors():
    torch.manual_seed(0)
    layer = MixtureOfExperts(4, 2, 3, k=2, noise_seed=5).train()
    x = torch.randn(6, 4)
    layer(x)
    saved = copy.deepcopy(layer.state_dict())
    expected = layer(x)
    clone = MixtureOfExperts(4, 2, 3, k=2, noise_seed=99).train()
    clone.load_state_dict(saved)
    assert torch.equal(clone(x), expected)
    copied = copy.deepcopy(layer)  # aux_loss holds a graph: deepcopy must still work
    assert copied.aux_loss is None and layer.aux_loss is not None
    restored = pickle.loads(pickle.dumps(layer))
    assert isinstance(restored, MixtureOfExperts)


def test_routing_record_is_off_by_default_and_recording_restores_the_flag():
    torch.manual_seed(0)
    layer = MixtureOfExperts(4, 2, 3, k=2)
    layer(torch.randn(5, 4))
    assert layer.last_routing is None and layer.tokens_per_expert.sum().item() == 10
    with layer.recording():
        layer(torch.randn(5, 4))
        record = layer.last_routing
    assert not layer.record_routing
    assert record.experts.shape == (5, 2) and record.top1.shape == (5,) and record.num_tokens == 5
    assert torch.equal(record.top1, record.probs.argmax(1))  # probs are those of the (noisy) routing scores
    assert not record.gates.requires_grad


def test_masking_reroutes_without_touching_parameters():
    x = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    layer = _fixed_router_layer(3, k=1)
    params = copy.deepcopy(layer.state_dict())
    with layer.masking([0]), layer.recording():
        layer(x)
        assert layer.last_routing.experts[:, 0].tolist() == [1, 1]
        assert layer.last_routing.probs[:, 0].tolist() == [0.0, 0.0]
    assert layer.masked_experts == frozenset()
    for key, value in layer.state_dict().items():
        if key != "_extra_state":
            assert torch.equal(value, params[key])
    with pytest.raises(ValueError, match="masked_experts leaves 1 experts but every token needs k=2"):
        _fixed_router_layer(3, k=2).masked_experts = [0, 1]
    with pytest.raises(ValueError, match=r"expert indices in \[0, 2\]"):
        layer.masked_experts = [3]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=5), ValueError, "k must be <= num_experts"),
        (dict(k=0), ValueError, "k must be a positive int"),
        (dict(num_experts=0), ValueError, "num_experts must be a positive int"),
        (dict(capacity_factor=0), ValueError, "capacity_factor must be a positive"),
        (dict(drop_policy="random"), ValueError, "drop_policy must be one of"),
        (dict(dispatch="einsum"), ValueError, "dispatch must be one of"),
        (dict(balance_loss_weight=-1.0), ValueError, "balance_loss_weight must be a number >= 0"),
        (dict(expert=nn.Linear(4, 2)), TypeError, "expert must be a factory"),
        (dict(expert=lambda: 3), TypeError, "expert\\(\\) must return an nn.Module"),
        (dict(expert=lambda: nn.Linear(4, 2), hidden_features=8), ValueError, "hidden_features only sizes"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, match):
    args = dict(in_features=4, out_features=2, num_experts=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MixtureOfExperts(**args)


def test_shared_expert_factory_and_bad_inputs_raise_clear_errors():
    shared = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="same module object twice"):
        MixtureOfExperts(4, 2, 3, expert=lambda: shared)
    wrong = MixtureOfExperts(4, 2, 3, expert=lambda: nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"expert \d must map \(n, 4\) to \(n, out_features=2\)"):
        wrong(torch.randn(3, 4))
    layer = MixtureOfExperts(4, 2, 3)
    with pytest.raises(ValueError, match="last input dimension must be in_features=4"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="add a batch dimension"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 4, dtype=torch.long))
    empty = layer(torch.randn(0, 4))
    assert empty.shape == (0, 2) and layer.aux_loss.item() == 0.0


def test_routing_statistics_and_nmi_match_sklearn():
    gen = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 4, (200, 2), generator=gen)
    labels = (experts[:, 0] + (torch.rand(200, generator=gen) < 0.3).long()) % 3
    stats = routing_statistics(experts, 4, labels=labels)
    assert stats.nmi == pytest.approx(normalized_mutual_info_score(labels.numpy(), experts[:, 0].numpy()), abs=1e-9)
    counts = torch.bincount(experts.reshape(-1), minlength=4).double()
    assert stats.load_cv == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
    assert torch.allclose(stats.load.sum(), torch.tensor(1.0))
    assert int(stats.expert_class_counts.sum()) == 200
    table = stats.expert_class_counts.double()
    assert torch.allclose(stats.purity, (table.max(1).values / table.sum(1)).float())

    collapsed = routing_statistics(torch.zeros(10, 1, dtype=torch.long), 4, kept=torch.tensor([True] * 7 + [False] * 3))
    assert collapsed.load_cv == pytest.approx(math.sqrt(3)) and collapsed.usage_entropy == 0.0
    assert collapsed.max_top1_share == 1.0 and collapsed.dead_experts == 3 and collapsed.drop_rate == 0.3
    balanced = routing_statistics(torch.arange(8).remainder(4), 4)
    assert balanced.load_cv == 0.0 and balanced.usage_entropy == pytest.approx(1.0)
    assert normalized_mutual_info(torch.tensor([[4, 0], [0, 0]])) == 1.0  # one cluster each (sklearn's convention)
    assert normalized_mutual_info(torch.tensor([[2, 2], [0, 0]])) == 0.0
    with pytest.raises(ValueError, match="one label per token"):
        routing_statistics(experts, 4, labels=labels[:5])


def test_ablation_on_a_model_restores_mode_and_mask():
    x = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    layer = _fixed_router_layer(3, k=1)
    model = nn.Sequential(layer, nn.Linear(1, 1))
    with torch.no_grad():  # logits (x, -x): class 0 iff the routed expert's output is positive
        model[1].weight.fill_(1.0)
        model[1].bias.zero_()
    model.train()
    preds = ablation_predictions(model, layer, x, forward=lambda m, v: torch.cat([m(v), -m(v)], dim=1))
    assert preds.shape == (4, 3)
    assert model.training and layer.masked_experts == frozenset()
    result = ablation_accuracy(preds, torch.zeros(3, dtype=torch.long), num_classes=2)
    assert result.base.tolist()[0] == 1.0 and torch.isnan(result.base[1])
    assert result.overall_drop.tolist() == [0.0, 0.0, 0.0] and result.support.tolist() == [3, 0]


def test_ablation_accuracy_exact():
    preds = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 2], [1, 1, 1, 0]])
    result = ablation_accuracy(preds, torch.tensor([0, 1, 1, 2]))
    assert result.base.tolist() == [1.0, 1.0, 1.0]
    assert result.drop.tolist() == [[0.0, 0.5, 0.0], [1.0, 0.0, 1.0]]
    assert result.overall_drop.tolist() == [0.25, 0.5]


# ---------------------------------------------------------------------- what RoutingMonitor computes, without Lightning
def _recorded(layer: MixtureOfExperts, x: torch.Tensor):
    with torch.no_grad(), layer.recording():
        layer(x)
    return layer.last_routing


def test_token_labels_share_a_sample_label_or_use_per_token_labels():
    assert token_labels(torch.tensor([3, 5]), (2, 3)).tolist() == [3, 3, 3, 5, 5, 5]
    assert token_labels(torch.tensor([[1, 2], [3, 4]]), (2, 2)).tolist() == [1, 2, 3, 4]
    assert token_labels(torch.tensor([7, 8]), (2,)).tolist() == [7, 8]
    with pytest.raises(TypeError, match="integer class indices"):
        token_labels(torch.tensor([0.5, 1.0]), (2,))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) match neither the tokens \(2, 4\)"):
        token_labels(torch.tensor([1, 2, 3]), (2, 4))


def test_routing_rows_of_sequence_inputs():
    layer = MixtureOfExperts(8, 8, num_experts=4, k=2, noise_seed=0).eval()
    record = _recorded(layer, torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)))
    labels = token_labels(torch.tensor([4, 1, 9]), record.experts.shape[:-1])
    rows = routing_rows(record, sample_ids=torch.tensor([10, 11, 12]), labels=labels, call=1)
    assert rows.shape == (15, 4 + 2 * 2) and rows.dtype == torch.long
    assert rows[:, ROW_ID].tolist() == [10] * 5 + [11] * 5 + [12] * 5
    assert rows[:, ROW_POSITION].tolist() == list(range(5)) * 3 and set(rows[:, ROW_CALL].tolist()) == {1}
    assert rows[:, ROW_LABEL].tolist() == [4] * 5 + [1] * 5 + [9] * 5
    assert torch.equal(rows[:, 4:6], record.experts.reshape(15, 2)) and bool(rows[:, 6:].bool().all())
    anonymous = routing_rows(record)
    assert set(anonymous[:, ROW_ID].tolist()) == {-1} and set(anonymous[:, ROW_LABEL].tolist()) == {-1}
    with pytest.raises(ValueError, match="sample_ids holds 2 ids for a batch of 3"):
        routing_rows(record, sample_ids=torch.tensor([1, 2]))
    # the statistics of the rows are those of the record
    stats = routing_statistics_from_rows(rows, 4)
    direct = routing_statistics(record.experts.reshape(15, 2), 4, kept=record.kept.reshape(15, 2), labels=labels)
    assert stats.nmi == direct.nmi and torch.equal(stats.expert_class_counts, direct.expert_class_counts)
    assert routing_statistics_from_rows(anonymous, 4).nmi is None  # no labels, no class metrics


def test_routing_row_keys_merge_only_the_same_token_of_the_same_sample_and_call():
    rows = torch.tensor([[7, 0, 0, 1, 2, 1], [7, 0, 1, 1, 0, 1], [3, 0, 0, 0, 1, 1], [7, 0, 0, 1, 2, 1],
                         [7, 1, 0, 1, 3, 1], [-1, 0, 0, 1, 1, 1], [-1, 0, 0, 1, 1, 1]])
    keys = routing_row_keys(rows)
    assert keys[0] == keys[3] and len(set(keys.tolist())) == 6


def test_routing_losses_equal_the_layer_losses_and_do_not_depend_on_the_batching():
    gen = torch.Generator().manual_seed(0)
    layer = MixtureOfExperts(8, 8, num_experts=4, k=2, noise_seed=0, eval_capacity_factor=1.0).eval()
    x = torch.randn(40, 8, generator=gen)
    record = _recorded(layer, x)
    whole = routing_losses(routing_rows(record), router_rows(record), 4)
    assert whole["balance_loss"] == pytest.approx(float(layer.balance_loss), rel=1e-6)
    assert whole["z_loss"] == pytest.approx(float(layer.z_loss), rel=1e-6)
    # the same tokens in two forward calls of 15 and 25: the per-batch losses differ, the monitor's do not
    parts = [_recorded(layer, chunk) for chunk in (x[:15], x[15:])]
    split = routing_losses(torch.cat([routing_rows(r) for r in parts]), torch.cat([router_rows(r) for r in parts]), 4)
    assert split == pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        routing_losses(routing_rows(record), router_rows(record)[:3], 4)


def test_routing_scalars_and_summary():
    stats = routing_statistics(torch.tensor([[0], [0], [1], [2]]), 4, labels=torch.tensor([1, 1, 0, 0]))
    scalars = routing_scalars(stats, {"balance_loss": 1.5, "z_loss": 0.25})
    assert scalars["load/expert_0"] == 0.5 and scalars["load/expert_3"] == 0.0 and scalars["dead_experts"] == 1.0
    assert scalars["purity/expert_0"] == 1.0 and "purity/expert_3" not in scalars  # an unused expert has no purity
    assert scalars["balance_loss"] == 1.5 and scalars["max_top1_share"] == 0.5
    assert len(scalars) == 7 + 2 + 4 + 3  # no more cards than before
    ablation = ablation_accuracy(torch.tensor([[1, 0, 0, 1], [1, 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([1, 0, 0, 1]))
    line = routing_summary(stats, ablation, experts=[2, 3])
    assert line.startswith("load_cv ") and "dead_experts 1" in line
    assert line.endswith("largest accuracy drop 0.500 (expert 3 masked)")


def test_ablation_rows_round_trip_with_per_token_labels():
    targets = torch.tensor([[1, 2, 0], [0, 0, 1]])  # 2 samples of 3 tokens
    preds = torch.arange(3 * 2 * 3).reshape(3, 2, 3) % 3  # unablated + 2 masked experts
    rows = pack_ablation_rows(torch.tensor([8, 4]), targets, preds)
    assert rows.shape == (2, 1 + 3 + 9)
    ids, back_targets, back_preds = unpack_ablation_rows(rows, runs=3)
    assert ids.tolist() == [8, 4] and torch.equal(back_targets, targets) and torch.equal(back_preds, preds)
    with pytest.raises(ValueError, match="do not match labels of shape"):
        pack_ablation_rows(torch.tensor([8, 4]), targets, preds[:, :, :2])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\] \(num_classes=2\)"):
        ablation_accuracy(preds.reshape(3, -1), targets.reshape(-1), num_classes=2)
