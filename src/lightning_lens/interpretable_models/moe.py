"""Mixture-of-experts layer whose routing can be read, measured and ablated.

References:
    - N. Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017
      (noisy top-k gating).
    - D. Lepikhin et al., "GShard", 2020, and W. Fedus et al., "Switch Transformers", JMLR 2022 (load-balancing loss,
      expert capacity).
    - B. Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022 (router z-loss).
    - C. Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021 (batch-prioritized routing,
      ``drop_policy="gate"``).

Everything here is plain PyTorch (no Lightning): the layer, :func:`moe_aux_loss`, the routing statistics
(:func:`routing_statistics`, :func:`normalized_mutual_info`) and the expert ablation (:func:`ablation_predictions`,
:func:`ablation_accuracy`) used by :class:`lightning_lens.callbacks.RoutingMonitor`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.utils import preserve_modes
from lightning_lens.utils.checks import check_choice

__all__ = [
    "ExpertAblation",
    "MixtureOfExperts",
    "RoutingRecord",
    "RoutingStatistics",
    "ablation_accuracy",
    "ablation_predictions",
    "moe_aux_loss",
    "moe_layers",
    "normalized_mutual_info",
    "pack_ablation_rows",
    "router_rows",
    "routing_losses",
    "routing_row_keys",
    "routing_rows",
    "routing_scalars",
    "routing_statistics",
    "routing_statistics_from_rows",
    "routing_summary",
    "suggested_balance_loss_weight",
    "token_labels",
    "unpack_ablation_rows",
]

_DISPATCH = ("sorted", "dense", "grouped")
# parameter-free elementwise activations: applied once to the stacked (E, C, h) hidden states of grouped dispatch,
# they give what each expert's own module gives on its rows
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.ELU, nn.Softplus,
                nn.Mish, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU)
_DROP_POLICIES = ("order", "gate")

#: default ``balance_loss_weight``. The balance loss is normalised as in Switch Transformers (1 at uniform routing), but
#: Switch's 0.01 leaves small models collapsed: on a task without regimes (E=8, k=2, no gating noise, inputs of mean
#: 3) load CV 1.23 and top-1 shares up to 0.94 over 5 seeds; 0.03 still CV 0.65, shares up to 0.64; 0.1 is the
#: smallest weight tried that kept every seed of both tasks (input mean 1 and 3) at CV <= 0.31 and shares <= 0.27.
#: ``benchmarks/moe_regimes.py --balance``.
DEFAULT_BALANCE_LOSS_WEIGHT = 0.1


@dataclass(frozen=True)
class RoutingRecord:
    """The routing of one forward call, detached: which experts each token went to and with what weight.

    Leading dimensions are those of the layer's input: ``(B,)`` for ``(B, D)`` inputs, ``(B, T)`` for ``(B, T, D)``.

    Attributes:
        experts: ``(..., k)`` long, the chosen experts, best first (``experts[..., 0]`` is the top-1 expert).
        gates: ``(..., k)`` the combine weights of the chosen experts (before capacity drops).
        probs: ``(..., E)`` router probabilities over all experts (softmax of the routing logits, with the
            gating noise when it was applied).
        kept: ``(..., k)`` bool, False where the assignment was dropped because the expert was over capacity.
        logits: ``(..., E)`` the clean router logits (no gating noise; masked experts at ``-inf``), from which the
            balance and z losses are computed; None in records built without them.
    """

    experts: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor
    kept: torch.Tensor
    logits: Optional[torch.Tensor] = None

    @property
    def top1(self) -> torch.Tensor:
        """``(...)`` long: each token's highest-scoring expert."""
        return self.experts[..., 0]

    @property
    def num_tokens(self) -> int:
        return int(self.experts[..., 0].numel())


class _Routing(NamedTuple):
    experts: torch.Tensor  # (N, k) long
    gates: torch.Tensor  # (N, k) float32, differentiable
    probs: torch.Tensor  # (N, E) float32, differentiable: softmax of the routing scores (noisy in training)
    logits: torch.Tensor  # (N, E) float32 clean router logits (masked experts at -inf)
    kept: Optional[torch.Tensor]  # (N, k) bool, None when no capacity limit applies
    probs_are_clean: bool  # no noise was added (probs == softmax(logits))

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept (token, expert) assignments, flat: ``(expert_of, gate_of, token_of)``."""
        expert_of, gate_of = self.experts.reshape(-1), self.gates.reshape(-1)
        n, k = self.experts.shape
        token_of = torch.arange(n, device=self.experts.device).repeat_interleave(k)
        if self.kept is not None:
            keep = self.kept.reshape(-1)
            expert_of, gate_of, token_of = expert_of[keep], gate_of[keep], token_of[keep]
        return expert_of, gate_of, token_of


def _index_add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out.index_add_(0, index, rows)``; on the CPU through ``index_put_(accumulate=True)``, the same sum, because
    the CPU ``index_add_`` kernel loops over rows and is several times slower for 2-D tensors."""
    if out.device.type == "cpu":
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def _default_expert(in_features: int, hidden: int, out_features: int, activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), activation(), nn.Linear(hidden, out_features))


def _linear_steps(expert: nn.Module) -> Optional[list[nn.Module]]:
    """``expert`` as a list of steps that grouped dispatch can stack, or None: an ``nn.Linear``, or an
    ``nn.Sequential`` of ``nn.Linear`` and parameter-free elementwise activations (exact types, not subclasses)."""
    steps = list(expert) if type(expert) is nn.Sequential else [expert]
    for m in steps:
        plain_activation = type(m) in _ELEMENTWISE and next(iter(m.parameters()), None) is None
        if type(m) is not nn.Linear and not (plain_activation and next(iter(m.buffers()), None) is None):
            return None
    return steps


