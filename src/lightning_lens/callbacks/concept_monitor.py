"""ConceptMonitor: concept quality, test-time interventions and leakage of a concept bottleneck model, every epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from lightning_lens._pl import Callback, pl, rank_zero_warn
from lightning_lens.callbacks._gather import dedupe_by_id, gather_rows
from lightning_lens.interpretable_models.concept_bottleneck import (
    ConceptBottleneckModel,
    InterventionPolicy,
    concept_accuracy_auroc,
    intervention_curve,
    leakage_probe,
    split_concept_batch,
    task_predictions,
    task_targets,
)
from lightning_lens.utils import BatchAccessor, preserve_modes, resolve_module
from lightning_lens.utils.checks import check_int

__all__ = ["ConceptMonitor"]


class ConceptMonitor(Callback):
    """Logs what a concept bottleneck model (Koh et al. 2020) knows and how it responds to interventions.

    Over each validation epoch it keeps the model's concept logits with the true concepts and labels (from the
    ``concept_logits`` entry that :class:`~lightning_lens.interpretable_models.ConceptBottleneckModule` returns, or
    by running the encoder itself), then logs, through :mod:`lightning_lens.loggers`:

    - ``concepts/<name>/acc`` and ``concepts/<name>/auroc`` per concept (torchmetrics AUROC; skipped when a concept
      is constant in the data), ``concepts/mean_acc``, ``concepts/mean_auroc``, and ``concepts/task_acc``;
    - the intervention curve ``concepts/intervention/<policy>/<k>``: task accuracy when the first ``k`` concepts
      of the policy's order take their true values. ``random`` averages ``num_random_orders`` per-example random
      orders drawn from a private generator reseeded with ``seed`` every epoch (common random numbers, so epochs are
      comparable); ``uncertainty`` intervenes on the concepts whose probability is closest to 0.5 first. Also a
      figure ``concepts/intervention_curve``;
    - leakage: ``concepts/leakage`` = out-of-fold accuracy of a logistic-regression probe of the task on the soft
      concept probabilities minus the same probe on the thresholded 0/1 concepts (``.../soft_acc``,
      ``.../hard_acc``), and ``concepts/leakage/head_gap``: the model's own head on its bottleneck minus on hard
      concepts. Positive values mean the soft values carry task information beyond the concepts (Mahinpei et al.
      2021);
    - a per-concept table ``concepts/per_concept``.

    Training is untouched: the extra passes run without gradients in eval mode (modes restored), and the randomness
    comes from a private ``torch.Generator``. Under DDP every rank's rows are gathered (duplicates a
    ``DistributedSampler`` adds are dropped by sample index) and rank zero computes and logs.

    Args:
        concept_names: names used in tags (default: the model's ``concept_names``).
        policies: intervention policies: ``"random"``, ``"uncertainty"`` and/or callables (see
            :func:`~lightning_lens.interpretable_models.concept_bottleneck.intervention_order`; a callable is logged
            under its ``__name__``).
        num_random_orders: random orders averaged for the ``random`` curve.
        intervention_steps: the numbers of concepts ``k`` to evaluate. Default: all of ``0..C`` when C <= 20, else 11
            evenly spaced values.
        leakage: run the leakage check.
        leakage_folds: folds of the leakage probe's cross-validation.
        every_n_epochs: run on validation epochs whose index is a multiple of this.
        seed: seed of the private generator (random orders, probe folds).
        model_attr: dotted name of the :class:`ConceptBottleneckModel` inside the LightningModule (default: the only
            one found).
        input_key, concept_key, target_key, index_key: where batches hold inputs, concepts, labels, sample indices.

    Example:
        >>> monitor = ConceptMonitor(policies=("random", "uncertainty"), num_random_orders=5)
        >>> # Trainer(callbacks=[monitor], logger=TensorBoardLogger("logs")).fit(ConceptBottleneckModule(...), ...)
    """

    def __init__(
        self,
        concept_names: Optional[Sequence[str]] = None,
        policies: Sequence[InterventionPolicy] = ("random", "uncertainty"),
        num_random_orders: int = 5,
        intervention_steps: Optional[Sequence[int]] = None,
        leakage: bool = True,
        leakage_folds: int = 5,
        every_n_epochs: int = 1,
        seed: int = 0,
        model_attr: Optional[str] = None,
        input_key: Union[int, str, None] = None,
        concept_key: Union[int, str, None] = None,
        target_key: Union[int, str, None] = None,
        index_key: Union[int, str, None] = None,
    ) -> None:
        super().__init__()
        policies = [policies] if isinstance(policies, str) or callable(policies) else list(policies)
        for p in policies:
            if not callable(p) and p not in ("random", "uncertainty"):
                raise ValueError(f"policies must hold 'random', 'uncertainty' or callables, got {p!r}")
        names = [_policy_name(p) for p in policies]
        if len(set(names)) != len(names):
            raise ValueError(f"policies must have distinct names, got {names}")
        check_int(num_random_orders, "num_random_orders", minimum=1)
        check_int(every_n_epochs, "every_n_epochs", minimum=1)
        check_int(leakage_folds, "leakage_folds", minimum=2)
        self.concept_names = list(concept_names) if concept_names is not None else None
        self.policies = policies
        self.num_random_orders = num_random_orders
        self.intervention_steps = None if intervention_steps is None else sorted({int(k) for k in intervention_steps})
        self.leakage = leakage
        self.leakage_folds = leakage_folds
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.model_attr = model_attr
        self.keys = (input_key, concept_key, target_key)
        self._index_accessor = BatchAccessor(index_key=index_key)
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._warned: set[str] = set()
        self.last_metrics: dict[str, float] = {}
        self.last_curves: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._model(pl_module)  # fail early with a clear message

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._rows = {"logits": [], "concepts": [], "targets": [], "indices": []}

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._due(trainer) or dataloader_idx != 0:
            return
        x, c, y = split_concept_batch(batch, *self.keys)
        if c is None:
            self._warn_once("no_concepts", "ConceptMonitor found no concepts in the validation batches; set "
                                           "concept_key (it logs nothing without true concepts)")
            return
        logits = outputs.get("concept_logits") if isinstance(outputs, Mapping) else None
        if not isinstance(logits, torch.Tensor) or logits.shape != c.shape:
            model = self._model(pl_module)
            with torch.no_grad(), preserve_modes(model, mode=False):
                logits = model.encode(x)
        self._rows["logits"].append(logits.detach().float())
        self._rows["concepts"].append(c.detach().to(logits.device).float())
        if y is not None:
            self._rows["targets"].append(y.detach().to(logits.device).reshape(x.shape[0], -1)[:, 0].float())
        ids = self._index_accessor.indices(batch)
        if ids is not None:
            self._rows["indices"].append(ids.to(logits.device))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._due(trainer) or not self._rows.get("logits"):
            return
        rows = {k: gather_rows(trainer, torch.cat(v)) for k, v in self._rows.items() if v}
        self._rows = {}
        if trainer.world_size > 1 and "indices" in rows:
            order = [k for k in ("logits", "concepts", "targets") if k in rows]
            _, *cols = dedupe_by_id(rows["indices"], *(rows[k] for k in order))
            rows.update(zip(order, cols))
        if not trainer.is_global_zero:
            return
        model = self._model(pl_module)
        metrics, curves = self.compute(model, rows["logits"], rows["concepts"], rows.get("targets"))
        self.last_metrics, self.last_curves = metrics, curves
        self._log(trainer, model, metrics, curves, rows["concepts"].shape[1])

    # ------------------------------------------------------------------------------------------------- work
    def compute(self, model: ConceptBottleneckModel, concept_logits: torch.Tensor, concepts: torch.Tensor,
                targets: Optional[torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """All metrics for one evaluation set: ``(scalars by tag, intervention curves by policy ((orders, k)))``."""
        names = self._names(model)
        acc, auroc = concept_accuracy_auroc(concept_logits, concepts)
        metrics: dict[str, float] = {}
        for j, name in enumerate(names):
            metrics[f"concepts/{name}/acc"] = float(acc[j])
            if not torch.isnan(auroc[j]):
                metrics[f"concepts/{name}/auroc"] = float(auroc[j])
        metrics["concepts/mean_acc"] = float(acc.mean())
        if not torch.isnan(auroc).all():
            metrics["concepts/mean_auroc"] = float(auroc[~torch.isnan(auroc)].mean())
        curves: dict[str, torch.Tensor] = {}
        if targets is None:
            self._warn_once("no_targets", "ConceptMonitor found no labels: task accuracy, interventions and leakage "
                                          "are skipped; set target_key")
            return metrics, curves
        with torch.no_grad(), preserve_modes(model, mode=False):
            soft, _ = model.bottleneck_values(concept_logits)
            task_logits = model.predict_task(soft)
            labels = task_targets(targets, task_logits)
            metrics["concepts/task_acc"] = float((task_predictions(task_logits) == labels).float().mean())
            hard_states = (concept_logits >= 0).float()
            try:
                hard_values = model.hard_bottleneck(hard_states)
            except RuntimeError as err:  # a logit bottleneck without intervention values yet
                self._warn_once("no_values", f"ConceptMonitor skips interventions and the head leakage gap: {err}")
                hard_values = None
            if hard_values is not None:
                hard_acc = (task_predictions(model.predict_task(hard_values)) == labels).float().mean()
                metrics["concepts/leakage/head_gap"] = metrics["concepts/task_acc"] - float(hard_acc)
                steps = self._steps(concepts.shape[1])
                for policy in self.policies:
                    gen = torch.Generator().manual_seed(self.seed)
                    curve = intervention_curve(model, concept_logits, concepts, targets, policy=policy, steps=steps,
                                               num_orders=self.num_random_orders, generator=gen)
                    name = _policy_name(policy)
                    curves[name] = curve
                    for k, value in zip(steps, curve.mean(0).tolist()):
                        metrics[f"concepts/intervention/{name}/{k}"] = value
        if self.leakage:
            probe = leakage_probe(torch.sigmoid(concept_logits), hard_states, labels, folds=self.leakage_folds,
                                  seed=self.seed)
            if probe is None:
                self._warn_once("leakage", "ConceptMonitor skips the leakage probe: fewer than 2 examples in a class")
            else:
                metrics["concepts/leakage"] = probe["gap"]
                metrics["concepts/leakage/soft_acc"] = probe["soft_acc"]
                metrics["concepts/leakage/hard_acc"] = probe["hard_acc"]
        return metrics, curves

    def _log(self, trainer: "pl.Trainer", model: ConceptBottleneckModel, metrics: dict[str, float],
             curves: dict[str, torch.Tensor], num_concepts: int) -> None:
        from lightning_lens.loggers import log_figure, log_scalars, log_table
        from lightning_lens.render import plot_curves

        log_scalars(trainer, metrics)
        names = self._names(model)
        rows = [[n, metrics[f"concepts/{n}/acc"], metrics.get(f"concepts/{n}/auroc", float("nan"))] for n in names]
        log_table(trainer, "concepts/per_concept", ["concept", "acc", "auroc"], rows)
        if curves:
            steps = self._steps(num_concepts)
            means = {name: c.mean(0) for name, c in curves.items()}
            bands = {name: (c.mean(0) - c.std(0), c.mean(0) + c.std(0)) for name, c in curves.items() if c.shape[0] > 1}
            low = min(float(c.min()) for c in curves.values())
            ylim = (max(0.0, math.floor((low - 0.02) * 20) / 20), 1.005)  # zoom in: curves often live near the top
            fig = plot_curves(steps, means, bands=bands or None, title=f"Intervention curve (epoch "
                              f"{trainer.current_epoch})", xlabel="concepts intervened (k)", ylabel="task accuracy",
                              ylim=ylim)
            log_figure(trainer, "concepts/intervention_curve", fig)

    # ---------------------------------------------------------------------------------------------- helpers
    def _due(self, trainer: "pl.Trainer") -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _steps(self, num_concepts: int) -> list[int]:
        if self.intervention_steps is not None:
            bad = [k for k in self.intervention_steps if k > num_concepts or k < 0]
            if bad:
                raise ValueError(f"intervention_steps {bad} lie outside [0, {num_concepts}] (num_concepts)")
            return list(self.intervention_steps)
        if num_concepts <= 20:
            return list(range(num_concepts + 1))
        return sorted({round(i * num_concepts / 10) for i in range(11)})

    def _names(self, model: ConceptBottleneckModel) -> list[str]:
        names = self.concept_names or model.concept_names
        if len(names) != model.num_concepts:
            raise ValueError(f"concept_names has {len(names)} names but the model has {model.num_concepts} concepts")
        return [str(n) for n in names]

    def _model(self, pl_module: "pl.LightningModule") -> ConceptBottleneckModel:
        if self.model_attr is not None:
            model = resolve_module(pl_module, self.model_attr, argument="model_attr")
            if not isinstance(model, ConceptBottleneckModel):
                raise TypeError(f"model_attr={self.model_attr!r} is a {type(model).__name__}, not a "
                                "ConceptBottleneckModel")
            return model
        found = [m for m in pl_module.modules() if isinstance(m, ConceptBottleneckModel)]
        if len(found) != 1:
            what = "no ConceptBottleneckModel" if not found else f"{len(found)} ConceptBottleneckModels"
            raise ValueError(f"ConceptMonitor needs one ConceptBottleneckModel in the LightningModule and found {what}"
                             "; pass model_attr='<dotted name>'")
        return found[0]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _policy_name(policy: InterventionPolicy) -> str:
    return policy if isinstance(policy, str) else getattr(policy, "__name__", type(policy).__name__)
