"""ConceptMonitor: concept quality, test-time interventions and leakage of a concept bottleneck model, every epoch."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback, log
from lightning_lens.callbacks._gather import SampleIds, dedupe_by_id, gather_rows, validation_dataset_size
from lightning_lens.interpretable_models.concept_bottleneck import (
    ConceptBottleneckModel,
    ConceptEvaluation,
    InterventionPolicy,
    check_policies,
    concept_leakage,
    describe_falling_curve,
    evaluate_concepts,
    falling_intervention_curves,
    intervention_curve_figure,
    intervention_steps,
    policy_name,
    split_concept_batch,
    task_targets,
)
from lightning_lens.utils import BatchAccessor, preserve_modes, resolve_module
from lightning_lens.utils.checks import (
    check_bool,
    check_float,
    check_instance,
    check_int,
    check_key,
    check_optional,
)

__all__ = ["ConceptMonitor"]

Key = Union[int, str, None]


class ConceptMonitor(LensCallback):
    """Logs what a concept bottleneck model (Koh et al. 2020) knows and how it responds to interventions.

    Over each due validation epoch it keeps the model's concept logits with the true concepts and labels (from the
    ``concept_logits`` entry that :class:`~lightning_lens.interpretable_models.ConceptBottleneckModule` returns, or
    by running the encoder itself), then hands them to
    :func:`~lightning_lens.interpretable_models.concept_bottleneck.evaluate_concepts` and logs, through
    :mod:`lightning_lens.loggers`:

    - ``concepts/<name>/acc`` and ``concepts/<name>/auroc`` per concept (torchmetrics AUROC; skipped when a concept
      is constant in the data), ``concepts/mean_acc``, ``concepts/mean_auroc``, and ``concepts/task_acc``;
    - the intervention curve ``concepts/intervention/<policy>/<k>``: task accuracy when the first ``k`` concepts
      of the policy's order take their true values. ``random`` averages ``num_random_orders`` per-example random
      orders drawn from a private generator reseeded with ``seed`` every epoch (common random numbers, so epochs are
      comparable); ``uncertainty`` intervenes on the concepts whose probability is closest to 0.5 first. Also a
      figure ``concepts/intervention_curve``;
    - whether a curve falls: ``concepts/intervention/<policy>/drop``, the largest loss of task accuracy from some
      ``k`` to a larger one (0 when the curve never falls), and ``concepts/intervention/<policy>/falls``, 1.0 when
      that loss exceeds ``curve_drop_tolerance`` (else 0.0). True concepts should never hurt: a falling curve means
      the head does not read intervened values the way it reads the model's own predictions (e.g. logit
      intervention values outside its range, or leakage). If a policy's curve falls in the last evaluation of a fit
      (or of ``trainer.validate()``), a warning (once per policy) names the policy, the drop, the ``k`` where it
      happens and what to try. Early epochs are only logged, not warned about: a barely trained head's curve often
      falls and says nothing about the final model;
    - leakage: ``concepts/leakage`` = out-of-fold accuracy of a logistic-regression probe of the task on the soft
      concept probabilities minus the same probe on the thresholded 0/1 concepts (``.../soft_acc``,
      ``.../hard_acc``), and ``concepts/leakage/head_gap``: the model's own head on its bottleneck minus on hard
      concepts. Positive values mean the soft values carry task information beyond the concepts (Mahinpei et al.
      2021);
    - a per-concept table ``concepts/per_concept``.

    At the end of fit, rank zero logs one summary line (``logging.getLogger("lightning_lens")``, INFO). Samples with
    NaN/inf concept logits or concepts are left out and counted (a warning says how many).

    Training is untouched: the extra passes run without gradients in eval mode (modes restored), and the randomness
    comes from a private ``torch.Generator``. Under DDP every rank's rows are gathered with rank-safe sample ids
    (the batch's indices, or the positions a ``DistributedSampler`` gives), the repeats the sampler adds are dropped,
    rows are put in id order (so 1 and N processes compute on the same data in the same order) and rank zero
    computes and logs. The metrics, the leakage probe, the logging and the figure are isolated parts: one failing
    is reported and the rest carries on (see :class:`~lightning_lens.callbacks._base.LensCallback`).

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
        curve_drop_tolerance: how much task accuracy an intervention curve may lose (sampling noise) before it
            counts as falling.
        every_n_epochs: run on epochs ``n - 1, 2n - 1, ...`` of fit (and always the first and the last).
        seed: seed of the private generator (random orders, probe folds).
        model_attr: dotted name of the :class:`ConceptBottleneckModel` inside the LightningModule (default: the only
            one found).
        input_key, concept_key, target_key, index_key: where batches hold inputs, concepts, labels, sample indices.
        max_overhead: the share of fit time the monitor may use; epochs in between are skipped to stay within it
            (None: no limit).
        strict: raise the monitor's own errors instead of reporting them and carrying on.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).

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
        curve_drop_tolerance: float = 0.01,
        every_n_epochs: int = 1,
        seed: int = 0,
        model_attr: Optional[str] = None,
        input_key: Key = None,
        concept_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_epochs=check_int(every_n_epochs, "every_n_epochs", minimum=1),
                         max_overhead=max_overhead, strict=strict, verbose=verbose)
        if concept_names is not None:
            if isinstance(concept_names, str):
                raise TypeError("concept_names must be a sequence of names, one per concept, got a single string")
            check_instance(concept_names, "concept_names", Sequence, hint="one name per concept")
        if intervention_steps is not None:
            check_instance(intervention_steps, "intervention_steps", Sequence, hint="numbers of concepts, e.g. [0, 2]")
            steps = sorted({check_int(k, "intervention_steps", minimum=0) for k in intervention_steps})
        self.concept_names = None if concept_names is None else [str(n) for n in concept_names]
        self.policies = check_policies(policies)
        self.num_random_orders = check_int(num_random_orders, "num_random_orders", minimum=1)
        self.intervention_steps = None if intervention_steps is None else steps
        self.leakage = check_bool(leakage, "leakage")
        self.leakage_folds = check_int(leakage_folds, "leakage_folds", minimum=2)
        self.curve_drop_tolerance = check_float(curve_drop_tolerance, "curve_drop_tolerance", minimum=0.0,
                                                maximum=1.0)
        self.seed = check_int(seed, "seed", minimum=0)
        self.model_attr = check_optional(check_instance, model_attr, "model_attr", str)
        self.keys = tuple(check_key(k, name) for k, name in ((input_key, "input_key"), (concept_key, "concept_key"),
                                                                (target_key, "target_key")))
        self._index_accessor = BatchAccessor(index_key=check_key(index_key, "index_key"))
        self._ids = SampleIds()
        self._dataset_size: Optional[int] = None
        self._collecting = False
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids (n,), [target, logits, concepts] (n, 1+2C))
        self._work_seconds = 0.0
        self.last_evaluation: Optional[ConceptEvaluation] = None
        self.last_epoch: Optional[int] = None
        self.last_metrics: dict[str, float] = {}
        self.last_curves: dict[str, torch.Tensor] = {}
        self.last_falling: dict[str, str] = {}  # policy -> what the warning says, for the last evaluation
        self.excluded = 0  # samples left out of the last evaluation for NaN/inf logits or concepts
        self.last_num_samples = 0  # samples of the last evaluation (after de-duplication and exclusion)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"model_attr": self.model_attr, "policies": [policy_name(p) for p in self.policies]}

    # ------------------------------------------------------------------------------------------------ setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        model = self._model(pl_module)
        self._names(model)
        intervention_steps(model.num_concepts, self.intervention_steps)
        if batch is None:
            return
        x, c, y = self._split(batch)
        self._indices(batch)
        if c is None:
            raise ValueError("ConceptMonitor found no concepts in the validation batch; set concept_key to where the "
                             "batch holds the (B, num_concepts) 0/1 concepts")
        if c.dim() != 2 or c.shape != (x.shape[0], model.num_concepts):
            raise ValueError(f"concept_key selects concepts of shape {tuple(c.shape)}, but the model has "
                             f"{model.num_concepts} concepts and the batch {x.shape[0]} inputs; set concept_key")
        with torch.no_grad(), preserve_modes(model, mode=False):  # a dry run on two samples
            logits = model.encode(x[:2])
            task_logits = model.predict_task(torch.sigmoid(logits))
        if y is None:
            self.warn_once("no_targets", "ConceptMonitor found no labels in the validation batch: task accuracy, "
                                         "interventions and leakage are skipped; set target_key")
            return
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"target_key selects {y.shape[0]} labels for {x.shape[0]} inputs; set target_key")
        labels = task_targets(y[:2].to(task_logits.device), task_logits)
        classes = max(2, task_logits.shape[1])
        if bool((labels < 0).any()) or bool((labels >= classes).any()):
            raise ValueError(f"target_key selects labels {labels.tolist()} outside the model's {classes} classes; "
                             "set target_key to the class labels")

    # ------------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._collecting = self.is_due(trainer)  # a collective: first, on every rank
        self._chunks, self._work_seconds = [], 0.0
        self._ids.reset()
        self._dataset_size = validation_dataset_size(trainer) if self._collecting else None

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._collecting or dataloader_idx != 0:
            return
        start = time.perf_counter()
        self.run_part(trainer, "collect", self._collect, trainer, pl_module, outputs, batch,
                      hint="check concept_key, target_key and index_key")
        self._work_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.is_due(trainer):  # the same answer on every rank: the collectives below run everywhere or nowhere
            return
        start = time.perf_counter()
        try:
            local = self.run_part(trainer, "collect", self._local_rows, pl_module, collective=True)
            if local is None:
                return
            ids, values = (gather_rows(trainer, t) for t in local)  # collectives, on every rank
            if trainer.is_global_zero:
                self._evaluate(trainer, pl_module, ids.cpu(), values.cpu())
        finally:
            self._chunks, self._collecting = [], False
            self.record_run_cost(self._work_seconds + time.perf_counter() - start)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero and self.last_evaluation is not None:  # the summary line follows (the base's)
            self._warn_falling()

    # ------------------------------------------------------------------------------------------------ collecting
    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any) -> None:
        x, c, y = self._split(batch)
        if c is None:
            raise ValueError("a validation batch holds no concepts; set concept_key")
        n = x.shape[0]
        ids = self._ids.next(trainer, n, self._indices(batch), self._dataset_size)
        logits = outputs.get("concept_logits") if isinstance(outputs, Mapping) else None
        if not isinstance(logits, torch.Tensor) or logits.shape != c.shape:
            model = self._model(pl_module)
            with torch.no_grad(), preserve_modes(model, mode=False):
                logits = model.encode(x)
        logits = logits.detach().float()
        target = (torch.full((n,), float("nan"), device=logits.device) if y is None
                  else y.detach().to(logits.device).reshape(n, -1)[:, 0].float())
        values = torch.cat([target[:, None], logits, c.detach().to(logits.device).float()], dim=1)
        self._chunks.append((ids, values))

    def _local_rows(self, pl_module: "pl.LightningModule") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(ids (n,), values (n, 1 + 2C))`` on the module's device (where the collectives need them)."""
        width = 1 + 2 * self._model(pl_module).num_concepts
        device = pl_module.device
        if not self._chunks:
            return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, width, device=device)
        ids = torch.cat([i for i, _ in self._chunks]).to(device)
        values = torch.cat([v for _, v in self._chunks]).to(device)
        if values.shape[1] != width:
            raise ValueError(f"the collected rows hold {(values.shape[1] - 1) // 2} concepts but the model has "
                             f"{(width - 1) // 2}")
        return ids, values

    # ------------------------------------------------------------------------------------------------ work
    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ids: torch.Tensor,
                  values: torch.Tensor) -> None:
        ids, values = dedupe_by_id(ids, values)
        values = values[torch.argsort(ids)]  # id order: 1 and N processes see the same rows in the same order
        model = self._model(pl_module)
        c = model.num_concepts
        targets, logits, concepts = values[:, 0], values[:, 1:1 + c], values[:, 1 + c:]
        finite = torch.isfinite(logits).all(1) & torch.isfinite(concepts).all(1)
        labelled = ~torch.isnan(targets)
        if bool(labelled.any()) and not bool(labelled.all()):
            finite &= labelled  # mixed batches: evaluate the labelled samples only
        self.excluded = int((~finite).sum())
        if self.excluded:
            self.warn_once("non_finite", f"ConceptMonitor left {self.excluded} of {finite.numel()} validation samples "
                                         "out: NaN/inf concept logits or concepts, or no label")
            log.info(f"ConceptMonitor: epoch {trainer.current_epoch}: {self.excluded} samples left out")
        targets, logits, concepts = targets[finite], logits[finite], concepts[finite]
        if logits.shape[0] == 0:
            self.warn_once("empty", "ConceptMonitor has no usable validation samples; nothing is logged")
            return
        targets = targets if bool(labelled.any()) else None
        self.last_num_samples = int(logits.shape[0])
        model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        logits, concepts = logits.to(model_device), concepts.to(model_device)
        evaluation = self.run_part(trainer, "metrics", self._evaluate_concepts, model, logits, concepts, targets,
                                   leakage=False, epoch=int(trainer.current_epoch))
        if evaluation is not None and trainer.state.fn != "fit":
            self._warn_falling()  # trainer.validate(): this evaluation is the last one
        if evaluation is None:
            return
        if self.leakage and targets is not None:
            scores = self.run_part(trainer, "leakage", concept_leakage, logits, targets, folds=self.leakage_folds,
                                   seed=self.seed)
            if scores is not None:
                evaluation.metrics.update(scores)
            elif "leakage" not in self.failures and "leakage" not in self.disabled:
                self.warn_once("leakage", "ConceptMonitor: the leakage probe is skipped: fewer than 2 examples in a "
                                          "class")
        self.last_evaluation, self.last_epoch = evaluation, int(trainer.current_epoch)
        self.last_metrics = {f"concepts/{k}": v for k, v in evaluation.metrics.items()}
        self.last_curves = evaluation.curves
        self.run_part(trainer, "log", self._log, trainer, evaluation)
        if evaluation.curves:
            self.run_part(trainer, "figures", self._log_figure, trainer, evaluation)

    def _evaluate_concepts(self, model: ConceptBottleneckModel, logits: torch.Tensor, concepts: torch.Tensor,
                           targets: Optional[torch.Tensor], leakage: bool, epoch: Optional[int] = None
                           ) -> ConceptEvaluation:
        evaluation = evaluate_concepts(
            model, logits, concepts, targets, concept_names=self._names(model), policies=self.policies,
            num_random_orders=self.num_random_orders, steps=self.intervention_steps, leakage=leakage,
            leakage_folds=self.leakage_folds, seed=self.seed,
        )
        for part, reason in evaluation.skipped.items():
            self.warn_once(part, f"ConceptMonitor: {reason}")
        falling = falling_intervention_curves(evaluation.curves, evaluation.steps, self.curve_drop_tolerance)
        for name in evaluation.curves:
            evaluation.metrics[f"intervention/{name}/falls"] = float(name in falling)
        self.last_falling = {name: describe_falling_curve(name, fall, model, epoch) for name, fall in falling.items()}
        return evaluation

    def _warn_falling(self) -> None:
        for name, message in self.last_falling.items():
            self.warn_once(f"falling_curve/{name}", f"ConceptMonitor: {message} Logged every evaluation as "
                                                    f"concepts/intervention/{name}/drop and .../falls.")

    def compute(self, model: ConceptBottleneckModel, concept_logits: torch.Tensor, concepts: torch.Tensor,
                targets: Optional[torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """All metrics for one evaluation set: ``(scalars by tag, intervention curves by policy ((orders, k)))``.

        :func:`~lightning_lens.interpretable_models.concept_bottleneck.evaluate_concepts` with this monitor's
        settings, its metric names under ``concepts/``; warns (once per policy) about a falling intervention curve.
        """
        evaluation = self._evaluate_concepts(model, concept_logits, concepts, targets, leakage=self.leakage)
        self._warn_falling()
        return {f"concepts/{k}": v for k, v in evaluation.metrics.items()}, evaluation.curves

    def _log(self, trainer: "pl.Trainer", evaluation: ConceptEvaluation) -> None:
        from lightning_lens.loggers import log_scalars, log_table

        log_scalars(trainer, self.last_metrics)
        log_table(trainer, "concepts/per_concept", ["concept", "acc", "auroc"], evaluation.table_rows(),
                  legend="acc: accuracy of the predicted concept on the validation data; auroc: area under its ROC"
                         " curve (0.5 = chance; nan when the concept takes a single value there)")

    def _log_figure(self, trainer: "pl.Trainer", evaluation: ConceptEvaluation) -> None:
        from lightning_lens.loggers import log_figure

        fig = intervention_curve_figure(evaluation, title=f"Intervention curve (epoch {trainer.current_epoch})")
        log_figure(trainer, "concepts/intervention_curve", fig)

    # ---------------------------------------------------------------------------------------------- helpers
    def _split(self, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        try:
            return split_concept_batch(batch, *self.keys)
        except KeyError as err:  # a key that selects nothing is a configuration error
            raise ValueError(err.args[0] if err.args else str(err)) from err

    def _indices(self, batch: Any) -> Optional[torch.Tensor]:
        try:
            return self._index_accessor.indices(batch)
        except KeyError as err:
            raise ValueError(err.args[0] if err.args else str(err)) from err

    def _steps(self, num_concepts: int) -> list[int]:
        return intervention_steps(num_concepts, self.intervention_steps)

    def _names(self, model: ConceptBottleneckModel) -> list[str]:
        names = self.concept_names or model.concept_names
        if len(names) != model.num_concepts:
            raise ValueError(f"concept_names has {len(names)} names but the model has {model.num_concepts} concepts; "
                             "pass one name per concept or leave concept_names=None (the model's names)")
        return [str(n) for n in names]

    def _model(self, pl_module: "pl.LightningModule") -> ConceptBottleneckModel:
        if self.model_attr is not None:
            model = resolve_module(pl_module, self.model_attr, argument="model_attr")
            if not isinstance(model, ConceptBottleneckModel):
                raise TypeError(f"model_attr={self.model_attr!r} is a {type(model).__name__}, not a "
                                "ConceptBottleneckModel; name the ConceptBottleneckModel inside the LightningModule")
            return model
        found = [m for m in pl_module.modules() if isinstance(m, ConceptBottleneckModel)]
        if len(found) != 1:
            what = "no ConceptBottleneckModel" if not found else f"{len(found)} ConceptBottleneckModels"
            raise ValueError(f"ConceptMonitor needs one ConceptBottleneckModel in the LightningModule and found {what}"
                             "; pass model_attr='<dotted name>'")
        return found[0]

    def summary(self) -> Optional[str]:
        """The headline numbers of the last evaluation: task and concept accuracy, intervention curves."""
        if self.last_evaluation is None:
            return None
        return f"ConceptMonitor (epoch {self.last_epoch}): {self.last_evaluation.summary()}"