def _step_signature(m: nn.Module) -> tuple:
    if type(m) is nn.Linear:
        return ("Linear", m.in_features, m.out_features, m.bias is not None, m.weight.dtype, m.weight.device)
    return (type(m).__name__, m.extra_repr())


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _optional_factor(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number or None (dropless), got {value!r}")
    return float(value)


def _weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class MixtureOfExperts(nn.Module):
    """A sparsely-gated mixture-of-experts layer with top-k routing whose every decision can be inspected.

    Each token (a row of a ``(B, D)`` input, or a position of a ``(B, T, D)`` input; any ``(..., D)`` works) is sent
    to ``k`` of ``num_experts`` experts; the output is the gate-weighted sum of their outputs. Under DDP each rank
    routes, counts and computes the auxiliary losses on its own tokens.

    **Gating.** A linear router (fp32, no bias) gives logits ``xW_g``. With ``noisy_gating`` (Shazeer et al. 2017)
    the routing logits in training are ``H(x) = xW_g + eps * softplus(xW_noise)``, ``eps ~ N(0, 1)`` drawn from the
    layer's private CPU generator (seeded by ``noise_seed``, saved in the state dict, moved to the input's device;
    the global RNG is never drawn during forward). In eval, and with ``noisy_gating=False``, ``H(x) = xW_g`` (plain
    softmax top-k). The top-k of ``H`` are chosen. With ``normalize_gates`` the gates are the router probabilities
    renormalized over the top-k (``softmax`` of the k chosen logits, as in Shazeer et al.); without it they are the
    full-softmax probabilities of the chosen experts (Switch). Default: renormalize when ``k > 1``; for ``k = 1``
    keep the raw probability so the router still gets a gradient from the task loss.

    **Top-k warm-up.** With ``warmup_k`` (e.g. ``k=1, warmup_k=2``) the first ``warmup_steps`` forward calls in
    training mode (counted in ``training_calls``, saved in the state dict) route each token to ``warmup_k`` experts
    with gates renormalized over them, then to ``k``; eval always uses ``k``. Top-1 routing only tells the router
    how good the chosen expert is; renormalized top-2 gates compare two experts on every token, which lets the router
    find regimes that top-1 training alone can miss: on the sign-pattern regimes of
    :class:`~lightning_lens.datasets.SignRegimes` (``benchmarks/moe_regimes.py``, seeds 0-19) ``k=1`` recovered the
    regimes in 9 of 20 seeds, with ``warmup_k=2`` for the first half of training in 18, and with the warm-up and
    ``noisy_gating=False`` in all 20 (``k=2`` throughout: all 20). A warm-up of a third of training did less (16).

    **Auxiliary losses**, set after every forward (tensors attached to the graph):

    - ``balance_loss`` (Switch/GShard): ``E * sum_i f_i * P_i`` with ``f_i`` the share of the ``N * k`` top-k
      assignments that go to expert ``i`` (for ``k = 1`` exactly Switch's top-1 fraction) and ``P_i`` the mean router
      probability of expert ``i`` from the clean logits ``xW_g`` (so the noise cannot fake a balance that the
      noise-free eval routing lacks). It equals 1 under uniform routing and ``E`` when everything goes to one
      expert.
    - ``z_loss`` (ST-MoE): mean over tokens of ``logsumexp(xW_g)^2`` (clean logits).
    - ``aux_loss = balance_loss_weight * balance_loss + z_loss_weight * z_loss``: add it to the task loss, or add
      :func:`moe_aux_loss(model) <moe_aux_loss>` for all layers of a model. Only the last call of the layer is kept.

    **Dispatch.** ``"sorted"`` (default): assignments are sorted by expert, each expert runs once on its own tokens,
    and results are combined with ``index_add`` (dropless unless a capacity is set; on the CPU the same sum runs as
    ``index_put_(accumulate=True)``, whose kernel is faster there). ``"dense"``: every expert runs on
    every token and the results are masked by the gates: the reference, with the same outputs and gradients, at
    ``E/k`` times the cost. ``"grouped"``: sorted dispatch with the experts' weights stacked, each expert's tokens
    padded to the largest group, and one batched matmul (``torch.bmm``) per layer for all experts instead of a
    Python loop over experts; for experts that are ``nn.Linear`` or ``nn.Sequential`` of ``nn.Linear`` and
    elementwise activations, all of the same shapes (the default expert is). It pays off with many small experts,
    where the loop's per-expert overhead dominates; with a few large experts on the CPU it runs about as fast as
    sorted (``torch.bmm`` runs the same per-expert matrix products), and padding costs up to the dense path's work
    when the load has collapsed (``benchmarks/moe.py``). Experts with forward hooks are run one by one (sorted) so
    the hooks see their calls. ``forward(x, dense=True)`` or
    ``forward(x, dispatch=...)`` picks a path for one call.

    **Capacity.** With ``capacity_factor`` (``eval_capacity_factor`` in eval, default the same) each expert takes at
    most ``ceil(capacity_factor * N * k / E)`` assignments per call; the rest are dropped: their contribution is zero
    (gates of the kept experts are not renormalized; add a residual connection around the layer to carry dropped
    tokens). Who is dropped: ``drop_policy="order"`` keeps all first choices before any second choice, each in token
    order (GShard); ``"gate"`` keeps the assignments with the largest gates first (batch-prioritized routing,
    Riquelme et al. 2021). Counts after each forward: ``dropped_assignments``, ``dropped_tokens`` (tokens that lost
    at least one of their k experts) and ``drop_rate`` (dropped assignments / ``N * k``).

    **Inspection.** ``tokens_per_expert`` (assignments per expert of the last call) is always set. With
    ``record_routing`` on (off by default; :meth:`recording` turns it on for a block, as ``RoutingMonitor`` does while
    it collects) ``last_routing`` holds a :class:`RoutingRecord` of the last call. ``masked_experts`` (or
    :meth:`masking`) removes experts from routing: their logits are set to ``-inf`` so tokens go to their best
    remaining experts, without touching any parameter (used for per-expert ablation).

    Args:
        in_features: size ``D`` of the last input dimension.
        out_features: size of the last output dimension.
        num_experts: number of experts ``E`` (>= 1).
        k: experts per token, ``1 <= k <= num_experts``.
        expert: factory ``() -> nn.Module`` called ``num_experts`` times; each module maps ``(n, in_features)`` to
            ``(n, out_features)``. Default: ``Linear(in, hidden) -> activation -> Linear(hidden, out)``.
        hidden_features: hidden size of the default expert (default ``4 * in_features``).
        activation: activation factory of the default expert.
        noisy_gating: add Shazeer's learned Gaussian noise to the routing logits in training.
        normalize_gates: renormalize gates over the top-k (default: ``k > 1``).
        capacity_factor: per-expert capacity factor in training, ``None`` for dropless.
        eval_capacity_factor: the same in eval mode (default: ``capacity_factor``).
        drop_policy: ``"order"`` or ``"gate"`` (see above).
        balance_loss_weight: weight of ``balance_loss`` in ``aux_loss``. Default 0.1
            (:data:`DEFAULT_BALANCE_LOSS_WEIGHT`): Switch's 1e-2 on the same loss lets the routing of small models
            collapse onto one or two experts; raise it if ``RoutingMonitor`` reports a collapse.
        z_loss_weight: weight of ``z_loss`` in ``aux_loss`` (ST-MoE: 1e-3).
        dispatch: ``"sorted"``, ``"dense"`` or ``"grouped"``.
        record_routing: keep a :class:`RoutingRecord` of every forward in ``last_routing``.
        noise_seed: seed of the private noise generator; ``None`` draws one from the global RNG at construction
            (like the weight initialisation, so ``seed_everything`` makes it reproducible).
        warmup_k: experts per token during the warm-up, in ``(k, num_experts]`` (None: no warm-up).
        warmup_steps: training-mode forward calls the warm-up lasts (with gradient accumulation or a layer called
            several times per step, count every call).

    Example:
        >>> moe = MixtureOfExperts(16, 8, num_experts=4, k=2)
        >>> y = moe(torch.randn(32, 16))
        >>> loss = y.pow(2).mean() + moe.aux_loss
        >>> moe(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 8])
        >>> with moe.recording():
        ...     _ = moe.eval()(torch.randn(3, 16))
        >>> moe.last_routing.experts.shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        k: int = 2,
        expert: Optional[Callable[[], nn.Module]] = None,
        hidden_features: Optional[int] = None,
        activation: Callable[[], nn.Module] = nn.GELU,
        noisy_gating: bool = True,
        normalize_gates: Optional[bool] = None,
        capacity_factor: Optional[float] = None,
        eval_capacity_factor: Optional[float] = None,
        drop_policy: str = "order",
        balance_loss_weight: float = DEFAULT_BALANCE_LOSS_WEIGHT,
        z_loss_weight: float = 1e-3,
        dispatch: str = "sorted",
        record_routing: bool = False,
        noise_seed: Optional[int] = None,
        warmup_k: Optional[int] = None,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.k = _positive_int(k, "k")
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}; lower k or add experts")
        if hidden_features is not None:
            _positive_int(hidden_features, "hidden_features")
            if expert is not None:
                raise ValueError("hidden_features only sizes the default expert; leave it None when passing expert=")
        check_choice(drop_policy, "drop_policy", _DROP_POLICIES)
        check_choice(dispatch, "dispatch", _DISPATCH)
        if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, int)):
            raise TypeError(f"noise_seed must be an int or None, got {type(noise_seed).__name__}")
        self.capacity_factor = _optional_factor(capacity_factor, "capacity_factor")
        self.eval_capacity_factor = _optional_factor(
            capacity_factor if eval_capacity_factor is None else eval_capacity_factor, "eval_capacity_factor"
        )
        self.balance_loss_weight = _weight(balance_loss_weight, "balance_loss_weight")
        self.z_loss_weight = _weight(z_loss_weight, "z_loss_weight")
        self.noisy_gating = bool(noisy_gating)
        self.normalize_gates = self.k > 1 if normalize_gates is None else bool(normalize_gates)
        self.warmup_k = None if warmup_k is None else _positive_int(warmup_k, "warmup_k")
        if self.warmup_k is not None and not self.k < self.warmup_k <= self.num_experts:
            raise ValueError(f"warmup_k must lie in (k, num_experts] = ({self.k}, {self.num_experts}], got {warmup_k}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if (self.warmup_k is None) != (warmup_steps == 0):
            raise ValueError("warmup_k and warmup_steps go together: set both (e.g. warmup_k=2, warmup_steps=500) "
                             "or neither")
        self.warmup_steps = warmup_steps
        self.training_calls = 0  # forward calls in training mode so far (they end the warm-up)
        self.drop_policy = drop_policy
        self.dispatch = dispatch
        self.record_routing = bool(record_routing)

        self.experts = nn.ModuleList(self._build_experts(expert, hidden_features, activation))
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False)
        self.noise = nn.Linear(self.in_features, self.num_experts, bias=False) if self.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # softplus(0) ~ 0.69: exploratory noise at the start (Shazeer et al.)
        if dispatch == "grouped":
            self._grouped_steps()  # raises now, not at the first forward, for experts it cannot stack
        seed = int(torch.randint(0, 2**62, (1,)).item()) if noise_seed is None else noise_seed
        self._noise_generator = torch.Generator().manual_seed(seed)
        self._masked: frozenset[int] = frozenset()
        self._reset_outputs()

    def _build_experts(
        self, expert: Optional[Callable[[], nn.Module]], hidden: Optional[int], activation: Callable[[], nn.Module]
    ) -> list[nn.Module]:
        if expert is None:
            hidden = hidden or 4 * self.in_features
            return [_default_expert(self.in_features, hidden, self.out_features, activation)
                    for _ in range(self.num_experts)]
        if not callable(expert) or isinstance(expert, nn.Module):
            raise TypeError(
                "expert must be a factory returning a new nn.Module per call (e.g. lambda: nn.Linear(8, 4)), "
                f"got {type(expert).__name__}"
            )
        modules = [expert() for _ in range(self.num_experts)]
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"expert() must return an nn.Module, call {i} returned {type(m).__name__}")
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("expert() returned the same module object twice; it must build a new module per call")
        return modules

    def _reset_outputs(self) -> None:
        self.aux_loss: Optional[torch.Tensor] = None
        self.balance_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.dropped_assignments = 0
        self.dropped_tokens = 0
        self.drop_rate = 0.0
        self.last_routing: Optional[RoutingRecord] = None

    # ------------------------------------------------------------------------------------------------ inspection API
    @property
    def masked_experts(self) -> frozenset[int]:
        """Experts excluded from routing (tokens go to their best remaining experts)."""
        return self._masked

    @masked_experts.setter
    def masked_experts(self, experts: Optional[Iterable[int]]) -> None:
        ids = frozenset() if experts is None else frozenset(experts)
        for e in ids:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts:
                raise ValueError(f"masked_experts must hold expert indices in [0, {self.num_experts - 1}], got {e!r}")
        if self.num_experts - len(ids) < self.k:
            raise ValueError(
                f"masked_experts leaves {self.num_experts - len(ids)} experts but every token needs k={self.k}; "
                "mask fewer experts"
            )
        self._masked = ids

    @contextlib.contextmanager
    def masking(self, experts: Iterable[int]) -> Iterator["MixtureOfExperts"]:
        """Exclude ``experts`` from routing inside the block; the previous mask is restored on exit.

        Example:
            >>> moe = MixtureOfExperts(4, 2, num_experts=3, k=1)
            >>> with moe.masking([0]):
            ...     _ = moe.eval()(torch.randn(5, 4))
            >>> moe.tokens_per_expert[0].item(), moe.masked_experts
            (0, frozenset())
        """
        previous = self._masked
        self.masked_experts = experts
        try:
            yield self
        finally:
            self._masked = previous

    @contextlib.contextmanager
    def recording(self, enabled: bool = True) -> Iterator["MixtureOfExperts"]:
        """Set ``record_routing`` inside the block and restore the previous value on exit."""
        previous = self.record_routing
        self.record_routing = bool(enabled)
        try:
            yield self
        finally:
            self.record_routing = previous

    @property
    def noise_generator(self) -> torch.Generator:
        """The private CPU generator of the gating noise (``manual_seed`` it to replay the noise)."""
        return self._noise_generator

    # --------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, dense: Optional[bool] = None, dispatch: Optional[str] = None) -> torch.Tensor:
        """Route ``x`` (``(B, D)`` or ``(B, T, D)``) to its top-k experts and combine their outputs.

        Args:
            x: inputs whose last dimension is ``in_features``.
            dense: ``True`` for the dense reference path, ``False`` for sorted dispatch; default ``self.dispatch``.
            dispatch: ``"sorted"``, ``"dense"`` or ``"grouped"`` for this call (instead of ``dense``).
        """
        self._check_input(x)
        if dispatch is not None:
            check_choice(dispatch, "dispatch", _DISPATCH)
            if dense is not None:
                raise ValueError("pass either dense= or dispatch=, not both")
        mode = dispatch or ({True: "dense", False: "sorted"}[bool(dense)] if dense is not None else self.dispatch)
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        if tokens.shape[0] == 0:
            return self._empty_forward(tokens, lead)
        routing = self._route(tokens)
        self.training_calls += int(self.training)
        steps = self._grouped_steps() if mode == "grouped" else None
        if mode == "dense":
            out = self._dense(tokens, routing)
        elif steps is not None:
            out = self._grouped(tokens, routing, steps)
        else:
            out = self._sorted(tokens, routing)
        self._set_outputs(routing, lead)
        return out.reshape(*lead, self.out_features)

    def _grouped_steps(self) -> Optional[list[list[nn.Module]]]:
        """Per expert, the steps grouped dispatch stacks; None when an expert has forward hooks (they must see their
        own expert's call, so sorted dispatch runs instead). Raises when the experts cannot be stacked."""
        steps = [_linear_steps(expert) for expert in self.experts]
        why = None
        if any(s is None for s in steps):
            why = "every expert must be an nn.Linear or an nn.Sequential of nn.Linear and elementwise activations"
        elif any([_step_signature(m) for m in s] != [_step_signature(m) for m in steps[0]] for s in steps[1:]):
            why = "every expert must have the same layer shapes and activations"
        if why is not None:
            raise ValueError(f"dispatch='grouped' stacks the experts' weights: {why}; use dispatch='sorted'")
        return None if any(_has_hooks(expert) for expert in self.experts) else steps

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MixtureOfExperts expects a tensor input, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"MixtureOfExperts expects inputs of shape (batch, {self.in_features}) or (batch, tokens, "
                f"{self.in_features}), got shape {tuple(x.shape)}; add a batch dimension (x.unsqueeze(0))"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"the last input dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"MixtureOfExperts expects floating-point inputs, got dtype {x.dtype}")

    def _route(self, tokens: torch.Tensor) -> _Routing:
        t32 = tokens.float()
        logits = F.linear(t32, self.router.weight.float())
        if self._masked:
            mask = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            mask[list(self._masked)] = True
            logits = logits.masked_fill(mask, float("-inf"))
        scores = logits
        noisy = self.noisy_gating and self.training
        if noisy:
            std = F.softplus(F.linear(t32, self.noise.weight.float()))
            eps = torch.randn(std.shape, generator=self._noise_generator).to(std.device)
            scores = logits + eps * std
        probs = scores.softmax(dim=-1)
        k = self.k
        if self.training and self.warmup_k is not None and self.training_calls < self.warmup_steps:
            k = min(self.warmup_k, self.num_experts - len(self._masked))
        top_scores, experts = scores.topk(k, dim=-1)
        # warm-up gates are renormalized over its top-k: the router's gradient compares the chosen experts
        normalize = self.normalize_gates if k == self.k else True
        gates = top_scores.softmax(dim=-1) if normalize else probs.gather(-1, experts)
        return _Routing(experts, gates, probs, logits, self._capacity_mask(experts, gates), not noisy)

    def _capacity_mask(self, experts: torch.Tensor, gates: torch.Tensor) -> Optional[torch.Tensor]:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        n, k = experts.shape
        capacity = math.ceil(factor * n * k / self.num_experts)
        ids = torch.arange(n * k, device=experts.device)
        if self.drop_policy == "order":
            priority = ids.view(n, k).t().reshape(-1)  # every first choice (token order), then every second ...
        else:
            priority = gates.detach().reshape(-1).sort(descending=True, stable=True).indices
        by_expert = experts.reshape(-1)[priority]
        order = by_expert.sort(stable=True).indices  # groups by expert, priority order inside each group
        grouped = by_expert[order]
        counts = torch.bincount(grouped, minlength=self.num_experts)
        starts = counts.cumsum(0) - counts
        position = torch.arange(n * k, device=experts.device) - starts[grouped]
        kept = torch.empty(n * k, dtype=torch.bool, device=experts.device)
        kept[priority[order]] = position < capacity
        return kept.view(n, k)

    def _sorted(self, tokens: torch.Tensor, routing: _Routing) -> torch.Tensor:
        n = tokens.shape[0]
        expert_of, gate_of, token_of = routing.assignments()
        order = expert_of.sort(stable=True).indices
        token_sorted, gate_sorted = token_of[order], gate_of[order]
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()  # one host sync per call
        # One gather and split() for all experts: their backward is one index_put_(accumulate=True) and one cat.
        # (Per-expert index_select or slicing would backpropagate through E slow CPU index_add_ calls or E
        # full-size zero buffers.)
        inputs = tokens[token_sorted].split(counts)
        gates = gate_sorted.split(counts)
        rows = token_sorted.split(counts)
        out: Optional[torch.Tensor] = None
        for e, count in enumerate(counts):
            if not count:
                continue
            y = self._run_expert(e, inputs[e])
            y = y * gates[e].unsqueeze(1).to(y.dtype)
            out = y.new_zeros(n, self.out_features) if out is None else out
            _index_add_rows(out, rows[e], y)
        return tokens.new_zeros(n, self.out_features) if out is None else out  # None: every assignment dropped

    def _grouped(self, tokens: torch.Tensor, routing: _Routing, steps: list[list[nn.Module]]) -> torch.Tensor:
        # Sorted dispatch with one batched matmul per layer for all experts: each expert's assignments are padded to
        # the largest group, (E, C, in); the stacked weights run through bmm, so the Python loop over experts, its E
        # small matmuls and E index_add calls (and their backward) collapse into one call each. Padding rows are
        # zeros whose outputs are never read, so they add nothing to any gradient. Cost: E * C rows instead of N * k
        # (equal when the load is balanced, up to the dense cost when it has collapsed).
        n, e_count = tokens.shape[0], self.num_experts
        expert_of, gate_of, token_of = routing.assignments()
        if expert_of.numel() == 0:
            return tokens.new_zeros(n, self.out_features)  # every assignment dropped
        expert_sorted, order = expert_of.sort(stable=True)
        token_sorted, gate_sorted = token_of[order], gate_of[order]
        counts = torch.bincount(expert_of, minlength=e_count)
        width = int(counts.max())  # one host sync per call, as in sorted dispatch
        starts = counts.cumsum(0) - counts
        slot = expert_sorted * width + torch.arange(expert_sorted.numel(), device=tokens.device) - starts[expert_sorted]
        h = tokens.new_zeros(e_count * width, self.in_features).index_copy_(0, slot, tokens[token_sorted])
        h = h.view(e_count, width, self.in_features)
        for j, step in enumerate(steps[0]):
            if type(step) is nn.Linear:
                weight = torch.stack([s[j].weight for s in steps]).transpose(1, 2)  # (E, in, out)
                if step.bias is None:
                    h = torch.bmm(h, weight)
                else:
                    h = torch.baddbmm(torch.stack([s[j].bias for s in steps]).unsqueeze(1), h, weight)
            else:
                h = step(h)  # the same elementwise activation in every expert
        if h.shape[-1] != self.out_features:
            raise ValueError(f"the experts map (n, {self.in_features}) to (n, {h.shape[-1]}), not to (n, "
                             f"out_features={self.out_features}); check the expert factory or out_features")
        y = h.reshape(e_count * width, self.out_features)[slot]
        y = y * gate_sorted.unsqueeze(1).to(y.dtype)
        out = y.new_zeros(n, self.out_features)
        _index_add_rows(out, token_sorted, y)
        return out

    def _dense(self, tokens: torch.Tensor, routing: _Routing) -> torch.Tensor:
        gates = routing.gates if routing.kept is None else routing.gates * routing.kept
        combine = routing.probs.new_zeros(tokens.shape[0], self.num_experts).scatter(1, routing.experts, gates)
        y = torch.stack([self._run_expert(e, tokens) for e in range(self.num_experts)], dim=1)
        return (y * combine.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def _run_expert(self, e: int, chunk: torch.Tensor) -> torch.Tensor:
        y = self.experts[e](chunk)
        if not isinstance(y, torch.Tensor) or y.shape != (chunk.shape[0], self.out_features):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"expert {e} must map (n, {self.in_features}) to (n, out_features={self.out_features}), got {got}; "
                "check the expert factory or out_features"
            )
        return y

    def _set_outputs(self, routing: _Routing, lead: torch.Size) -> None:
        n, k = routing.experts.shape
        counts = torch.bincount(routing.experts.reshape(-1), minlength=self.num_experts)
        share = counts.float() / (n * k)
        # P_i from the clean logits: with the noisy probabilities the noise network could "balance" the load by
        # growing the noise, leaving the noise-free routing used in eval collapsed
        clean = routing.probs if routing.probs_are_clean else routing.logits.softmax(dim=-1)
        self.balance_loss = self.num_experts * (share * clean.mean(dim=0)).sum()
        self.z_loss = torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
        self.aux_loss = self.balance_loss_weight * self.balance_loss + self.z_loss_weight * self.z_loss
        self.tokens_per_expert = counts.detach()
        if routing.kept is None:
            self.dropped_assignments = self.dropped_tokens = 0
            self.drop_rate = 0.0
        else:
            lost = ~routing.kept
            self.dropped_assignments = int(lost.sum())
            self.dropped_tokens = int(lost.any(dim=1).sum())
            self.drop_rate = self.dropped_assignments / (n * k)
        if self.record_routing:
            kept = routing.kept if routing.kept is not None else torch.ones_like(routing.experts, dtype=torch.bool)
            self.last_routing = RoutingRecord(
                experts=routing.experts.detach().reshape(*lead, k),
                gates=routing.gates.detach().reshape(*lead, k),
                probs=routing.probs.detach().reshape(*lead, self.num_experts),
                kept=kept.reshape(*lead, k),
                logits=routing.logits.detach().reshape(*lead, self.num_experts),
            )
        else:
            self.last_routing = None

    def _empty_forward(self, tokens: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        zero = self.router.weight.sum() * 0.0
        self.balance_loss, self.z_loss, self.aux_loss = zero, zero, zero
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=tokens.device)
        self.dropped_assignments = self.dropped_tokens = 0
        self.drop_rate = 0.0
        empty = tokens.new_zeros(0, self.k)
        self.last_routing = (
            RoutingRecord(empty.long().reshape(*lead, self.k), empty.reshape(*lead, self.k),
                          tokens.new_zeros(*lead, self.num_experts), empty.bool().reshape(*lead, self.k),
                          tokens.new_zeros(*lead, self.num_experts).float())
            if self.record_routing else None
        )
        return tokens.new_zeros(*lead, self.out_features)

    # ------------------------------------------------------------------------------------------- state and copies
    def get_extra_state(self) -> dict[str, Any]:
        return {"noise_generator": self._noise_generator.get_state(), "masked_experts": sorted(self._masked),
                "training_calls": self.training_calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("noise_generator") is not None:
            self._noise_generator.set_state(state["noise_generator"])
        self.masked_experts = state.get("masked_experts", ())
        self.training_calls = int(state.get("training_calls", 0))

    def __getstate__(self) -> dict[str, Any]:
        # The per-forward outputs hold graph tensors, which deepcopy and pickle refuse; copies start without them.
        state = self.__dict__.copy()
        for name in ("aux_loss", "balance_loss", "z_loss", "tokens_per_expert", "last_routing"):
            state[name] = None
        return state

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        warmup = "" if self.warmup_k is None else f", warmup_k={self.warmup_k}, warmup_steps={self.warmup_steps}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"k={self.k}{warmup}, noisy_gating={self.noisy_gating}, {cap}, dispatch={self.dispatch!r}")


def suggested_balance_loss_weight(current: float) -> float:
    """A ``balance_loss_weight`` to try when the routing collapsed at ``current``: the default
    (:data:`DEFAULT_BALANCE_LOSS_WEIGHT`) when ``current`` is below it, else three times ``current``.

    Example:
        >>> suggested_balance_loss_weight(0.01), suggested_balance_loss_weight(0.1)
        (0.1, 0.3)
    """
    if current < DEFAULT_BALANCE_LOSS_WEIGHT:
        return DEFAULT_BALANCE_LOSS_WEIGHT
    return float(f"{3 * current:.3g}")


def moe_layers(model: nn.Module) -> list[tuple[str, MixtureOfExperts]]:
    """Every :class:`MixtureOfExperts` in ``model`` with its module path (``""`` for the model itself)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MixtureOfExperts)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of ``aux_loss`` over every :class:`MixtureOfExperts` in ``model`` after its forward pass.

    Layers that have not run yet are skipped; at least one must have run.

    Example:
        >>> net = nn.Sequential(MixtureOfExperts(8, 8, 4), nn.ReLU(), MixtureOfExperts(8, 2, 4))
        >>> out = net(torch.randn(16, 8))
        >>> loss = out.pow(2).mean() + moe_aux_loss(net)
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("moe_aux_loss: the model has no MixtureOfExperts layer")
    losses = [m.aux_loss for _, m in layers if m.aux_loss is not None]
    if not losses:
        raise RuntimeError("moe_aux_loss: no MixtureOfExperts layer has run yet; call it after the model's forward")
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    return total


# ------------------------------------------------------------------------------------------------ routing statistics
def normalized_mutual_info(contingency: torch.Tensor) -> float:
    """NMI of two labelings from their contingency table, normalized by the arithmetic mean of the entropies.

    The same value as ``sklearn.metrics.normalized_mutual_info_score`` (its default ``average_method="arithmetic"``),
    computed from counts so that tables summed across processes can be used. 1.0 when both labelings have one
    cluster only (sklearn's convention), 0.0 when one of them has one cluster and the other more.

    Example:
        >>> normalized_mutual_info(torch.tensor([[5, 0], [0, 3]]))
        1.0
    """
    c = contingency.double()
    total = c.sum()
    if total <= 0:
        return float("nan")
    rows = (c.sum(1) > 0).sum().item()
    cols = (c.sum(0) > 0).sum().item()
    if rows == cols == 1:
        return 1.0
    if rows == 1 or cols == 1:
        return 0.0
    p = c / total
    pr, pc = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz].log() - (pr * pc).expand_as(p)[nz].log())).sum().clamp_min(0.0)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        q = q[q > 0]
        return -(q * q.log()).sum()

    denom = (entropy(pr) + entropy(pc)) / 2
    return float(mi / denom) if denom > 0 else 0.0


@dataclass
class RoutingStatistics:
    """What :func:`routing_statistics` measures over a set of tokens.

    Attributes:
        load: ``(E,)`` share of the top-k assignments per expert (sums to 1).
        top1_share: ``(E,)`` share of tokens whose top-1 expert is each expert.
        load_cv: coefficient of variation (population std / mean) of assignments per expert: 0 when balanced,
            ``sqrt(E - 1)`` when everything goes to one expert (k = 1).
        usage_entropy: entropy of ``load`` divided by ``log E``: 1 when balanced, 0 when collapsed.
        max_top1_share: largest entry of ``top1_share``.
        dead_experts: experts that received no assignment.
        drop_rate: dropped assignments / all assignments.
        expert_class_counts: ``(E, C)`` tokens per (top-1 expert, label), or None without labels.
        purity: ``(E,)`` share of an expert's top-1 tokens that carry its most common label (NaN for unused experts).
        mean_purity: purity averaged over tokens (i.e. weighted by expert usage).
        nmi: normalized mutual information between top-1 expert and label.
        num_tokens: tokens measured.
    """

    load: torch.Tensor
    top1_share: torch.Tensor
    load_cv: float
    usage_entropy: float
    max_top1_share: float
    dead_experts: int
    drop_rate: float
    num_tokens: int
    expert_class_counts: Optional[torch.Tensor] = None
    purity: Optional[torch.Tensor] = None
    mean_purity: Optional[float] = None
    nmi: Optional[float] = None

    def scalars(self) -> dict[str, float]:
        """The scalar metrics by name (the class metrics only when labels were given)."""
        out = {"load_cv": self.load_cv, "usage_entropy": self.usage_entropy, "max_top1_share": self.max_top1_share,
               "dead_experts": float(self.dead_experts), "drop_rate": self.drop_rate}
        if self.nmi is not None:
            out["nmi"] = self.nmi
            out["mean_purity"] = float(self.mean_purity)
        return out


def routing_statistics(
    experts: torch.Tensor,
    num_experts: int,
    kept: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
) -> RoutingStatistics:
    """Balance and specialisation of a routing: load, CV, usage entropy, drops, expert x class counts, purity, NMI.

    Args:
        experts: ``(N, k)`` chosen experts per token, best first (or ``(N,)`` for top-1 only).
        num_experts: ``E``.
        kept: ``(N, k)`` bool, False for assignments dropped over capacity (default: none dropped).
        labels: ``(N,)`` integer label per token; negative labels are ignored by the class metrics.
        num_classes: number of label values (default ``max(labels) + 1``).

    Example:
        >>> s = routing_statistics(torch.tensor([[0], [0], [1], [1]]), 2, labels=torch.tensor([3, 3, 1, 1]))
        >>> s.load_cv, s.nmi
        (0.0, 1.0)
    """
    experts = torch.as_tensor(experts).detach().cpu().long()
    if experts.dim() == 1:
        experts = experts.unsqueeze(1)
    if experts.dim() != 2:
        raise ValueError(f"experts must be (N, k) or (N,), got shape {tuple(experts.shape)}")
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
        raise ValueError(f"experts must lie in [0, {num_experts - 1}]")
    n, k = experts.shape
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).double()
    top1 = torch.bincount(experts[:, 0], minlength=num_experts).double()
    total = max(n * k, 1)
    load = counts / total
    mean = counts.mean()
    load_cv = float(counts.std(unbiased=False) / mean) if mean > 0 else float("nan")
    nz = load[load > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(num_experts)) if num_experts > 1 else 1.0
    top1_share = top1 / max(n, 1)
    drop_rate = 0.0
    if kept is not None:
        kept = torch.as_tensor(kept).detach().cpu().bool().reshape(n, -1)
        drop_rate = float((~kept).sum()) / total
    stats = RoutingStatistics(
        load=load.float(), top1_share=top1_share.float(), load_cv=load_cv, usage_entropy=entropy,
        max_top1_share=float(top1_share.max()) if n else float("nan"), dead_experts=int((counts == 0).sum()),
        drop_rate=drop_rate, num_tokens=n,
    )
    if labels is None:
        return stats
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels must hold one label per token ({n}), got {labels.shape[0]}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    valid = labels >= 0
    if num_classes is None:
        num_classes = int(labels[valid].max()) + 1 if valid.any() else 1
    if valid.any() and int(labels[valid].max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes})")
    table = torch.zeros(num_experts, num_classes, dtype=torch.long)
    table.index_put_((experts[valid, 0], labels[valid]), torch.ones(int(valid.sum()), dtype=torch.long),
                     accumulate=True)
    return _with_class_metrics(stats, table)


def _with_class_metrics(stats: RoutingStatistics, table: torch.Tensor) -> RoutingStatistics:
    per_expert = table.sum(1)
    purity = torch.where(per_expert > 0, table.max(1).values / per_expert.clamp_min(1), torch.nan).float()
    used = int(per_expert.sum())
    stats.expert_class_counts = table
    stats.purity = purity
    stats.mean_purity = float(table.max(1).values.sum() / used) if used else float("nan")
    stats.nmi = normalized_mutual_info(table) if used else float("nan")
    return stats


# ----------------------------------------------------------------------------------------------------- ablation
@torch.no_grad()
def ablation_predictions(
    model: nn.Module,
    layer: MixtureOfExperts,
    inputs: torch.Tensor,
    forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    batch_size: int = 256,
    experts: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Predicted classes with all experts, and with each expert of ``layer`` masked out of routing in turn.

    The model runs in eval mode without gradients (modes and the layer's mask are restored; no parameter changes).

    Args:
        model: the model containing ``layer``.
        layer: the mixture-of-experts layer to ablate.
        inputs: a batch of model inputs (on the model's device or the CPU; moved in chunks).
        forward: ``forward(model, x) -> logits`` (default ``model(x)``); predictions are ``argmax`` of the last dim.
        batch_size: inputs per forward pass.
        experts: which experts to mask (default all).

    Returns:
        ``(1 + len(experts), ...)`` long predictions: row 0 unablated, row ``1 + j`` with ``experts[j]`` masked.
    """
    if not isinstance(layer, MixtureOfExperts):
        raise TypeError(f"layer must be a MixtureOfExperts, got {type(layer).__name__}")
    if not any(m is layer for m in model.modules()):
        raise ValueError("layer is not a submodule of model")
    experts = list(range(layer.num_experts)) if experts is None else list(experts)
    if layer.num_experts - 1 < layer.k:
        raise ValueError(f"cannot mask an expert of a layer with num_experts={layer.num_experts} and k={layer.k}")
    forward = forward or (lambda m, x: m(x))
    device = next((p.device for p in model.parameters()), inputs.device)

    def predict() -> torch.Tensor:
        preds = []
        for chunk in inputs.split(batch_size):
            out = forward(model, chunk.to(device))
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                raise ValueError("forward must return logits of shape (batch, ..., classes) for the ablation")
            preds.append(out.argmax(dim=-1).cpu())
        return torch.cat(preds)

    rows = []
    with preserve_modes(model, mode=False):
        rows.append(predict())
        for e in experts:
            with layer.masking(layer.masked_experts | {e}):
                rows.append(predict())
    return torch.stack(rows)


@dataclass
class ExpertAblation:
    """Per-class accuracy with every expert, with each expert masked, and the drops.

    Attributes:
        base: ``(C,)`` per-class accuracy unablated (NaN for classes without samples).
        masked: ``(E, C)`` per-class accuracy with expert ``e`` masked.
        drop: ``(E, C)`` ``base - masked``: how much each class relies on each expert.
        overall_drop: ``(E,)`` drop of the overall accuracy.
        support: ``(C,)`` samples per class.
    """

    base: torch.Tensor
    masked: torch.Tensor
    drop: torch.Tensor
    overall_drop: torch.Tensor
    support: torch.Tensor


def ablation_accuracy(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: Optional[int] = None
) -> ExpertAblation:
    """Turn :func:`ablation_predictions` (rows: unablated, then one per masked expert) into per-class accuracies.

    Example:
        >>> preds = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]])  # unablated; expert 0 masked; expert 1 masked
        >>> ablation_accuracy(preds, torch.tensor([0, 1, 1])).drop.tolist()
        [[0.0, 0.5], [1.0, 0.0]]
    """
    predictions = torch.as_tensor(predictions).cpu().long()
    predictions = predictions.reshape(predictions.shape[0], -1)
    targets = torch.as_tensor(targets).cpu().long().reshape(-1)
    if predictions.shape[1] != targets.shape[0]:
        raise ValueError(f"predictions cover {predictions.shape[1]} samples but targets has {targets.shape[0]}")
    valid = targets >= 0
    predictions, targets = predictions[:, valid], targets[valid]
    if num_classes is None:
        num_classes = int(targets.max()) + 1 if targets.numel() else 1
    if targets.numel() and int(targets.max()) >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got "
                         f"{int(targets.max())}")
    support = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.zeros(predictions.shape[0], num_classes, dtype=torch.float64)
    correct.index_add_(1, targets, (predictions == targets).double())
    acc = torch.where(support > 0, correct / support.clamp_min(1), torch.nan)
    overall = correct.sum(1) / max(targets.numel(), 1)
    return ExpertAblation(base=acc[0], masked=acc[1:], drop=acc[0] - acc[1:], overall_drop=overall[0] - overall[1:],
                          support=support.long())


# ------------------------------------------------------------------------------------- routing rows, for monitoring
# What RoutingMonitor logs, computed from the rows it collects during validation (no Lightning): one row per token and
# forward call, so that rows of several processes can be concatenated, de-duplicated by sample and measured.

#: columns of a routing row: sample id, call of the layer within the step, token position within the sample, label
#: (-1: none), then the ``k`` chosen experts and the ``k`` kept flags
ROW_ID, ROW_CALL, ROW_POSITION, ROW_LABEL, ROW_FIXED = 0, 1, 2, 3, 4


def token_labels(labels: torch.Tensor, lead: Sequence[int]) -> torch.Tensor:
    """One integer label per token, ``(N,)``, for a layer whose tokens have the leading shape ``lead``.

    Labels of shape ``lead`` (e.g. ``(B, T)``) are used per token; ``(B,)`` labels are shared by the tokens of each
    sample (a sequence label for ``(B, T, D)`` inputs).

    Raises:
        TypeError: the labels are not integer class indices (e.g. a regression target).
        ValueError: their shape matches neither.

    Example:
        >>> token_labels(torch.tensor([3, 5]), (2, 3)).tolist()
        [3, 3, 3, 5, 5, 5]
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype} (a regression target?)")
    lead = tuple(int(d) for d in lead)
    n = math.prod(lead)
    if tuple(labels.shape) == lead:
        return labels.reshape(-1).long()
    if labels.dim() == 1 and len(lead) >= 1 and labels.shape[0] == lead[0]:
        return labels.long().repeat_interleave(n // max(lead[0], 1))
    raise ValueError(f"labels of shape {tuple(labels.shape)} match neither the tokens {lead} nor their samples")


def routing_rows(
    record: RoutingRecord,
    sample_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    call: int = 0,
) -> torch.Tensor:
    """The routing of one forward call as rows ``(N, 4 + 2k)`` long, on the CPU (columns ``ROW_*``).

    Args:
        record: the layer's :class:`RoutingRecord`.
        sample_ids: ``(B,)`` one id per sample of the batch (-1 when None); a sample's tokens share it.
        labels: ``(N,)`` per-token labels (see :func:`token_labels`; -1 when None).
        call: the call of the layer within the step (a layer applied twice gives calls 0 and 1).

    Example:
        >>> rec = RoutingRecord(experts=torch.tensor([[1], [0]]), gates=torch.ones(2, 1), probs=torch.ones(2, 2) / 2,
        ...                     kept=torch.ones(2, 1).bool())
        >>> routing_rows(rec, sample_ids=torch.tensor([7, 9]), labels=torch.tensor([4, 2])).tolist()
        [[7, 0, 0, 4, 1, 1], [9, 0, 0, 2, 0, 1]]
    """
    lead = record.experts.shape[:-1]
    n, k = record.num_tokens, record.experts.shape[-1]
    batch = lead[0] if len(lead) else 1
    per_sample = n // max(batch, 1)
    ids = torch.full((n,), -1, dtype=torch.long)
    if sample_ids is not None:
        sample_ids = torch.as_tensor(sample_ids).reshape(-1).cpu().long()
        if sample_ids.numel() != batch:
            raise ValueError(f"sample_ids holds {sample_ids.numel()} ids for a batch of {batch} samples")
        ids = sample_ids.repeat_interleave(per_sample)
    label_col = torch.full((n,), -1, dtype=torch.long)
    if labels is not None:
        label_col = torch.as_tensor(labels).reshape(-1).cpu().long()
        if label_col.numel() != n:
            raise ValueError(f"labels holds {label_col.numel()} labels for {n} tokens; see token_labels")
    position = torch.arange(per_sample).repeat(batch)
    return torch.cat([ids[:, None], torch.full((n, 1), int(call)), position[:, None], label_col[:, None],
                      record.experts.reshape(n, k).cpu().long(), record.kept.reshape(n, k).cpu().long()], dim=1)


def routing_row_keys(rows: torch.Tensor) -> torch.Tensor:
    """``(N,)`` one key per (sample id, call, token position): equal keys are the same token of a repeated sample.

    Rows without a sample id (-1) get distinct negative keys (they are never merged).

    Example:
        >>> rows = torch.tensor([[7, 0, 0, 1, 2, 1], [7, 0, 1, 1, 0, 1], [7, 0, 0, 1, 2, 1], [-1, 0, 0, 1, 1, 1]])
        >>> routing_row_keys(rows).tolist()
        [14, 15, 14, -1]
    """
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    calls = int(rows[:, ROW_CALL].max()) + 1
    positions = int(rows[:, ROW_POSITION].max()) + 1
    keys = (rows[:, ROW_ID] * calls + rows[:, ROW_CALL]) * positions + rows[:, ROW_POSITION]
    anonymous = rows[:, ROW_ID] < 0
    keys[anonymous] = -1 - torch.arange(int(anonymous.sum()), device=rows.device)
    return keys


def routing_statistics_from_rows(
    rows: torch.Tensor, num_experts: int, num_classes: Optional[int] = None
) -> RoutingStatistics:
    """:func:`routing_statistics` of routing rows (see :func:`routing_rows`); class metrics when a row has a label.

    Example:
        >>> rows = torch.tensor([[0, 0, 0, 3, 0, 1], [1, 0, 0, 3, 0, 1], [2, 0, 0, 1, 1, 1], [3, 0, 0, 1, 1, 0]])
        >>> s = routing_statistics_from_rows(rows, 2)
        >>> s.nmi, s.drop_rate
        (1.0, 0.25)
    """
    k = (rows.shape[1] - ROW_FIXED) // 2
    labels = rows[:, ROW_LABEL]
    has_labels = bool((labels >= 0).any())
    return routing_statistics(rows[:, ROW_FIXED:ROW_FIXED + k], num_experts, kept=rows[:, ROW_FIXED + k:].bool(),
                              labels=labels if has_labels else None, num_classes=num_classes)


def router_rows(record: RoutingRecord) -> torch.Tensor:
    """Per token, what the balance and z losses are made of: ``(N, 1 + E)`` float32 on the CPU, the squared
    log-sum-exp of the clean router logits, then the router probabilities ``softmax(logits)`` (see
    :func:`routing_losses`). Needs ``record.logits``.

    Example:
        >>> rec = RoutingRecord(torch.tensor([[0]]), torch.ones(1, 1), torch.ones(1, 2) / 2, torch.ones(1, 1).bool(),
        ...                     logits=torch.zeros(1, 2))
        >>> [round(v, 4) for v in router_rows(rec)[0].tolist()]
        [0.4805, 0.5, 0.5]
    """
    if record.logits is None:
        raise ValueError("the routing record has no router logits; record it with a MixtureOfExperts layer")
    logits = record.logits.detach().float().reshape(-1, record.logits.shape[-1])
    z = torch.logsumexp(logits, dim=-1).pow(2)
    return torch.cat([z[:, None], logits.softmax(dim=-1)], dim=1).cpu()


def routing_losses(rows: torch.Tensor, router: torch.Tensor, num_experts: int) -> dict[str, float]:
    """The Switch load-balancing loss and the ST-MoE router z-loss of all the tokens of ``rows`` (see
    :func:`routing_rows`) taken as one batch, from their :func:`router_rows` ``router``: the layer's own
    ``balance_loss`` and ``z_loss`` formulas, so the numbers do not depend on how the tokens were batched or sharded.

    ``balance_loss = E * sum_e f_e * P_e`` (``f_e``: share of the top-k assignments, ``P_e``: mean router probability),
    ``z_loss = mean(logsumexp(logits) ** 2)``.

    Example:
        >>> layer = MixtureOfExperts(4, 4, num_experts=3, k=1).eval()
        >>> with torch.no_grad(), layer.recording():
        ...     _ = layer(torch.randn(16, 4))
        >>> losses = routing_losses(routing_rows(layer.last_routing), router_rows(layer.last_routing), 3)
        >>> abs(losses["balance_loss"] - float(layer.balance_loss)) < 1e-6
        True
        >>> abs(losses["z_loss"] - float(layer.z_loss)) < 1e-5
        True
    """
    if rows.shape[0] != router.shape[0] or router.shape[1] != 1 + num_experts:
        raise ValueError(f"router rows of shape {tuple(router.shape)} do not match {rows.shape[0]} routing rows of "
                         f"{num_experts} experts")
    if rows.shape[0] == 0:
        return {}
    k = (rows.shape[1] - ROW_FIXED) // 2
    router = router.double()
    share = torch.bincount(rows[:, ROW_FIXED:ROW_FIXED + k].reshape(-1), minlength=num_experts).double()
    share = share / share.sum()
    balance = num_experts * float((share * router[:, 1:].mean(0)).sum())
    return {"balance_loss": balance, "z_loss": float(router[:, 0].mean())}


def routing_scalars(stats: RoutingStatistics, losses: Optional[dict[str, float]] = None) -> dict[str, float]:
    """The scalars a monitor logs for one layer: :meth:`RoutingStatistics.scalars` (NaN left out), the ``losses`` of
    :func:`routing_losses`, ``load/expert_<e>`` and ``purity/expert_<e>`` (used experts).

    Example:
        >>> s = routing_statistics(torch.tensor([[0], [0]]), 2, labels=torch.tensor([1, 1]))
        >>> sorted(routing_scalars(s, {"z_loss": 0.5}))[:4]
        ['dead_experts', 'drop_rate', 'load/expert_0', 'load/expert_1']
    """
    scalars = {key: value for key, value in stats.scalars().items() if not math.isnan(value)}
    scalars.update(losses or {})
    for e in range(stats.load.shape[0]):
        scalars[f"load/expert_{e}"] = float(stats.load[e])
        if stats.purity is not None and not torch.isnan(stats.purity[e]):
            scalars[f"purity/expert_{e}"] = float(stats.purity[e])
    return scalars


def pack_ablation_rows(sample_ids: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """One long row per sample, ``[id, targets (W), predictions of each run (R * W)]``, from ``(n,)`` ids, ``(n, ...)``
    targets and :func:`ablation_predictions`' ``(R, n, ...)`` output (``W`` labels per sample), so that the rows of
    several processes can be concatenated; :func:`unpack_ablation_rows` undoes it.

    Example:
        >>> pack_ablation_rows(torch.tensor([5]), torch.tensor([2]), torch.tensor([[2], [0]])).tolist()
        [[5, 2, 2, 0]]
    """
    n = targets.shape[0]
    flat_targets = torch.as_tensor(targets).reshape(n, -1).cpu().long()
    width = flat_targets.shape[1]
    preds = torch.as_tensor(predictions).cpu().long()
    if preds.dim() < 2 or preds.shape[1] != n or preds[0].numel() != n * width:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match labels of shape "
                         f"{tuple(targets.shape)}; the model must return logits with the labels' shape + (classes,)")
    runs = preds.shape[0]
    preds = preds.reshape(runs, n, width).permute(1, 0, 2).reshape(n, runs * width)
    return torch.cat([torch.as_tensor(sample_ids).reshape(n, 1).cpu().long(), flat_targets, preds], dim=1)


def unpack_ablation_rows(rows: torch.Tensor, runs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (n,), targets (n, W), predictions (runs, n, W))`` from :func:`pack_ablation_rows` rows.

    Example:
        >>> ids, y, p = unpack_ablation_rows(torch.tensor([[5, 2, 2, 0]]), runs=2)
        >>> p.tolist()
        [[[2]], [[0]]]
    """
    width = (rows.shape[1] - 1) // (runs + 1)
    if rows.shape[1] != 1 + width * (runs + 1):
        raise ValueError(f"ablation rows of width {rows.shape[1]} do not hold {runs} runs")
    n = rows.shape[0]
    preds = rows[:, 1 + width:].reshape(n, runs, width).permute(1, 0, 2)
    return rows[:, 0], rows[:, 1:1 + width], preds


def routing_summary(stats: RoutingStatistics, ablation: Optional[ExpertAblation] = None,
                    experts: Optional[Sequence[int]] = None) -> str:
    """One line of a layer's headline numbers (``experts``: the expert of each ablation row, default ``0..E-1``).

    Example:
        >>> routing_summary(routing_statistics(torch.tensor([[0], [1]]), 2, labels=torch.tensor([0, 1])))
        'load_cv 0.00, usage_entropy 1.00, max_top1_share 0.50, drop_rate 0.00, nmi 1.00'
    """
    parts = [f"{key} {getattr(stats, key):.2f}" for key in ("load_cv", "usage_entropy", "max_top1_share", "drop_rate")]
    if stats.dead_experts:
        parts.append(f"dead_experts {stats.dead_experts}")
    if stats.nmi is not None:
        parts.append(f"nmi {stats.nmi:.2f}")
    if ablation is not None and ablation.overall_drop.numel():
        j = int(torch.nan_to_num(ablation.overall_drop, nan=float("-inf")).argmax())
        expert = experts[j] if experts is not None else j
        parts.append(f"largest accuracy drop {float(ablation.overall_drop[j]):.3f} (expert {expert} masked)")
    return ", ".join(parts)
