"""Model extraction from predictions and explanations: the query-budget curve, and exact recovery of linear models.

Milli, Schmidt, Dragan & Hardt 2019 ("Model Reconstruction from Model Explanations", FAT*) show that an API that
returns input gradients along with its predictions gives a model away with far fewer queries: a linear model from one
gradient query per class, and a neural network faster than from labels alone. :func:`extraction_curve` measures the
second on your model, :func:`recover_linear_model` performs the first.

**Explanation matching.** The surrogate trained with explanations minimises, over the queried points,
``cross_entropy(s(x), y_target) + explanation_weight * mean((d s_y(x) / dx - e_target(x))^2)``, where ``y_target`` is
the target's predicted label, ``e_target`` the target's explanation of that label's score, and ``d s_y / dx`` the
surrogate's input gradient of the same label's score (taken with ``create_graph=True``, so the surrogate's weights
get the second-order gradient: double backprop). With ``method="gradient_x_input"`` both sides are multiplied by the
input. The target is only queried (forward passes, input gradients), never trained or modified.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution.base import forward_logits
from lightning_lens.attribution.registry import canonical_name, resolve_method
from lightning_lens.evaluation.fragility import _differentiable_maps
from lightning_lens.utils import preserve_modes
from lightning_lens.utils.checks import check_float, check_int, check_tensor

__all__ = ["ExtractionRow", "LinearRecovery", "extraction_curve", "recover_linear_model"]

_MATCHABLE = ("gradient", "gradient_x_input")


@dataclasses.dataclass(frozen=True)
class ExtractionRow:
    """Fidelity (argmax agreement with the target on the evaluation inputs) of the two surrogates of one budget."""

    budget: int
    fidelity_labels: float
    fidelity_explanations: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), preserve_modes(model, mode=False):
        return forward_logits(model, x).argmax(1)


def _train(
    surrogate: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    explanations: Optional[torch.Tensor],
    method: str,
    epochs: int,
    lr: float,
    weight: float,
) -> nn.Module:
    """Full-batch Adam: deterministic for a given initialisation."""
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)
    surrogate.train()
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        if explanations is None:
            loss = F.cross_entropy(surrogate(x), labels)
        else:
            logits, grads = _differentiable_maps(surrogate, x, labels, method)
            loss = F.cross_entropy(logits, labels) + weight * (grads - explanations).pow(2).mean()
        loss.backward()  # the surrogate is ours to train; the target never takes part in this graph
        optimizer.step()
    surrogate.eval()
    return surrogate


def extraction_curve(
    target: nn.Module,
    pool: torch.Tensor,
    make_surrogate: Callable[[], nn.Module],
    budgets: Sequence[int],
    eval_inputs: torch.Tensor,
    method: str = "gradient",
    seed: int = 0,
    epochs: int = 200,
    lr: float = 1e-2,
    explanation_weight: float = 1.0,
) -> list[ExtractionRow]:
    """For each query budget, the fidelity of a surrogate trained on the target's labels alone and of one trained on
    labels plus explanations (see the module docstring).

    For budget ``b`` the first ``b`` points of one seeded permutation of ``pool`` are queried (so budgets are nested);
    ``make_surrogate()`` is called once per budget under a forked RNG seeded with ``seed + b`` and the second surrogate
    is a deep copy of the first, so both start from the same weights (the global RNG is left as it was).

    Args:
        target: the model behind the API, returning ``(batch, classes)`` logits.
        pool: ``(N, ...)`` inputs the attacker may query.
        make_surrogate: builds a fresh, untrained surrogate.
        budgets: numbers of queries, each in ``[1, N]``.
        eval_inputs: inputs on which fidelity (argmax agreement with the target) is measured.
        method: the target's explanation: ``"gradient"`` or ``"gradient_x_input"`` (the ones the surrogate can
            match exactly by double backprop).
        seed: seed of the query subset and of the surrogates' initialisation.
        epochs: full-batch Adam steps per surrogate.
        lr: Adam's learning rate.
        explanation_weight: weight of the explanation-matching term.

    Example:
        >>> target = torch.nn.Linear(4, 3)
        >>> pool = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
        >>> rows = extraction_curve(target, pool, lambda: torch.nn.Linear(4, 3), [5], pool, epochs=50)
        >>> rows[0].budget, 0.0 <= rows[0].fidelity_explanations <= 1.0
        (5, True)
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    if not callable(make_surrogate):
        raise TypeError("make_surrogate must be a callable () -> nn.Module that builds a fresh surrogate")
    x_pool = check_tensor(pool, "pool")
    x_eval = check_tensor(eval_inputs, "eval_inputs")
    if isinstance(budgets, (int, str)) or not isinstance(budgets, Sequence) or not budgets:
        raise TypeError(f"budgets must be a non-empty list of query counts, got {budgets!r}")
    sizes = [check_int(b, "budgets", minimum=1, maximum=len(x_pool)) for b in budgets]
    name = canonical_name(method) if isinstance(method, str) else None
    if name not in _MATCHABLE:
        raise ValueError(
            f"method must be one of {list(_MATCHABLE)} (explanations the surrogate can match by double backprop),"
            f" got {method!r}"
        )
    seed = check_int(seed, "seed")
    epochs = check_int(epochs, "epochs", minimum=1)
    lr = check_float(lr, "lr", minimum=0.0, open_min=True)
    weight = check_float(explanation_weight, "explanation_weight", minimum=0.0)

    order = torch.randperm(len(x_pool), generator=torch.Generator().manual_seed(seed))
    explainer = resolve_method(name, target)
    reference = _predict(target, x_eval)
    rows = []
    for budget in sizes:
        x = x_pool[order[:budget]].detach()
        labels = _predict(target, x)
        explanations = explainer.attribute(x, target=labels).detach()  # the API's answer: no graph to the target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + budget)
            first = make_surrogate()
        if not isinstance(first, nn.Module):
            raise TypeError(f"make_surrogate() must return an nn.Module, got {type(first).__name__}")
        second = copy.deepcopy(first)
        fidelity = []
        for surrogate, expl in ((first, None), (second, explanations)):
            _train(surrogate, x, labels, expl, name, epochs, lr, weight)
            fidelity.append(float((_predict(surrogate, x_eval) == reference).double().mean()))
        rows.append(ExtractionRow(budget, fidelity[0], fidelity[1]))
    return rows


