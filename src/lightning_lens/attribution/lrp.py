"""Layer-wise Relevance Propagation (Bach et al., 2015) with the rules and composites of Montavon et al. (2019).

How relevance is propagated here (the "gradient trick", as Zennit does it): every ``Linear``/``Conv{1,2,3}d`` gets a
forward hook that returns an output with the layer's *value* ``z`` but a modified *gradient*,
``out = sum_k T_k * m_k + (z - sum_k T_k * m_k).detach()``, where ``T_k`` are the rule's modified forward terms (e.g.
the layer run with ``W + gamma W+``) and ``m_k = z / stabilize(denominator)`` are detached multipliers. Then, at every
tensor of the forward pass, *relevance = activation x gradient*: a rule layer turns the relevance ``R_j = z_j g_j`` of
its outputs into ``R_i = x_i sum_j dT_j/dx_i R_j / denominator_j``, the LRP rule, and the input relevance is
``inputs * grad`` (Gradient x Input of the modified backward). Everything else keeps its ordinary gradient, which is
exactly LRP's treatment of it:

* ReLU (module, in-place or functional, or any positively homogeneous activation such as LeakyReLU) passes
  relevance through unchanged: ``z * relu'(z) * g = relu(z) * g``.
* Additions (residual connections) split relevance in proportion to the summands, ``R_a = a g``, ``R_b = b g``;
  average pooling in proportion to the pooled values; max pooling gives it all to the maximum (winner takes all).
* Reshapes, flattening, dropout in eval mode: unchanged.

Other element-wise activations (tanh, sigmoid, GELU) are differentiated as usual, which does not conserve relevance;
convolutions called functionally (``F.conv2d`` without a module) are not hooked and use the plain gradient (LRP-0).
BatchNorm layers in eval mode that follow a convolution or linear layer are folded into it first
(:func:`~lightning_lens.utils.canonize.fold_batchnorm`, on a deep copy made for each call; ``canonize=False`` skips
it and leaves the BatchNorm to the plain gradient, which absorbs its shift like a bias).

References: Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance
Propagation", PLOS ONE 2015 (epsilon and alpha-beta rules); Montavon et al., "Explaining nonlinear classification
decisions with deep Taylor decomposition", Pattern Recognition 2017 (z+ and z^B rules); Montavon et al.,
"Layer-Wise Relevance Propagation: An Overview", 2019 (gamma rule, composites).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution.base import (
    Attribution,
    OutputFn,
    Target,
    forward_logits,
    run_forward,
    target_scores,
)
from lightning_lens.utils import grad_ready, resolve_target
from lightning_lens.utils.canonize import fold_batchnorm, has_foldable_batchnorm
from lightning_lens.utils.checks import check_bool, check_choice, check_float

__all__ = ["COMPOSITES", "LRP", "RULES"]

#: the rules by name (see :class:`LRP`).
RULES = ("epsilon", "zplus", "gamma", "alpha_beta", "zbox")
#: the named composites: which rule each kind of layer gets (Montavon et al. 2019, Sec. 10.2; Kohlbrenner et al. 2020).
COMPOSITES = {
    "epsilon_gamma_box": "first layer zbox, other convolutions gamma, linear layers epsilon",
    "epsilon_plus": "convolutions zplus, linear layers epsilon",
    "epsilon_plus_box": "first layer zbox, other convolutions zplus, linear layers epsilon",
    "epsilon_alpha2_beta1": "convolutions alpha_beta (alpha=2, beta=1), linear layers epsilon",
}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: the denominator stabilizer of the rules other than epsilon (Captum's value), keeping 0/0 finite.
_STABILIZER = 1e-9
Bound = Union[float, torch.Tensor]
RuleSpec = Union[str, tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class _Rule:
    kind: str
    epsilon: float = 1e-6
    gamma: float = 0.25
    alpha: float = 1.0
    beta: float = 0.0
    low: Bound = 0.0
    high: Bound = 1.0


def _stabilize(den: torch.Tensor, eps: float) -> torch.Tensor:
    return den + torch.where(den >= 0, eps, -eps)


def _ratio(z: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """``z / stabilize(den)``; with ``eps = 0``, 0 where ``den`` is 0."""
    if eps > 0:
        return z / _stabilize(den, eps)
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(z), z / safe)


class _Rewired(torch.autograd.Function):
    """Forward: ``value`` (the layer's own output). Backward: the gradient ``g`` reaches each modified term ``T_k`` as
    ``g * m_k``. The same as ``sum_k T_k m_k + (value - sum_k T_k m_k).detach()`` in two ops instead of many."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:  # terms: T_1, m_1, T_2, m_2 ...
        ctx.save_for_backward(*terms[1::2])
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        out: list[Optional[torch.Tensor]] = [None]
        for m in ctx.saved_tensors:
            out += [grad * m, None]
        return tuple(out)


def _layer_function(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
    if isinstance(module, nn.Linear):
        return F.linear
    return module._conv_forward  # type: ignore[union-attr,no-any-return]  # keeps the module's padding mode


def _check_bound(value: Any, argument: str) -> Bound:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"{argument} must be a float or a tensor broadcastable to the inputs, got {type(value).__name__}"
        )
    return value if isinstance(value, torch.Tensor) else float(value)


class _Propagation:
    """The forward hook of every rule layer during one LRP pass (see the module docstring)."""

    def __init__(
        self,
        rule_for: Callable[[str, nn.Module, bool], _Rule],
        names: dict[int, str],
        model_input: torch.Tensor,
        negate: Optional[str] = None,
    ) -> None:
        self.rule_for, self.names, self.model_input, self.negate = rule_for, names, model_input, negate
        self.bounds: list[tuple[torch.Tensor, torch.Tensor]] = []  # z^B's (low, high) leaves, model-input shaped
        self.outputs: list[tuple[str, torch.Tensor]] = []  # (layer name, returned output), in execution order

    def _is_model_input(self, x: torch.Tensor) -> bool:
        ref = self.model_input
        if x is ref:
            return True
        return x._base is ref and x.numel() == ref.numel() and x.is_contiguous() and ref.is_contiguous()

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        x = inputs[0]
        name = self.names.get(id(module), "")
        rule = self.rule_for(name, module, not self.outputs)
        weight = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else None
        z_full = output
        if self.negate is not None and name == self.negate:  # Excitation Backprop's dual unit: negated weights
            weight, bias, z_full = -weight, (None if bias is None else -bias), -output
        z = z_full.detach()
        f = _layer_function(module)
        if rule.kind == "epsilon":
            if rule.epsilon == 0:  # LRP-0: the plain gradient
                self.outputs.append((name, z_full))
                return None if z_full is output else z_full
            terms = [(z_full, _ratio(z, z, rule.epsilon))]
        elif rule.kind == "gamma":
            t = f(x, weight + rule.gamma * weight.clamp(min=0),
                  None if bias is None else bias + rule.gamma * bias.clamp(min=0))
            terms = [(t, _ratio(z, t.detach(), _STABILIZER))]
        elif rule.kind in ("zplus", "alpha_beta"):
            # contributions x_i w_ij split by sign: (x w)+ = x+ w+ + x- w-, (x w)- = x+ w- + x- w+
            # after a ReLU x >= 0 and the x- terms vanish: skip their convolutions (half the cost)
            signed = bool((x < 0).any())
            xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
            with_bias = rule.kind == "alpha_beta" and bias is not None
            tp = f(xp, wp, bias.clamp(min=0) if with_bias else None)
            if signed:
                tp = tp + f(xn, wn, None)
            terms = [(tp, rule.alpha * _ratio(z, tp.detach(), _STABILIZER))]
            if rule.beta:
                tn = f(xp, wn, bias.clamp(max=0) if with_bias else None)
                if signed:
                    tn = tn + f(xn, wp, None)
                terms.append((tn, -rule.beta * _ratio(z, tn.detach(), _STABILIZER)))
        else:  # zbox: z_ij = x_i w_ij - l_i w_ij+ - h_i w_ij-
            if not self._is_model_input(x):
                raise ValueError(
                    f"the zbox rule applies only to a layer that takes the model's input (or a flattened view of it),"
                    f" but layer {name!r} takes another tensor; give it another rule (composite={{{name!r}: ...}})"
                )
            low, high = (self._bound(b, which) for b, which in ((rule.low, "low"), (rule.high, "high")))
            self.bounds.append((low, high))
            t = f(x, weight, None) - f(low.reshape(x.shape), weight.clamp(min=0), None) \
                - f(high.reshape(x.shape), weight.clamp(max=0), None)
            terms = [(t, _ratio(z, t.detach(), _STABILIZER))]
        out = _Rewired.apply(z, *[tensor for pair in terms for tensor in pair])
        self.outputs.append((name, out))
        return out

    def _bound(self, value: Bound, which: str) -> torch.Tensor:
        ref = self.model_input
        try:
            full = torch.broadcast_to(torch.as_tensor(value, dtype=ref.dtype, device=ref.device), ref.shape)
        except RuntimeError:
            raise ValueError(
                f"{which} of shape {tuple(torch.as_tensor(value).shape)} does not broadcast to the inputs' shape"
                f" {tuple(ref.shape)}; pass a float or a tensor such as a per-channel (C, 1, 1) bound"
            ) from None
        return full.detach().clone().requires_grad_(True)


def prepare_model(model: nn.Module, inputs: torch.Tensor, canonize: bool) -> nn.Module:
    """The model LRP hooks: a deep copy with BatchNorms folded when ``canonize`` and there is one to fold."""
    if canonize and has_foldable_batchnorm(model):
        with torch.no_grad():
            return fold_batchnorm(model, inputs, run_forward)[0]
    return model


def propagate(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    rule_for: Callable[[str, nn.Module, bool], _Rule],
    *,
    unit_top: bool = False,
    negate: Optional[str] = None,
    output_fn: Optional[OutputFn] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[str]]:
    """One LRP pass: ``(relevance, resolved_target, logits, top)``, ``top`` the name of the rule layer whose output
    is the model's output (``None`` when the logits come out of another operation).

    The relevance of the explained logit is the logit itself, or 1 with ``unit_top`` (Excitation Backprop's
    probability). ``negate`` names a layer run with negated weights (the contrastive dual unit). ``output_fn`` maps
    the model's output to scores (:func:`~lightning_lens.attribution.base.model_scores`).
    """
    leaf = grad_ready(inputs)
    model_input = leaf.clone()  # the model may modify its input in place
    names = {id(m): n for n, m in model.named_modules()}
    hook = _Propagation(rule_for, names, model_input, negate)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    try:
        logits = forward_logits(model, model_input, output_fn)
    finally:
        for handle in handles:
            handle.remove()
    if not hook.outputs:
        warnings.warn(
            "the model's forward executed no nn.Linear or nn.Conv layer, so no LRP rule applied and the map is"
            " Gradient x Input", stacklevel=3,
        )
    resolved = resolve_target(target, logits)
    score = target_scores(logits, resolved)
    if unit_top:
        score = score / _stabilize(score.detach(), _STABILIZER)
    leaves = [leaf] + [t for pair in hook.bounds for t in pair]
    if not score.requires_grad:
        raise RuntimeError(
            "the model's output does not depend on its input through autograd: does its forward run under"
            " torch.no_grad(), detach the input, or convert it to numpy?"
        )
    grads = torch.autograd.grad(score.sum(), leaves, allow_unused=True)
    relevance = leaf.detach() * (grads[0] if grads[0] is not None else torch.zeros_like(leaf))
    for t, g in zip(leaves[1:], grads[1:]):
        if g is not None:
            relevance = relevance + t.detach() * g
    top = next((name for name, out in hook.outputs if out is logits), None)
    return relevance, resolved, logits.detach(), top


def _make_rule(spec: Any, base: _Rule, argument: str) -> _Rule:
    """A rule from a name or a ``(name, {option: value})`` pair, with ``base``'s options as defaults."""
    options: Mapping[str, Any] = {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
        spec, options = spec
    if not isinstance(spec, str):
        raise TypeError(
            f"{argument} must be a rule name {list(RULES)} or a (name, {{option: value}}) pair, got {spec!r}"
        )
    kind = check_choice(spec, argument, RULES)
    allowed = {"epsilon", "gamma", "alpha", "beta", "low", "high"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{argument}: unknown rule option(s) {unknown}; rules take {sorted(allowed)}")
    return _checked(replace(base, kind=kind, **dict(options)), argument)


def _checked(rule: _Rule, argument: str) -> _Rule:
    check_float(rule.epsilon, f"{argument}: epsilon", minimum=0.0)
    check_float(rule.gamma, f"{argument}: gamma", minimum=0.0)
    check_float(rule.alpha, f"{argument}: alpha", minimum=0.0)
    check_float(rule.beta, f"{argument}: beta", minimum=0.0)
    if abs(rule.alpha - rule.beta - 1.0) > 1e-9:
        raise ValueError(
            f"{argument}: the alpha-beta rule needs alpha - beta = 1 (relevance conservation), got alpha={rule.alpha},"
            f" beta={rule.beta}; e.g. alpha=2, beta=1"
        )
    _check_bound(rule.low, f"{argument}: low")
    _check_bound(rule.high, f"{argument}: high")
    if isinstance(rule.low, float) and isinstance(rule.high, float) and not rule.low < rule.high:
        raise ValueError(f"{argument}: low must be below high (the input range of zbox), got {rule.low}, {rule.high}")
    return rule


class LRP(Attribution):
    """Layer-wise Relevance Propagation: the target logit redistributed layer by layer onto the input features.

    Rules (for a layer with inputs ``x_i``, weights ``w_ij``, outputs ``z_j`` with relevance ``R_j``; every rule
    gives ``R_i = sum_j q_ij / sum_i' q_i'j * R_j``):

    * ``"epsilon"``: ``q_ij = x_i w_ij`` with the denominator ``z_j + epsilon * sign(z_j)`` (bias included;
      ``epsilon=0`` is LRP-0, which equals Gradient x Input).
    * ``"zplus"``: only positive contributions, ``q_ij = (x_i w_ij)+`` (``x_i w_ij+`` for non-negative inputs), no
      bias (the z+ rule; alpha-beta with alpha=1, beta=0 and no bias).
    * ``"gamma"``: ``q_ij = x_i (w_ij + gamma w_ij+)``, denominator with the bias ``b_j + gamma b_j+``.
    * ``"alpha_beta"``: ``alpha (x_i w_ij)+ / (sum_i (x_i w_ij)+ + b_j+) - beta (x_i w_ij)- / (sum_i (x_i w_ij)- +
      b_j-)``, with ``alpha - beta = 1``.
    * ``"zbox"`` (z^B, for the first layer on bounded inputs ``low <= x <= high``): ``q_ij = x_i w_ij - low_i w_ij+ -
      high_i w_ij-``.

    Non-epsilon rules stabilize their denominators with ``1e-9``. See the module docstring for how ReLUs, pooling,
    residual additions and BatchNorm are handled.

    Args:
        model: the classifier; never modified (BatchNorm is folded on a deep copy).
        rule: the rule of every ``Linear``/``Conv`` layer that ``composite`` does not assign.
        epsilon, gamma, alpha, beta: the rules' parameters.
        low, high: the input bounds of ``zbox`` (floats or tensors broadcastable to the inputs, e.g. per channel).
        composite: ``None``; a named composite, one of :data:`COMPOSITES` (``"epsilon_gamma_box"``: the first layer
            zbox, other convolutions gamma, linear layers epsilon); or a mapping ``{key: rule}`` whose keys are module
            names (``"features.0"``), layer types (``nn.Conv2d``) or type names (``"Conv2d"``), and whose rules are
            names or ``(name, {option: value})`` pairs. Names take precedence over types.
        canonize: fold eval-mode BatchNorms into the preceding convolution or linear layer first.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see
            :func:`~lightning_lens.attribution.base.model_scores`); the explained score's relevance is propagated.
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> x = torch.rand(2, 3)
        >>> r = LRP(net, rule="epsilon", epsilon=0.0).attribute(x, target=0)
        >>> torch.allclose(r.sum(dim=1), net(x)[:, 0], atol=1e-6)  # conservation
        True
    """

    name = "lrp"

    def __init__(
        self,
        model: nn.Module,
        rule: RuleSpec = "epsilon",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        alpha: float = 1.0,
        beta: float = 0.0,
        low: Bound = 0.0,
        high: Bound = 1.0,
        composite: Union[None, str, Mapping[Any, RuleSpec]] = None,
        canonize: bool = True,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
        base = _checked(_Rule("epsilon", float(check_float(epsilon, "epsilon", minimum=0.0)),
                              float(check_float(gamma, "gamma", minimum=0.0)),
                              float(check_float(alpha, "alpha", minimum=0.0)),
                              float(check_float(beta, "beta", minimum=0.0)),
                              _check_bound(low, "low"), _check_bound(high, "high")), "LRP")
        self.default_rule = _make_rule(rule, base, "rule")
        self.canonize = check_bool(canonize, "canonize")
        self.composite = composite
        self._first: Optional[_Rule] = None
        self._by_name: dict[str, _Rule] = {}
        self._by_type: list[tuple[Union[type, str], _Rule]] = []
        if composite is None:
            pass
        elif isinstance(composite, str):
            check_choice(composite, "composite", tuple(COMPOSITES))
            epsilon_rule = replace(base, kind="epsilon")
            conv_rule = {
                "epsilon_gamma_box": replace(base, kind="gamma"),
                "epsilon_plus": replace(base, kind="zplus"),
                "epsilon_plus_box": replace(base, kind="zplus"),
                "epsilon_alpha2_beta1": _checked(replace(base, kind="alpha_beta", alpha=2.0, beta=1.0), "composite"),
            }[composite]
            self._by_type = [(nn.Linear, epsilon_rule)] + [(c, conv_rule) for c in _CONVS]
            if composite.endswith("_box"):
                self._first = replace(base, kind="zbox")
        elif isinstance(composite, Mapping):
            modules = dict(model.named_modules())
            type_names = {type(m).__name__ for m in model.modules()} | {c.__name__ for c in _LAYERS}
            for key, spec in composite.items():
                rule_ = _make_rule(spec, base, f"composite[{key!r}]")
                if isinstance(key, type) and issubclass(key, nn.Module):
                    self._by_type.append((key, rule_))
                elif isinstance(key, str) and key in modules:
                    self._by_name[key] = rule_
                elif isinstance(key, str) and key in type_names:
                    self._by_type.append((key, rule_))
                else:
                    names = [n for n in modules if n][:12]
                    raise ValueError(
                        f"composite key {key!r} is neither a module name of the model ({names}...) nor a layer type"
                        " (nn.Conv2d or 'Conv2d')"
                    )
        else:
            raise TypeError(
                f"composite must be None, a composite name {list(COMPOSITES)} or a mapping {{layer: rule}}, got"
                f" {type(composite).__name__}"
            )

    def rule_for(self, name: str, module: nn.Module, first: bool) -> _Rule:
        """The rule of the layer ``name`` (``first``: the first rule layer the forward executes)."""
        if name in self._by_name:
            return self._by_name[name]
        if first and self._first is not None:
            return self._first
        for key, rule in self._by_type:
            by_type_name = isinstance(key, str) and type(module).__name__ == key
            if by_type_name or (isinstance(key, type) and isinstance(module, key)):
                return rule
        return self.default_rule

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        work = prepare_model(self.model, inputs, self.canonize)
        return propagate(work, inputs, target, self.rule_for, output_fn=self.output_fn)[0]
