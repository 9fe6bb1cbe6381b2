"""Concept bottleneck models with test-time interventions (Koh et al. 2020, "Concept Bottleneck Models", ICML).

``x -> concept_encoder -> concept logits -> bottleneck -> task_head -> task logits``: the task is predicted from the
concepts only, so a person can read the concepts and correct them ("intervene") at test time.

Bottlenecks (what the head sees):

- ``"soft"``: concept probabilities ``sigmoid(logits)`` (Koh et al.'s sigmoid variant). Interventions set 0/1.
- ``"logit"``: the raw logits. Setting a logit to "1" would be a weak, often wrong value, so an intervention uses
  per-concept *off* / *on* logits calibrated on training data: by default the median training logit on each side of
  the decision boundary (``intervention_calibration="state_median"``), and it only ever moves a logit towards the
  true state: an "on" concept becomes ``max(logit, on)``, an "off" one ``min(logit, off)``
  (``intervention_rule="clamp"``). Koh et al.'s ``tti.py`` instead *replaces* the logit by the 5th (off) / 95th (on)
  percentile of all training logits (``intervention_calibration="percentile", intervention_rule="replace"``). A
  jointly trained head reads concept magnitudes, and those tail values can lie outside the range it has learned to
  use: on the seven-segment digits (20 epochs, joint) task accuracy was 0.96-0.98, but 0.70-0.90 with every concept
  set to its true value (lightning-lens issue 18); with the defaults it is 0.98-1.00. The values come from
  :meth:`ConceptBottleneckModel.calibrate_intervention_values` (an exact pass over a loader) or, until then, from a
  ring buffer of the most recent training-mode logits the model keeps itself.
- ``"hard"``: 0/1 concepts, ``logit >= 0`` (probability >= 0.5). By default the gradient is straight-through (the
  backward pass uses the soft probability's gradient) so that joint training still reaches the encoder; with
  ``hard_gradient="none"`` the task loss does not reach the encoder through the bottleneck at all.

Nothing here imports Lightning; ``ConceptBottleneckModule`` (:mod:`lightning_lens.lightning_modules`) trains the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from lightning_lens.utils import BatchAccessor, gradients_enabled, preserve_modes
from lightning_lens.utils.checks import check_choice, check_float, check_int

__all__ = [
    "ConceptBottleneckModel",
    "ConceptBottleneckOutput",
    "ConceptEvaluation",
    "CurveDrop",
    "Intervention",
    "check_policies",
    "concept_accuracy_auroc",
    "concept_leakage",
    "concept_pos_weight",
    "describe_falling_curve",
    "evaluate_concepts",
    "falling_intervention_curves",
    "intervention_curve",
    "intervention_curve_drop",
    "intervention_curve_figure",
    "intervention_mask",
    "intervention_order",
    "intervention_steps",
    "leakage_probe",
    "logit_intervention_values",
    "policy_name",
    "split_concept_batch",
    "task_predictions",
    "task_targets",
]

Intervention = Union[None, str, int, Sequence[int], torch.Tensor]
_BOTTLENECKS = ("soft", "logit", "hard")
_HARD_GRADIENTS = ("straight_through", "none")
_CALIBRATIONS = ("state_median", "percentile")
_RULES = ("clamp", "replace")
_CONCEPT_KEYS = ("concepts", "concept", "c", "attributes")


class ConceptBottleneckOutput(NamedTuple):
    """What :meth:`ConceptBottleneckModel.forward` returns.

    Attributes:
        concept_logits: (B, C) raw encoder outputs (before any intervention).
        concept_probs: (B, C) ``sigmoid(concept_logits)``: the model's own concept predictions.
        bottleneck: (B, C) the values the task head received (after the bottleneck and any intervention).
        task_logits: (B, K) task head outputs.
        intervened: (B, C) bool mask of the concepts that were replaced, or None without intervention.
    """

    concept_logits: torch.Tensor
    concept_probs: torch.Tensor
    bottleneck: torch.Tensor
    task_logits: torch.Tensor
    intervened: Optional[torch.Tensor] = None


def intervention_mask(
    intervene: Intervention, batch_size: int, num_concepts: int, device: Union[torch.device, str, None] = None
) -> Optional[torch.Tensor]:
    """A (B, C) bool mask of the concepts to replace, from any accepted ``intervene`` form.

    Args:
        intervene: ``None`` (nothing); ``"all"``; an int or a list / 1-D integer tensor of concept indices (the same
            for every example); a bool tensor (or list of bools) ``(C,)`` (same for every example) or ``(B, C)`` (per
            example); or a 2-D integer tensor ``(B, k)`` of per-example indices.
        batch_size: B.
        num_concepts: C.
        device: where the mask lives.

    Example:
        >>> intervention_mask([0, 2], batch_size=2, num_concepts=3).int().tolist()
        [[1, 0, 1], [1, 0, 1]]
        >>> intervention_mask(torch.tensor([[1], [2]]), 2, 3).int().tolist()
        [[0, 1, 0], [0, 0, 1]]
    """
    if intervene is None:
        return None
    full = (batch_size, num_concepts)
    if isinstance(intervene, str):
        if intervene != "all":
            raise ValueError(f"intervene must be 'all', indices or a bool mask, got the string {intervene!r}")
        return torch.ones(full, dtype=torch.bool, device=device)
    if isinstance(intervene, bool):
        raise TypeError("intervene must be concept indices, a bool mask tensor or 'all', got a bool")
    if isinstance(intervene, int):
        intervene = [intervene]
    if isinstance(intervene, torch.Tensor):
        t = intervene
    else:  # keep the dtype: a list (or array) of bools is a mask, not the indices 0/1
        arr = np.asarray(intervene)
        t = torch.zeros(0, dtype=torch.long) if arr.size == 0 else torch.as_tensor(arr)
    t = t.to(device)
    if t.dtype == torch.bool:
        if t.shape == (num_concepts,):
            return t.unsqueeze(0).expand(full).clone()
        if t.shape == full:
            return t.clone()
        raise ValueError(
            f"a bool intervene mask must have shape (num_concepts,) = ({num_concepts},) or (batch, num_concepts) = "
            f"{full}, got {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"intervene must hold integer indices or bools, got dtype {t.dtype}; use mask.bool() for masks")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_concepts):
        raise ValueError(f"intervene indices must lie in [0, {num_concepts - 1}], got {t.tolist()}")
    mask = torch.zeros(full, dtype=torch.bool, device=device)
    if t.dim() == 1:
        mask[:, t] = True
    elif t.dim() == 2 and t.shape[0] == batch_size:
        mask.scatter_(1, t, True)
    else:
        raise ValueError(
            f"integer intervene must be 1-D (concept indices for every example) or (batch, k) = ({batch_size}, k) "
            f"per-example indices, got shape {tuple(t.shape)}"
        )
    return mask


def task_predictions(task_logits: torch.Tensor) -> torch.Tensor:
    """Predicted labels: argmax for (B, K>1) logits, ``logit >= 0`` for a single binary logit (B, 1) or (B,)."""
    if task_logits.dim() == 2 and task_logits.shape[1] > 1:
        return task_logits.argmax(dim=1)
    return (task_logits.reshape(task_logits.shape[0]) >= 0).long()


def task_targets(targets: torch.Tensor, task_logits: torch.Tensor) -> torch.Tensor:
    """Targets ``(B,)`` or ``(B, 1)`` (ints, or 0/1 floats for a binary task) as ``(B,)`` long class indices."""
    n = task_logits.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"targets hold {targets.shape[0]} labels for a batch of {n}")
    return targets.reshape(n).round().long() if targets.is_floating_point() else targets.reshape(n).long()


def concept_pos_weight(concepts: torch.Tensor, max_weight: float = 100.0) -> torch.Tensor:
    """Per-concept ``pos_weight`` for the concept BCE: negatives / positives over a (N, C) 0/1 training matrix.

    Koh et al.'s ``-weighted_loss`` (imbalance ratio per attribute). Clipped to ``[1 / max_weight, max_weight]``
    so a concept that is never (or always) on does not produce an infinite weight.

    Example:
        >>> concept_pos_weight(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])).tolist()
        [3.0, 1.0]
    """
    c = torch.as_tensor(concepts, dtype=torch.float32)
    if c.dim() != 2:
        raise ValueError(f"concepts must be a (num_samples, num_concepts) matrix, got shape {tuple(c.shape)}")
    pos = c.sum(0)
    neg = c.shape[0] - pos
    return (neg / pos.clamp_min(1e-12)).clamp(1.0 / max_weight, max_weight)


def split_concept_batch(
    batch: Any,
    input_key: Union[int, str, None] = None,
    concept_key: Union[int, str, None] = None,
    target_key: Union[int, str, None] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(inputs, concepts, targets)`` of a concept batch.

    Defaults: tuple/list batches are ``(x, concepts, y)`` (torch_explain's order) or ``(x, concepts)``; dict batches
    use ``image``/``x``/... for inputs, ``concepts``/``concept``/``c``/``attributes`` for concepts and
    ``label``/``y``/... for targets. A missing concept or target entry gives None.
    """
    is_seq = isinstance(batch, (tuple, list))
    accessor = BatchAccessor(
        input_key=input_key if input_key is not None else (0 if is_seq else None),
        target_key=target_key if target_key is not None else (2 if is_seq and len(batch) > 2 else None),
    )
    x = accessor.inputs(batch)
    y = accessor.targets(batch) if (target_key is not None or not is_seq or len(batch) > 2) else None
    if concept_key is not None:
        try:
            c = batch[concept_key]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(f"concept_key={concept_key!r} does not select anything in the batch") from err
    elif is_seq:
        c = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, dict):
        key = next((k for k in _CONCEPT_KEYS if k in batch), None)
        c = batch[key] if key is not None else None
    else:
        c = None
    return x, (None if c is None else torch.as_tensor(c)), y