@dataclasses.dataclass(frozen=True)
class LinearRecovery:
    """A linear model recovered from queries: ``logits = weight @ flatten(x) + bias``."""

    weight: torch.Tensor  #: (classes, features)
    bias: torch.Tensor  #: (classes,)
    queries: int  #: gradient queries plus output queries used

    def as_module(self) -> nn.Linear:
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer


def recover_linear_model(
    target: nn.Module, input_shape: Union[int, Sequence[int]], n_classes: int
) -> LinearRecovery:
    """Recover a linear model exactly (Milli et al. 2019): the input gradient of class ``c``'s score is row ``c`` of
    the weight (one gradient query per class, at the zero input), and the output at the zero input is the bias (one
    output query).

    Example:
        >>> target = torch.nn.Linear(3, 2)
        >>> recovered = recover_linear_model(target, 3, 2)
        >>> torch.equal(recovered.weight, target.weight), torch.equal(recovered.bias, target.bias), recovered.queries
        (True, True, 3)
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    shape = tuple(check_int(s, "input_shape", minimum=1) for s in shape)
    n_classes = check_int(n_classes, "n_classes", minimum=1)
    device = next((p.device for p in target.parameters()), torch.device("cpu"))
    zero = torch.zeros((1, *shape), device=device)
    explainer = resolve_method("gradient", target)
    rows = [explainer.attribute(zero, target=c).detach().reshape(-1) for c in range(n_classes)]
    with torch.no_grad(), preserve_modes(target, mode=False):
        bias = forward_logits(target, zero)[0].detach()
    if bias.shape[0] != n_classes:
        raise ValueError(f"the target returns {bias.shape[0]} scores, but n_classes={n_classes}")
    return LinearRecovery(torch.stack(rows), bias, n_classes + 1)
