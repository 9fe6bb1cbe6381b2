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
    "routing_statistics",
]

_DISPATCH = ("sorted", "dense")
_DROP_POLICIES = ("order", "gate")


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
    """

    experts: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor
    kept: torch.Tensor

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


def _index_add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out.index_add_(0, index, rows)``; on the CPU through ``index_put_(accumulate=True)``, the same sum, because
    the CPU ``index_add_`` kernel loops over rows and is several times slower for 2-D tensors."""
    if out.device.type == "cpu":
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def _default_expert(in_features: int, hidden: int, out_features: int, activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), activation(), nn.Linear(hidden, out_features))


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
    the global RNG is never drawn during forward). In eval, and with ``noisy_gating=False``, ``H(x) = xW_g`` (plain softmax top-k). The top-k of
    ``H`` are chosen. With ``normalize_gates`` the gates are the router probabilities renormalized over the top-k
    (``softmax`` of the k chosen logits, as in Shazeer et al.); without it they are the full-softmax probabilities of
    the chosen experts (Switch). Default: renormalize when ``k > 1``; for ``k = 1`` keep the raw probability so the
    router still gets a gradient from the task loss.

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
    ``E/k`` times the cost. ``forward(x, dense=True)`` picks the dense path for one call.

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
        balance_loss_weight: weight of ``balance_loss`` in ``aux_loss`` (Switch: 1e-2).
        z_loss_weight: weight of ``z_loss`` in ``aux_loss`` (ST-MoE: 1e-3).
        dispatch: ``"sorted"`` or ``"dense"``.
        record_routing: keep a :class:`RoutingRecord` of every forward in ``last_routing``.
        noise_seed: seed of the private noise generator; ``None`` draws one from the global RNG at construction
            (like the weight initialisation, so ``seed_everything`` makes it reproducible).

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
        balance_loss_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        dispatch: str = "sorted",
        record_routing: bool = False,
        noise_seed: Optional[int] = None,
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
        self.drop_policy = drop_policy
        self.dispatch = dispatch
        self.record_routing = bool(record_routing)

        self.experts = nn.ModuleList(self._build_experts(expert, hidden_features, activation))
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False)
        self.noise = nn.Linear(self.in_features, self.num_experts, bias=False) if self.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # softplus(0) ~ 0.69: exploratory noise at the start (Shazeer et al.)
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
    def forward(self, x: torch.Tensor, dense: Optional[bool] = None) -> torch.Tensor:
        """Route ``x`` (``(B, D)`` or ``(B, T, D)``) to its top-k experts and combine their outputs.

        Args:
            x: inputs whose last dimension is ``in_features``.
            dense: ``True`` for the dense reference path, ``False`` for sorted dispatch; default ``self.dispatch``.
        """
        self._check_input(x)
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        if tokens.shape[0] == 0:
            return self._empty_forward(tokens, lead)
        routing = self._route(tokens)
        use_dense = self.dispatch == "dense" if dense is None else bool(dense)
        out = self._dense(tokens, routing) if use_dense else self._sorted(tokens, routing)
        self._set_outputs(routing, lead)
        return out.reshape(*lead, self.out_features)

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
        top_scores, experts = scores.topk(self.k, dim=-1)
        gates = top_scores.softmax(dim=-1) if self.normalize_gates else probs.gather(-1, experts)
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
        expert_of = routing.experts.reshape(-1)
        gate_of = routing.gates.reshape(-1)
        token_of = torch.arange(n, device=tokens.device).repeat_interleave(self.k)
        if routing.kept is not None:
            keep = routing.kept.reshape(-1)
            expert_of, gate_of, token_of = expert_of[keep], gate_of[keep], token_of[keep]
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
                          tokens.new_zeros(*lead, self.num_experts), empty.bool().reshape(*lead, self.k))
            if self.record_routing else None
        )
        return tokens.new_zeros(*lead, self.out_features)

    # ------------------------------------------------------------------------------------------- state and copies
    def get_extra_state(self) -> dict[str, Any]:
        return {"noise_generator": self._noise_generator.get_state(), "masked_experts": sorted(self._masked)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("noise_generator") is not None:
            self._noise_generator.set_state(state["noise_generator"])
        self.masked_experts = state.get("masked_experts", ())

    def __getstate__(self) -> dict[str, Any]:
        # The per-forward outputs hold graph tensors, which deepcopy and pickle refuse; copies start without them.
        state = self.__dict__.copy()
        for name in ("aux_loss", "balance_loss", "z_loss", "tokens_per_expert", "last_routing"):
            state[name] = None
        return state

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"k={self.k}, noisy_gating={self.noisy_gating}, {cap}, dispatch={self.dispatch!r}")


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
    support = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.zeros(predictions.shape[0], num_classes, dtype=torch.float64)
    correct.index_add_(1, targets, (predictions == targets).double())
    acc = torch.where(support > 0, correct / support.clamp_min(1), torch.nan)
    overall = correct.sum(1) / max(targets.numel(), 1)
    return ExpertAblation(base=acc[0], masked=acc[1:], drop=acc[0] - acc[1:], overall_drop=overall[0] - overall[1:],
                          support=support.long())