class ConceptBottleneckModel(nn.Module):
    """A concept bottleneck model (Koh et al. 2020): ``x -> concepts -> task``, with test-time interventions.

    Args:
        concept_encoder: module mapping inputs to ``(B, num_concepts)`` concept logits.
        num_concepts: C.
        task_head: module mapping ``(B, C)`` bottleneck values to ``(B, K)`` task logits. Default: ``nn.Linear(C, K)``
            (needs ``num_classes``), whose weights read directly as per-concept contributions.
        num_classes: K (1 = a binary task with one logit). Required without ``task_head``; checked against its output
            otherwise.
        bottleneck: ``"soft"`` (probabilities), ``"logit"`` or ``"hard"`` (0/1; see the module docstring).
        hard_gradient: for ``"hard"``: ``"straight_through"`` (default) or ``"none"`` (no task gradient reaches the
            encoder through the bottleneck).
        concept_names: names for logs (default ``c0``, ``c1``, ...).
        intervention_values: for ``"logit"``: fixed ``(off, on)`` values (floats or (C,) tensors), e.g. ``(-5, 5)``
            as in CEM. Default: calibrated on training logits (see ``intervention_calibration``).
        intervention_quantiles: for ``intervention_calibration="percentile"``: the quantiles of training logits used
            as ``(off, on)`` values (default ``(0.05, 0.95)``, Koh et al.).
        logit_buffer_size: how many recent training-mode logit rows the ``"logit"`` model keeps for the running
            calibration (a fixed-size ring buffer, saved in the state dict).
        intervention_calibration: for ``"logit"``: how ``(off, on)`` come from training logits. ``"state_median"``
            (default): per concept, the median of the logits below 0 (off) and of those at or above 0 (on): the
            typical logit of an example the encoder puts off / on, inside the range the head works in (a side with
            no logits mirrors the other). ``"percentile"``: the ``intervention_quantiles`` of all logits (Koh et al.).
        intervention_rule: for ``"logit"``: ``"clamp"`` (default): a concept set to 1 becomes ``max(logit, on)``,
            to 0 ``min(logit, off)``, so an intervention never makes the model less sure of the true state than it
            was; ``"replace"``: the value is ``off + v * (on - off)`` whatever the model predicted (Koh et al.).
            Fractional states ``v`` are always interpolated.

    Example:
        >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
        >>> cbm = ConceptBottleneckModel(enc, num_concepts=7, num_classes=10)
        >>> out = cbm(torch.rand(2, 1, 8, 8), intervene=[0, 3], concept_values=torch.ones(2, 7))
        >>> out.bottleneck[:, [0, 3]].tolist(), tuple(out.task_logits.shape)
        ([[1.0, 1.0], [1.0, 1.0]], (2, 10))
    """

    def __init__(
        self,
        concept_encoder: nn.Module,
        num_concepts: int,
        task_head: Optional[nn.Module] = None,
        num_classes: Optional[int] = None,
        bottleneck: str = "soft",
        hard_gradient: str = "straight_through",
        concept_names: Optional[Sequence[str]] = None,
        intervention_values: Optional[tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]] = None,
        intervention_quantiles: tuple[float, float] = (0.05, 0.95),
        logit_buffer_size: int = 4096,
        intervention_calibration: str = "state_median",
        intervention_rule: str = "clamp",
    ) -> None:
        super().__init__()
        if not isinstance(concept_encoder, nn.Module):
            raise TypeError(f"concept_encoder must be an nn.Module, got {type(concept_encoder).__name__}")
        check_int(num_concepts, "num_concepts", minimum=1)
        check_choice(bottleneck, "bottleneck", _BOTTLENECKS)
        check_choice(hard_gradient, "hard_gradient", _HARD_GRADIENTS)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int (1 for a binary task), got {num_classes!r}")
        if task_head is None:
            if num_classes is None:
                raise ValueError("pass num_classes (the default task head is nn.Linear(num_concepts, num_classes)) "
                                 "or your own task_head")
            task_head = nn.Linear(num_concepts, num_classes)
        elif not isinstance(task_head, nn.Module):
            raise TypeError(f"task_head must be an nn.Module or None, got {type(task_head).__name__}")
        if concept_names is not None and len(concept_names) != num_concepts:
            raise ValueError(f"concept_names has {len(concept_names)} names for num_concepts={num_concepts}")
        lo_q, hi_q = (float(q) for q in intervention_quantiles)
        if not 0.0 <= lo_q < hi_q <= 1.0:
            raise ValueError(f"intervention_quantiles must be (low, high) with 0 <= low < high <= 1, got "
                             f"{intervention_quantiles}")
        if intervention_values is not None and bottleneck != "logit":
            raise ValueError("intervention_values only applies to bottleneck='logit'; probability bottlenecks use 0/1")
        check_int(logit_buffer_size, "logit_buffer_size", minimum=2)
        check_choice(intervention_calibration, "intervention_calibration", _CALIBRATIONS)
        check_choice(intervention_rule, "intervention_rule", _RULES)

        self.concept_encoder = concept_encoder
        self.task_head = task_head
        self.num_concepts = num_concepts
        self.num_classes = num_classes
        self.bottleneck_kind = bottleneck
        self.hard_gradient = hard_gradient
        self.concept_names = list(concept_names) if concept_names is not None else [f"c{i}" for i in
                                                                                     range(num_concepts)]
        self.intervention_quantiles = (lo_q, hi_q)
        self.intervention_calibration = intervention_calibration
        self.intervention_rule = intervention_rule
        if bottleneck == "logit":
            self.register_buffer("logit_buffer", torch.zeros(logit_buffer_size, num_concepts))
            self.register_buffer("logit_buffer_count", torch.zeros((), dtype=torch.long))
            self.register_buffer("calibrated_values", torch.full((2, num_concepts), float("nan")))
            if intervention_values is not None:
                self._set_calibrated(*intervention_values)

    # ----------------------------------------------------------------------------------------------------- parts
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Concept logits ``(B, C)`` of inputs ``x``."""
        logits = self.concept_encoder(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_concepts:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"concept_encoder must return (batch, num_concepts) = (B, {self.num_concepts}) concept logits, got "
                f"{shape}; end the encoder with nn.Linear(..., {self.num_concepts}) or fix num_concepts"
            )
        return logits

    def predict_task(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Task logits ``(B, K)`` from bottleneck values ``(B, C)`` (the head alone)."""
        if bottleneck.dim() != 2 or bottleneck.shape[1] != self.num_concepts:
            raise ValueError(
                f"bottleneck values must have shape (B, {self.num_concepts}), got {tuple(bottleneck.shape)}"
            )
        out = self.task_head(bottleneck)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != bottleneck.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"task_head must return (batch, num_classes) logits, got {shape}")
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise ValueError(f"task_head returns {out.shape[1]} logits per example but num_classes={self.num_classes}")
        return out

    def bottleneck_values(
        self,
        concept_logits: torch.Tensor,
        intervene: Intervention = None,
        concept_values: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The head's input from concept logits, with interventions applied: ``(values (B, C), mask or None)``.

        In training mode a ``"logit"`` model also records ``concept_logits`` for its running intervention values.
        """
        if self.bottleneck_kind == "logit" and self.training:
            self._record_logits(concept_logits)
        if self.bottleneck_kind == "soft":
            values = torch.sigmoid(concept_logits)
        elif self.bottleneck_kind == "logit":
            values = concept_logits
        else:
            hard = (concept_logits >= 0).to(concept_logits.dtype)
            if self.hard_gradient == "straight_through":
                soft = torch.sigmoid(concept_logits)
                values = hard + soft - soft.detach()
            else:
                values = hard
        mask = intervention_mask(intervene, concept_logits.shape[0], self.num_concepts, concept_logits.device)
        if mask is None:
            if concept_values is not None:
                raise ValueError("concept_values were given without intervene: pass intervene=<indices | mask | 'all'> "
                                 "to choose which concepts to replace")
            return values, None
        if concept_values is None:
            raise ValueError("intervene needs concept_values: the (B, C) true concept states (0/1) to put in place")
        states = self._concept_states(concept_values, mask)
        target = self._state_values(states).to(values.dtype)
        if self.bottleneck_kind == "logit" and self.intervention_rule == "clamp":
            own = values.detach()  # intervened concepts are given, not predicted: no task gradient through them
            target = torch.where(states == 1, torch.maximum(own, target),
                                 torch.where(states == 0, torch.minimum(own, target), target))
        return torch.where(mask, target, values), mask

    def forward(
        self, x: torch.Tensor, intervene: Intervention = None, concept_values: Optional[torch.Tensor] = None
    ) -> ConceptBottleneckOutput:
        """Predict concepts and the task, optionally replacing chosen concepts by given values.

        Args:
            x: inputs for the encoder.
            intervene: which concepts to replace: indices (list / 1-D tensor, the same for all examples), a bool mask
                ``(C,)`` or ``(B, C)``, a ``(B, k)`` integer tensor of per-example indices, or ``"all"``.
            concept_values: ``(B, C)`` (or ``(C,)``) concept states in [0, 1], usually the true 0/1 concepts; only the
                intervened entries are read (others may be NaN). Soft: used as probabilities. Hard: must be 0/1.
                Logit: ``v`` maps to ``off + v * (on - off)`` with the calibrated ``(off, on)``
                (:meth:`intervention_values`); with ``intervention_rule="clamp"`` a 1 keeps a logit already above
                ``on`` and a 0 one already below ``off``.
        """
        logits = self.encode(x)
        values, mask = self.bottleneck_values(logits, intervene, concept_values)
        return ConceptBottleneckOutput(
            concept_logits=logits,
            concept_probs=torch.sigmoid(logits),
            bottleneck=values,
            task_logits=self.predict_task(values),
            intervened=mask,
        )

    # ------------------------------------------------------------------------------------------ interventions
    def _concept_states(self, concept_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``concept_values`` checked and expanded to ``mask``'s shape, float, NaN (unread entries) as 0."""
        v = torch.as_tensor(concept_values, device=mask.device)
        if v.dtype == torch.bool or not v.is_floating_point():
            v = v.float()
        if v.dim() == 1:
            v = v.unsqueeze(0).expand(mask.shape)
        if v.shape != mask.shape:
            raise ValueError(f"concept_values must have shape (batch, num_concepts) = {tuple(mask.shape)} (or "
                             f"({mask.shape[1]},)), got {tuple(v.shape)}")
        chosen = v[mask]
        if chosen.numel():
            if torch.isnan(chosen).any() or float(chosen.min()) < 0.0 or float(chosen.max()) > 1.0:
                raise ValueError("concept_values at intervened concepts must be concept states in [0, 1] (true 0/1 "
                                 "labels); logit bottlenecks map them to the calibrated off/on logits themselves")
            if self.bottleneck_kind == "hard" and not bool(((chosen == 0) | (chosen == 1)).all()):
                raise ValueError("a hard bottleneck takes 0/1 concept_values at intervened concepts")
        return torch.nan_to_num(v, nan=0.0)

    def _state_values(self, states: torch.Tensor) -> torch.Tensor:
        """Concept states in [0, 1] in bottleneck space: themselves, or ``off + v * (on - off)`` for logits."""
        if self.bottleneck_kind != "logit":
            return states
        off, on = self.intervention_values()
        return off.to(states) + states * (on - off).to(states)

    def intervention_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(off, on)`` values, each ``(C,)``, that an intervention puts into the bottleneck.

        0 and 1 for ``"soft"``/``"hard"``. For ``"logit"``: fixed or calibrated values if set, else
        :func:`logit_intervention_values` of the recent training-mode logits (once at least
        ``min(20, logit_buffer_size)`` rows were seen); raises a ``RuntimeError`` saying what to do if neither exists
        yet.
        """
        if self.bottleneck_kind != "logit":
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            return torch.zeros(self.num_concepts, device=device), torch.ones(self.num_concepts, device=device)
        if not torch.isnan(self.calibrated_values).any():
            return self.calibrated_values[0], self.calibrated_values[1]
        size = self.logit_buffer.shape[0]
        n = int(self.logit_buffer_count.clamp(max=size))
        if n < min(20, size):  # fewer rows give meaningless medians / percentiles
            raise RuntimeError(
                "a logit bottleneck has no intervention values yet: train it first (it keeps recent training logits "
                "to calibrate them), call calibrate_intervention_values(train_loader), or pass "
                "intervention_values=(off, on)"
            )
        return logit_intervention_values(self.logit_buffer[:n], self.intervention_calibration,
                                         self.intervention_quantiles)

    @torch.no_grad()
    def calibrate_intervention_values(
        self,
        loader: Iterable[Any],
        input_key: Union[int, str, None] = None,
        max_batches: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the ``"logit"`` intervention values from the concept logits over ``loader`` (exact, not the running
        buffer), by the model's ``intervention_calibration`` (:func:`logit_intervention_values`).

        Runs the encoder in eval mode (modes are restored) without gradients. Use the *training* loader, as Koh et al.
        do. The values are stored in the state dict and win over the running calibration.

        Returns:
            ``(off, on)``, each ``(C,)``.
        """
        if self.bottleneck_kind != "logit":
            raise ValueError(f"calibrate_intervention_values is for bottleneck='logit'; this model's bottleneck is "
                             f"{self.bottleneck_kind!r}, whose intervention values are 0/1")
        device = self.logit_buffer.device
        rows = []
        with preserve_modes(self, mode=False):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, _, _ = split_concept_batch(batch, input_key=input_key)
                rows.append(self.encode(x.to(device)).float())
        if not rows:
            raise ValueError("calibrate_intervention_values got an empty loader")
        off, on = logit_intervention_values(torch.cat(rows), self.intervention_calibration,
                                            self.intervention_quantiles)
        self._set_calibrated(off, on)
        return self.intervention_values()

    def reset_intervention_values(self) -> None:
        """Forget calibrated / fixed ``"logit"`` intervention values (the running calibration is used again)."""
        if self.bottleneck_kind == "logit":
            self.calibrated_values.fill_(float("nan"))

    def _set_calibrated(self, off: Union[float, torch.Tensor], on: Union[float, torch.Tensor]) -> None:
        values = torch.stack([torch.as_tensor(off, dtype=torch.float32).expand(self.num_concepts),
                              torch.as_tensor(on, dtype=torch.float32).expand(self.num_concepts)])
        if not bool((values[1] > values[0]).all()):
            raise ValueError(f"intervention values need off < on for every concept, got off={values[0].tolist()}, "
                             f"on={values[1].tolist()}")
        self.calibrated_values.copy_(values.to(self.calibrated_values.device))

    @torch.no_grad()
    def _record_logits(self, logits: torch.Tensor) -> None:
        rows = logits.detach().float()
        size = self.logit_buffer.shape[0]
        rows = rows[-size:]
        start = int(self.logit_buffer_count) % size
        idx = (torch.arange(rows.shape[0], device=rows.device) + start) % size
        self.logit_buffer[idx] = rows.to(self.logit_buffer.device)
        self.logit_buffer_count += rows.shape[0]

    def hard_bottleneck(self, concepts: torch.Tensor) -> torch.Tensor:
        """0/1 concept states ``(B, C)`` expressed in this model's bottleneck space (0/1, or off/on logits)."""
        mask = torch.ones(concepts.shape, dtype=torch.bool, device=concepts.device)
        return self._state_values(self._concept_states(concepts, mask))

    # ------------------------------------------------------------------------------------------- explanations
    def concept_contributions(self, output: ConceptBottleneckOutput, target: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
        """Per-concept contributions ``w[target, j] * bottleneck_j`` to the task logit, ``(B, C)``, for a linear head.

        ``target`` defaults to the predicted class (index 0 for a single binary logit). Raises ``TypeError`` for
        non-linear heads, whose contributions are not additive.
        """
        if not isinstance(self.task_head, nn.Linear):
            raise TypeError("concept_contributions needs a linear task_head (nn.Linear); for other heads use an "
                            "attribution method on predict_task")
        logits = output.task_logits
        if target is None:
            target = task_predictions(logits) if logits.shape[1] > 1 else torch.zeros(logits.shape[0], dtype=torch.long)
        target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if logits.shape[1] == 1:
            target = torch.zeros_like(target)
        return self.task_head.weight[target] * output.bottleneck

    def extra_repr(self) -> str:
        return f"num_concepts={self.num_concepts}, num_classes={self.num_classes}, bottleneck={self.bottleneck_kind!r}"


def logit_intervention_values(
    logits: torch.Tensor, calibration: str = "state_median", quantiles: tuple[float, float] = (0.05, 0.95)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept ``(off, on)`` intervention logits, each ``(C,)``, from ``(N, C)`` training logits.

    ``"state_median"``: the median of each concept's logits below 0 (off) and at or above 0 (on): where the encoder
    puts an example it calls off / on, so inside the range the task head has learned to read; always ``off < 0 <=
    on``. A concept with logits on one side only mirrors that side (``on = -off``). ``"percentile"``: the
    ``quantiles`` of all logits (Koh et al. 2020, ``tti.py``), which sit in the tails.

    Example:
        >>> logits = torch.tensor([[-3.0], [-1.0], [2.0], [4.0], [30.0]])
        >>> [t.tolist() for t in logit_intervention_values(logits)]
        [[-2.0], [4.0]]
        >>> [round(t.item(), 1) for t in logit_intervention_values(logits, "percentile")]
        [-2.6, 24.8]
    """
    check_choice(calibration, "calibration", _CALIBRATIONS)
    logits = logits.detach().float()
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (num_samples, num_concepts) matrix, got {tuple(logits.shape)}")
    if calibration == "percentile":
        values = torch.quantile(logits, torch.tensor(quantiles, device=logits.device), dim=0)
        return values[0], values[1]
    nan = torch.tensor(float("nan"), device=logits.device)
    on = torch.nanquantile(torch.where(logits >= 0, logits, nan), 0.5, dim=0)
    off = torch.nanquantile(torch.where(logits < 0, logits, nan), 0.5, dim=0)
    # one side empty: mirror the other; all logits exactly 0 would give off == on, so keep a small margin
    on = torch.where(torch.isnan(on), (-off).clamp_min(1e-3), on)
    off = torch.where(torch.isnan(off), (-on).clamp_max(-1e-3), off)
    return off, on


# ------------------------------------------------------------------------------------------------------ evaluation
# Pure functions behind ConceptMonitor: they take a model and stored validation tensors, never Lightning objects.

InterventionPolicy = Union[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]
_POLICIES = ("random", "uncertainty")


def intervention_order(
    policy: InterventionPolicy, concept_probs: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The order, per example, in which concepts get intervened on: ``(N, C)`` long, each row a permutation.

    Args:
        policy: ``"random"`` (a uniformly random order per example, from ``generator``), ``"uncertainty"`` (concepts
            whose predicted probability is closest to 0.5 first; ties by index), or a callable
            ``policy(concept_probs, generator) -> (N, C) order``.
        concept_probs: ``(N, C)`` predicted concept probabilities.
        generator: private CPU generator for ``"random"`` (the global RNG is never used).

    Example:
        >>> intervention_order("uncertainty", torch.tensor([[0.9, 0.45, 0.2]])).tolist()
        [[1, 2, 0]]
    """
    n, c = concept_probs.shape
    if policy == "random":
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        order = torch.rand(n, c, generator=generator).argsort(dim=1)
    elif policy == "uncertainty":
        order = (concept_probs.detach().float() - 0.5).abs().cpu().argsort(dim=1, stable=True)
    elif callable(policy):
        order = torch.as_tensor(policy(concept_probs, generator)).long().cpu()
        if order.shape != (n, c) or not bool((order.sort(dim=1).values == torch.arange(c)).all()):
            raise ValueError(f"an intervention policy callable must return an (N, C) = ({n}, {c}) tensor whose rows "
                             "are permutations of the concept indices")
    else:
        raise ValueError(f"policy must be one of {_POLICIES} or a callable, got {policy!r}")
    return order.to(concept_probs.device)


@torch.no_grad()
def intervention_curve(
    model: ConceptBottleneckModel,
    concept_logits: torch.Tensor,
    concepts: torch.Tensor,
    targets: torch.Tensor,
    policy: InterventionPolicy = "random",
    steps: Optional[Sequence[int]] = None,
    num_orders: int = 1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Task accuracy after intervening on the first ``k`` concepts of a policy's order, for each ``k`` in ``steps``.

    Reuses stored concept logits (the encoder is not re-run); only the bottleneck and the task head run, in eval mode
    (restored after) and without gradients. Intervened concepts get their true values (0/1, or the off/on logits).

    Args:
        model: the concept bottleneck model.
        concept_logits: ``(N, C)`` the encoder's logits for the evaluation set.
        concepts: ``(N, C)`` true 0/1 concepts.
        targets: ``(N,)`` labels (or ``(N, 1)`` 0/1 for a binary task).
        policy: see :func:`intervention_order`.
        steps: the ``k`` values (default ``0..C``).
        num_orders: independent orders drawn (``"random"`` only; deterministic policies use one).
        generator: private generator for random orders.

    Returns:
        ``(num_orders, len(steps))`` accuracies (one row for deterministic policies).

    Example:
        >>> # acc = intervention_curve(cbm, logits, c_true, y, policy="uncertainty")  -> (1, C + 1)
    """
    n, c = concept_logits.shape
    if concepts.shape != (n, c):
        raise ValueError(f"concepts must have shape {(n, c)} like concept_logits, got {tuple(concepts.shape)}")
    steps = list(range(c + 1)) if steps is None else [int(k) for k in steps]
    if any(k < 0 or k > c for k in steps):
        raise ValueError(f"steps must lie in [0, {c}], got {steps}")
    probs = torch.sigmoid(concept_logits)
    labels = None
    rows = []
    repeats = num_orders if policy == "random" else 1
    with preserve_modes(model, mode=False):
        for _ in range(repeats):
            order = intervention_order(policy, probs, generator)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(c, device=order.device).expand(n, c).contiguous())
            accs = []
            for k in steps:
                values, _ = model.bottleneck_values(concept_logits, intervene=rank < k, concept_values=concepts)
                logits = model.predict_task(values)
                if labels is None:
                    labels = task_targets(targets.to(logits.device), logits)
                accs.append((task_predictions(logits) == labels).float().mean())
            rows.append(torch.stack(accs))
    return torch.stack(rows).cpu()


class CurveDrop(NamedTuple):
    """The largest fall of an intervention curve: task accuracy ``from_acc`` at ``k = from_k`` concepts, then
    ``to_acc`` at a later ``k = to_k``; ``drop = from_acc - to_acc`` (0 for a curve that never falls)."""

    drop: float
    from_k: int
    to_k: int
    from_acc: float
    to_acc: float


def intervention_curve_drop(accuracies: Union[torch.Tensor, Sequence[float]], steps: Sequence[int]) -> CurveDrop:
    """The largest fall of an intervention curve (its maximum drawdown): how much task accuracy is lost from some
    ``k`` to a larger one.

    Giving a model the true values of more concepts should never lower its accuracy (Koh et al. 2020, Fig. 4); a
    curve that falls means the head does not read intervened values the way it reads its own predictions (e.g.
    intervention logits outside the range it has learned to use, or a head that relies on leaked information).

    Args:
        accuracies: ``(len(steps),)`` task accuracies, or ``(orders, len(steps))`` (averaged over the orders first).
        steps: the ``k`` of the accuracies, increasing.

    Example:
        >>> intervention_curve_drop([0.964, 0.867, 0.903], [0, 1, 2])
        CurveDrop(drop=0.097, from_k=0, to_k=1, from_acc=0.964, to_acc=0.867)
        >>> intervention_curve_drop([0.9, 0.95, 1.0], [0, 1, 2]).drop
        0.0
    """
    acc = torch.as_tensor(accuracies, dtype=torch.float64).detach().cpu()
    if acc.dim() == 2:
        acc = acc.mean(0)
    steps = [int(k) for k in steps]
    if acc.dim() != 1 or acc.numel() != len(steps) or not steps:
        raise ValueError(f"accuracies must hold one value per step ({len(steps)} steps), got shape "
                         f"{tuple(acc.shape)}")
    peak, peak_at = acc.cummax(0)
    fall = peak - acc
    to = int(fall.argmax())
    frm = int(peak_at[to])
    values = acc.tolist()
    return CurveDrop(round(float(fall[to]), 12), steps[frm], steps[to], values[frm], values[to])


def falling_intervention_curves(
    curves: Mapping[str, Union[torch.Tensor, Sequence[float]]], steps: Sequence[int], tolerance: float = 0.01
) -> dict[str, CurveDrop]:
    """The intervention curves (by policy name) whose largest fall (:func:`intervention_curve_drop`, on the mean over
    orders) exceeds ``tolerance``, with that fall. ``ConceptMonitor`` warns about and flags these.

    Example:
        >>> curves = {"random": torch.tensor([[0.964, 0.867, 0.903]]), "uncertainty": torch.tensor([[0.9, 1.0, 1.0]])}
        >>> falling = falling_intervention_curves(curves, [0, 1, 2])
        >>> list(falling), round(falling["random"].drop, 3)
        (['random'], 0.097)
    """
    tolerance = check_float(tolerance, "tolerance", minimum=0.0)
    drops = {name: intervention_curve_drop(curve, steps) for name, curve in curves.items()}
    return {name: d for name, d in drops.items() if d.drop > tolerance}


def describe_falling_curve(policy: str, fall: CurveDrop, model: ConceptBottleneckModel,
                           epoch: Optional[int] = None) -> str:
    """A sentence saying how the ``policy`` intervention curve falls and what to try for this ``model``.

    Example:
        >>> cbm = ConceptBottleneckModel(nn.Identity(), 2, num_classes=2, bottleneck="logit",
        ...                              intervention_rule="replace")
        >>> describe_falling_curve("random", CurveDrop(0.097, 0, 1, 0.964, 0.867), cbm)[:58]
        "the 'random' intervention curve falls by 0.097 (task accur"
    """
    at = "" if epoch is None else f" at epoch {epoch}"
    return (f"the {policy!r} intervention curve falls by {fall.drop:.3f}{at} (task accuracy {fall.from_acc:.3f} with "
            f"k={fall.from_k} true concepts, {fall.to_acc:.3f} with k={fall.to_k}): giving the model true concepts "
            f"lowers its accuracy, so its head does not read intervened values the way it reads its own predictions. "
            f"{_falling_curve_advice(model)}")


def _falling_curve_advice(model: ConceptBottleneckModel) -> str:
    if model.bottleneck_kind != "logit":
        return "The head uses more than the concepts' states (see the leakage metrics), or is not trained yet."
    settings = (model.intervention_calibration, model.intervention_rule)
    if settings != ("state_median", "clamp"):
        return (f"This logit bottleneck intervenes with intervention_calibration={settings[0]!r}, "
                f"intervention_rule={settings[1]!r}: the defaults ('state_median', 'clamp') keep intervened logits "
                "inside the range the head has learned to use.")
    if bool(torch.isfinite(model.calibrated_values).all()):
        return ("This logit bottleneck intervenes with fixed or earlier calibrated values (intervention_values / "
                "calibrate_intervention_values): recalibrate on the training data after training, or call "
                "reset_intervention_values() to use the running calibration.")
    return ("The head reads logit magnitudes beyond the concepts' states (see the leakage metrics): train longer, or "
            "use bottleneck='soft' / 'hard' or sequential training.")


def concept_accuracy_auroc(concept_logits: torch.Tensor, concepts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept accuracy (``logit >= 0`` vs ``concept >= 0.5``) and AUROC, each ``(C,)``.

    AUROC comes from ``torchmetrics.functional.classification.binary_auroc`` on the tensors' device; it is NaN for a
    concept whose true value is constant in the data (AUROC is undefined there).
    """
    from torchmetrics.functional.classification import binary_auroc

    if concepts.shape != concept_logits.shape:
        raise ValueError(
            f"concepts have shape {tuple(concepts.shape)} but concept_logits {tuple(concept_logits.shape)}"
        )
    truth = concepts >= 0.5
    acc = ((concept_logits >= 0) == truth).float().mean(0)
    aurocs = []
    for j in range(concept_logits.shape[1]):
        t = truth[:, j]
        if bool(t.all()) or not bool(t.any()):
            aurocs.append(torch.tensor(float("nan"), device=concept_logits.device))
        else:
            aurocs.append(binary_auroc(torch.sigmoid(concept_logits[:, j].float()), t.long()))
    return acc, torch.stack(aurocs)


def _stratified_folds(labels: torch.Tensor, folds: int, generator: torch.Generator) -> torch.Tensor:
    """Fold id per example: each class shuffled with ``generator`` and dealt round-robin over the folds."""
    fold = torch.empty_like(labels)
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        fold[members] = torch.arange(members.numel()) % folds
    return fold


def _fit_softmax_probes(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, num_classes: int, l2: float,
                        steps: int) -> torch.Tensor:
    """Fit independent multinomial logistic regressions at once and return their logits.

    ``x`` is ``(R, N, D)`` (R representations), ``train`` is ``(F, N)`` bool (F folds); problem ``(r, f)`` minimises
    the mean cross-entropy over ``train[f]`` plus ``l2 * |W|^2``. The objective is a sum of separate convex problems,
    so one full-batch L-BFGS run on the sum reaches each problem's optimum while paying Python overhead once.
    Returns ``(R, F, N, num_classes)`` logits. Parameters are private tensors: no model is touched.
    """
    r, n, d = x.shape
    f = train.shape[0]
    w = torch.zeros(r, f, d, num_classes, requires_grad=True)
    b = torch.zeros(r, f, 1, num_classes, requires_grad=True)
    weights = train.float() / train.float().sum(1, keepdim=True)  # (F, N): per-fold mean
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def logits() -> torch.Tensor:
        return torch.einsum("rnd,rfdc->rfnc", x, w) + b

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = logits()
        ce = torch.nn.functional.cross_entropy(z.reshape(-1, num_classes), y.repeat(r * f), reduction="none")
        loss = (ce.reshape(r, f, n) * weights).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return logits()


def leakage_probe(
    soft: torch.Tensor,
    hard: torch.Tensor,
    targets: torch.Tensor,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1e-3,
    steps: int = 100,
) -> Optional[dict[str, float]]:
    """How much better a probe predicts the task from soft concepts than from hard (0/1) ones (Mahinpei et al. 2021).

    Fits the same multinomial logistic-regression probe (L2 ``l2``, ``steps`` L-BFGS iterations, on private CPU
    tensors: no model parameter is touched) on each representation, with the same stratified ``folds``-fold split
    (drawn from a private generator seeded with ``seed``), and scores out-of-fold accuracy. A positive ``gap`` means
    the soft values carry task information beyond the concepts' states: leakage, which makes interventions and
    concept-based explanations less trustworthy. Works under ``torch.inference_mode`` (it leaves it for the fit).

    Args:
        soft: ``(N, C)`` soft concept values (e.g. probabilities).
        hard: ``(N, C)`` the 0/1 concept states.
        targets: ``(N,)`` class labels (0/1 for a binary task).

    Returns:
        ``{"soft_acc", "hard_acc", "gap"}``, or None when a class has fewer than two examples (no two folds).

    Example:
        >>> y = torch.arange(40) % 2
        >>> hard = torch.stack([y.float(), torch.zeros(40)], 1)
        >>> leakage_probe(hard, hard, y)["gap"]
        0.0
    """
    if soft.shape != hard.shape or soft.dim() != 2 or soft.shape[0] != targets.reshape(-1).shape[0]:
        raise ValueError(f"soft {tuple(soft.shape)} and hard {tuple(hard.shape)} must be the same (N, C) with one "
                         f"target per row (got {targets.reshape(-1).shape[0]})")
    with gradients_enabled():
        y = targets.detach().reshape(-1).cpu().float().round().long().clone()
        _, labels = y.unique(return_inverse=True)
        counts = torch.bincount(labels)
        n_splits = min(int(folds), int(counts.min()))
        if counts.numel() < 2 or n_splits < 2:
            return None
        fold = _stratified_folds(labels, n_splits, torch.Generator().manual_seed(seed))
        held = torch.stack([fold == k for k in range(n_splits)])  # (F, N)
        x = torch.stack([soft.detach().cpu().float(), hard.detach().cpu().float()]).clone()  # (2, N, C)
        z = _fit_softmax_probes(x, labels, ~held, int(counts.numel()), l2, steps)  # (2, F, N, K)
        correct = ((z.argmax(-1) == labels) & held).sum(dim=(1, 2))
    n = labels.numel()
    scores = {"soft_acc": int(correct[0]) / n, "hard_acc": int(correct[1]) / n}
    scores["gap"] = scores["soft_acc"] - scores["hard_acc"]
    return scores


# ------------------------------------------------------------------------------------------ one evaluation, all metrics
# What ConceptMonitor logs, computed from stored validation tensors (no Lightning): the callback collects, calls
# evaluate_concepts / concept_leakage and hands the result to the loggers.


def policy_name(policy: InterventionPolicy) -> str:
    """The name a policy is logged under: the string itself, or a callable's ``__name__``.

    Example:
        >>> policy_name("random"), policy_name(lambda p, g: p.argsort(1))
        ('random', '<lambda>')
    """
    return policy if isinstance(policy, str) else getattr(policy, "__name__", type(policy).__name__)


def check_policies(policies: Any, argument: str = "policies") -> list[InterventionPolicy]:
    """``policies`` as a list of ``"random"``, ``"uncertainty"`` or callables with distinct names (one policy alone
    is accepted too).

    Example:
        >>> check_policies("uncertainty")
        ['uncertainty']
        >>> check_policies(["random", "entropy"])
        Traceback (most recent call last):
        ...
        ValueError: policies must hold 'random', 'uncertainty' or callables, got 'entropy'
    """
    items = [policies] if isinstance(policies, str) or callable(policies) else policies
    if not isinstance(items, Sequence):
        raise TypeError(f"{argument} must be a policy or a sequence of policies, got {type(policies).__name__}")
    items = list(items)
    if not items:
        raise ValueError(f"{argument} must hold at least one policy ('random', 'uncertainty' or a callable)")
    for p in items:
        if not callable(p) and p not in _POLICIES:
            raise ValueError(f"{argument} must hold 'random', 'uncertainty' or callables, got {p!r}")
    names = [policy_name(p) for p in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{argument} must have distinct names, got {names}")
    return items


def intervention_steps(num_concepts: int, steps: Optional[Sequence[int]] = None) -> list[int]:
    """The numbers of intervened concepts ``k`` an intervention curve evaluates.

    ``steps`` sorted and de-duplicated when given (each in ``[0, num_concepts]``); else all of ``0..C`` when
    ``C <= 20``, and 11 evenly spaced values beyond.

    Example:
        >>> intervention_steps(3), intervention_steps(40)[:3], intervention_steps(7, [7, 0, 7])
        ([0, 1, 2, 3], [0, 4, 8], [0, 7])
    """
    if steps is not None:
        chosen = sorted({int(k) for k in steps})
        bad = [k for k in chosen if k < 0 or k > num_concepts]
        if bad:
            raise ValueError(f"intervention_steps {bad} lie outside [0, {num_concepts}] (the model's num_concepts); "
                             f"choose numbers of concepts between 0 and {num_concepts}")
        return chosen
    if num_concepts <= 20:
        return list(range(num_concepts + 1))
    return sorted({round(i * num_concepts / 10) for i in range(11)})


class ConceptEvaluation(NamedTuple):
    """What :func:`evaluate_concepts` measures on one evaluation set.

    Attributes:
        metrics: scalars by name, without a prefix: ``<concept>/acc``, ``<concept>/auroc`` (concepts that vary in
            the data), ``mean_acc``, ``mean_auroc``, ``task_acc``, ``leakage/head_gap``, ``intervention/<policy>/<k>``,
            ``intervention/<policy>/drop`` (the curve's largest fall, :func:`intervention_curve_drop`; 0 when it
            never falls) and, with the leakage probe, ``leakage``, ``leakage/soft_acc``, ``leakage/hard_acc``.
        curves: policy name -> ``(orders, len(steps))`` task accuracies of the intervention curve.
        steps: the ``k`` of the curves.
        concept_names: names of the concepts, in order.
        skipped: what could not be measured -> why (for the caller to report).
    """

    metrics: dict[str, float]
    curves: dict[str, torch.Tensor]
    steps: list[int]
    concept_names: list[str]
    skipped: dict[str, str]

    def table_rows(self) -> list[list[Any]]:
        """``[concept, acc, auroc]`` per concept (AUROC NaN where it is undefined)."""
        return [[n, self.metrics[f"{n}/acc"], self.metrics.get(f"{n}/auroc", float("nan"))]
                for n in self.concept_names]

    def summary(self) -> str:
        """One line of the headline numbers.

        Example:
            >>> ConceptEvaluation({"mean_acc": 0.9, "task_acc": 0.8, "intervention/random/0": 0.8,
            ...                    "intervention/random/2": 1.0}, {}, [0, 2], ["a", "b"], {}).summary()
            'task_acc 0.800, concept mean_acc 0.900, intervention random k=0 0.800 -> k=2 1.000'
            >>> ConceptEvaluation({"intervention/random/0": 0.9, "intervention/random/1": 0.8, "intervention/random/drop":
            ...                    0.1, "intervention/random/falls": 1.0}, {}, [0, 1], ["a"], {}).summary()
            'intervention random k=0 0.900 -> k=1 0.800 (falls by 0.100)'
        """
        m = self.metrics
        parts = [f"{key} {m[key]:.3f}" for key in ("task_acc",) if key in m]
        parts += [f"concept {key} {m[key]:.3f}" for key in ("mean_acc", "mean_auroc") if key in m]
        if self.steps:
            first, last = self.steps[0], self.steps[-1]
            names = {key.split("/")[1] for key in m if key.startswith("intervention/")}
            for name in sorted(names):
                part = (f"intervention {name} k={first} {m[f'intervention/{name}/{first}']:.3f} -> k={last} "
                        f"{m[f'intervention/{name}/{last}']:.3f}")
                if m.get(f"intervention/{name}/falls") == 1.0:  # flagged (by ConceptMonitor's tolerance)
                    part += f" (falls by {m[f'intervention/{name}/drop']:.3f})"
                parts.append(part)
        if "leakage" in m:
            parts.append(f"leakage {m['leakage']:+.3f}")
        return ", ".join(parts)


def _labels(targets: torch.Tensor) -> torch.Tensor:
    """``(N,)`` long class indices from ``(N,)`` or ``(N, 1)`` int labels or 0/1 floats."""
    flat = targets.reshape(targets.shape[0])
    return flat.round().long() if flat.is_floating_point() else flat.long()


def concept_leakage(
    concept_logits: torch.Tensor, targets: torch.Tensor, folds: int = 5, seed: int = 0
) -> Optional[dict[str, float]]:
    """:func:`leakage_probe` of the concept probabilities against their thresholded states, as logged scalars.

    Returns ``{"leakage", "leakage/soft_acc", "leakage/hard_acc"}`` or None when a class has fewer than two examples.

    Example:
        >>> y = torch.arange(40) % 2
        >>> concept_leakage(torch.stack([8 * y.float() - 4, torch.zeros(40) - 4], 1), y)["leakage"]
        0.0
    """
    probe = leakage_probe(torch.sigmoid(concept_logits), (concept_logits >= 0).float(), _labels(targets),
                          folds=folds, seed=seed)
    if probe is None:
        return None
    return {"leakage": probe["gap"], "leakage/soft_acc": probe["soft_acc"], "leakage/hard_acc": probe["hard_acc"]}


@torch.no_grad()
def evaluate_concepts(
    model: ConceptBottleneckModel,
    concept_logits: torch.Tensor,
    concepts: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    concept_names: Optional[Sequence[str]] = None,
    policies: Sequence[InterventionPolicy] = ("random", "uncertainty"),
    num_random_orders: int = 5,
    steps: Optional[Sequence[int]] = None,
    leakage: bool = True,
    leakage_folds: int = 5,
    seed: int = 0,
) -> ConceptEvaluation:
    """Concept quality, task accuracy, intervention curves and leakage of a concept bottleneck model (Koh et al.
    2020; leakage: Mahinpei et al. 2021) from stored encoder outputs.

    Only the bottleneck and the head run (the encoder is not re-run), in eval mode (modes restored), without
    gradients; randomness comes from private generators seeded with ``seed`` (the same random orders every call, so
    evaluations at different epochs are comparable). Nothing is written into the model.

    Args:
        model: the concept bottleneck model.
        concept_logits: ``(N, C)`` encoder logits of the evaluation set.
        concepts: ``(N, C)`` true 0/1 concepts.
        targets: ``(N,)`` labels (or 0/1 floats for a binary task); None skips task accuracy, interventions and
            leakage (said in ``skipped``).
        concept_names: names in metric keys (default: the model's).
        policies: intervention policies (see :func:`intervention_order`).
        num_random_orders: random orders averaged for ``"random"``.
        steps: the ``k`` to evaluate (default :func:`intervention_steps`).
        leakage: run :func:`concept_leakage` (an L-BFGS probe: the costliest part).
        leakage_folds: its cross-validation folds.
        seed: seed of the random orders and the probe's folds.

    Example:
        >>> cbm = ConceptBottleneckModel(nn.Identity(), 2, num_classes=2)
        >>> logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [4.0, 4.0], [-4.0, -4.0]])
        >>> result = evaluate_concepts(cbm, logits, (logits > 0).float(), torch.tensor([0, 1, 0, 1]), leakage=False)
        >>> result.metrics["mean_acc"], result.steps
        (1.0, [0, 1, 2])
    """
    n, c = concept_logits.shape
    names = [str(x) for x in (concept_names if concept_names is not None else model.concept_names)]
    if len(names) != c:
        raise ValueError(f"concept_names has {len(names)} names but there are {c} concepts; pass one name per "
                         "concept")
    policies = check_policies(policies)
    steps = intervention_steps(c, steps)
    acc, auroc = concept_accuracy_auroc(concept_logits, concepts)
    metrics: dict[str, float] = {}
    for j, name in enumerate(names):
        metrics[f"{name}/acc"] = float(acc[j])
        if not torch.isnan(auroc[j]):
            metrics[f"{name}/auroc"] = float(auroc[j])
    metrics["mean_acc"] = float(acc.mean())
    if not torch.isnan(auroc).all():
        metrics["mean_auroc"] = float(auroc[~torch.isnan(auroc)].mean())
    curves: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    if targets is None:
        skipped["task"] = "no labels: task accuracy, interventions and leakage are skipped; set target_key"
        return ConceptEvaluation(metrics, curves, steps, names, skipped)
    with preserve_modes(model, mode=False):
        soft, _ = model.bottleneck_values(concept_logits)
        task_logits = model.predict_task(soft)
        labels = task_targets(targets.to(task_logits.device), task_logits)
        metrics["task_acc"] = float((task_predictions(task_logits) == labels).float().mean())
        try:
            hard_values = model.hard_bottleneck((concept_logits >= 0).float())
        except RuntimeError as err:  # a logit bottleneck without intervention values yet
            skipped["interventions"] = f"interventions and the head leakage gap are skipped: {err}"
            hard_values = None
        if hard_values is not None:
            hard_acc = (task_predictions(model.predict_task(hard_values)) == labels).float().mean()
            metrics["leakage/head_gap"] = metrics["task_acc"] - float(hard_acc)
            for policy in policies:
                curve = intervention_curve(model, concept_logits, concepts, targets, policy=policy, steps=steps,
                                           num_orders=num_random_orders, generator=torch.Generator().manual_seed(seed))
                name = policy_name(policy)
                curves[name] = curve
                for k, value in zip(steps, curve.mean(0).tolist()):
                    metrics[f"intervention/{name}/{k}"] = value
                metrics[f"intervention/{name}/drop"] = intervention_curve_drop(curve, steps).drop
    if leakage:
        scores = concept_leakage(concept_logits, labels, folds=leakage_folds, seed=seed)
        if scores is None:
            skipped["leakage"] = "the leakage probe is skipped: fewer than 2 examples in a class"
        else:
            metrics.update(scores)
    return ConceptEvaluation(metrics, curves, steps, names, skipped)


def intervention_curve_figure(evaluation: ConceptEvaluation, title: str = "Intervention curve") -> Any:
    """A matplotlib figure of the intervention curves: mean task accuracy per policy over ``k``, +- one standard
    deviation over the random orders, the y-axis zoomed to where the curves are.

    Example:
        >>> ev = ConceptEvaluation({}, {"uncertainty": torch.tensor([[0.8, 0.9, 1.0]])}, [0, 1, 2], ["a", "b"], {})
        >>> float(intervention_curve_figure(ev).axes[0].get_ylim()[0])
        0.75
    """
    from lightning_lens.render import plot_curves

    curves = evaluation.curves
    if not curves:
        raise ValueError("the evaluation holds no intervention curves (it had no labels or no intervention values)")
    means = {name: c.mean(0) for name, c in curves.items()}
    bands = {name: (c.mean(0) - c.std(0), c.mean(0) + c.std(0)) for name, c in curves.items() if c.shape[0] > 1}
    low = min(float(c.min()) for c in curves.values())
    ylim = (max(0.0, math.floor((low - 0.02) * 20) / 20), 1.005)  # zoom in: curves often live near the top
    orders = max(c.shape[0] for c in curves.values())
    band_label = f"band: mean ± 1 std over\n{orders} random concept orders" if bands else None
    return plot_curves(evaluation.steps, means, bands=bands or None, title=title, xlabel="concepts intervened (k)",
                       ylabel="task accuracy", ylim=ylim, band_label=band_label,
                       figsize=(max(5.0, 0.45 * len(evaluation.steps) + 2.5) + 2.0, 3.8) if bands else None)
