r"""
TracIn during training
^^^^^^^^^^^^^^^^^^^^^^

Which training examples are responsible for the model's predictions, from the weights the run passes through:
TracIn (Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent", NeurIPS 2020) sums, over
snapshots of the weights, the learning rate times the dot product of two examples' loss gradients. Self-influence
ranks the training examples the model found hard to fit, often label errors. The scores come from
:mod:`lightning_lens.influence`; this callback takes the snapshots, re-reads the training data, and logs.

Tags written (``tracin`` is ``log_prefix``):

===================================  ==================================================================================
``tracin/self_influence``            image: the ``num_top`` most self-influential training examples, with id, label,
                                     the model's prediction and score (``(!)`` where label and prediction disagree);
                                     JSON file: every scored training example, ranked (ids, dataset positions,
                                     scores, labels, predictions) with the snapshots' epochs and learning rates
``tracin/proponents``                image: one row per probe, its ``k`` proponents (highest influence)
``tracin/opponents``                 image: one row per probe, its ``k`` opponents (lowest influence)
``tracin/probes``                    JSON file: the probes' proponents and opponents (ids, positions, scores)
``tracin/<scalar>``                  ``num_checkpoints``, ``scored_examples``, ``scored_fraction``,
                                     ``self_influence_mean``, ``self_influence_max``, ``top_label_disagreement``
                                     (share of the ``num_top`` where label and prediction differ),
                                     ``excluded_nonfinite``, ``seconds``
===================================  ==================================================================================
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate
from typing_extensions import override

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import check_displayable, log
from lightning_lens.callbacks._gather import dedupe_by_id, gather_objects
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector
from lightning_lens.callbacks.knn_memory import training_dataloader
from lightning_lens.influence.checkpoints import checkpoint_learning_rate
from lightning_lens.influence.reports import (
    influence_gallery,
    rank_by_self_influence,
    self_influence_gallery,
    top_influence,
)
from lightning_lens.influence.tracin import TracInCP, TracInCPFast, global_rng_preserved
from lightning_lens.loggers import log_image, log_json, log_scalars, sanitize_tag
from lightning_lens.utils import BatchAccessor, ProbeSet, modules_in_execution_order, preserve_modes, resolve_module
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import (
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_key,
    check_optional,
    check_str_list,
)

__all__ = ["TracInCallback", "TracInReport", "WeightSnapshot"]

_METHODS = ("fast", "exact")
_SNAPSHOTS = ("memory", "checkpoints")
_PROBE_TARGETS = ("label", "prediction")
Denormalize = Union[Callable[[torch.Tensor], torch.Tensor], tuple, list, None]


@dataclasses.dataclass
class WeightSnapshot:
    """The module's weights (CPU copies) after ``epoch``, with the learning rate the optimizer used in it."""

    epoch: int
    global_step: int
    learning_rate: float
    state: dict[str, torch.Tensor]


@dataclasses.dataclass
class TracInReport:
    """What one scoring run found (rank zero holds it; other ranks hold None)."""

    when: str
    epochs: list[int]  #: the snapshots' epochs
    learning_rates: list[float]
    positions: torch.Tensor  #: (n,) dataset positions of the scored training examples, ascending
    ids: torch.Tensor  #: (n,) their ids (the batches' index key, else the positions)
    self_influence: torch.Tensor  #: (n,)
    labels: torch.Tensor  #: (n,)
    predictions: torch.Tensor  #: (n,) of the model at the end of the run
    ranked: torch.Tensor  #: rows of the finite scores, most self-influential first
    planned: int  #: training examples meant to be scored (the dataset, or max_train_samples)
    excluded_nonfinite: int
    influence: Optional[torch.Tensor] = None  #: (n_probes, n) influence of each scored example on each probe
    proponents: Optional[torch.Tensor] = None  #: (n_probes, k) rows of the scored examples, -1 where none
    opponents: Optional[torch.Tensor] = None

    @property
    def ranked_ids(self) -> list[int]:
        return self.ids[self.ranked].tolist()


class TracInCallback(ProbeCallback):
    """Snapshot the weights during fit; at its end, rank the training examples by TracIn self-influence and show the
    probes' proponents and opponents (see the module docstring for the tags).

    **Snapshots.** After every ``every_n_epochs``-th training epoch (counted from one) and at the end of fit, a CPU copy
    of the LightningModule's state dict is kept with the learning rate of the optimizer's param group holding the
    scored parameters, averaged over the training steps since the previous snapshot (the rates the steps trained
    with, under epoch- and step-wise schedulers alike). They are part of
    the callback's checkpoint state, so a resumed run keeps them (each Lightning checkpoint then holds all snapshots
    so far: with a large model use ``snapshots="checkpoints"``, which reads every ``.ckpt`` file the trainer's
    ``ModelCheckpoint`` callbacks wrote instead, with the learning rates recorded in them; keep them all with
    ``save_top_k=-1``). With adaptive optimizers (Adam) the learning rate is not the step size, and TracIn is the
    usual approximation.

    **Scores.** ``method="fast"`` (default) covers the weight of the final linear layer with TracInCPFast's
    factorisation: one forward pass per training example and snapshot. ``method="exact"`` covers the parameters of
    ``layers`` (all by default) with per-example gradients (``torch.func``), optionally compressed to
    ``projection_dim``. The training set (``train_dataset``, default the training dataloader's dataset; map-style) is
    re-read in order, unshuffled, with the training loader's ``collate_fn``, in batches of ``batch_size``; the
    global random state is restored after. Under DDP each rank scores every ``world_size``-th example; rank zero
    gathers, de-duplicates by position and logs. Nothing is written into the module (``functional_call`` on
    checkpoint tensors, no ``.backward()``); modes are restored. Predictions are the model's at the end of the run.

    **Budget.** ``max_overhead`` covers all of the callback's work. Periodic scoring (``score_every_n_epochs``) runs in
    epochs the budget allows. Any scoring run that would exceed the remaining budget scores a seeded random subset of
    the training set instead, stopping when the time is spent (at least one batch per rank), and says so
    (``scored_fraction`` < 1, a warning). The run at the end of fit happens after the last training step, so it never
    slows training; pass ``budget_fit_end=False`` to always score the whole training set there (the opt-in to exceed
    ``max_overhead``), or ``max_train_samples`` for a fixed, seeded subset.

    Args:
        every_n_epochs: snapshot the weights after every n-th epoch (the end of fit always adds one).
        score_every_n_epochs: also score every n-th epoch during fit (None: only at the end of fit).
        method: ``"fast"`` (final linear layer, factorised) or ``"exact"`` (per-example gradients of ``layers``).
        final_layer: the final ``nn.Linear``'s name in the LightningModule (default: the last one its forward calls).
        layers: module names covered by ``method="exact"`` (default: every parameter).
        projection_dim: ``method="exact"`` only: compress gradients with a sparse JL projection.
        loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-example losses (default: cross-entropy).
        snapshots: ``"memory"`` (CPU copies, in the callback state) or ``"checkpoints"`` (the ModelCheckpoint files).
        train_dataset: the (map-style) training data to score; default: the training dataloader's dataset.
        batch_size: examples per scoring batch (default: the training loader's batch size).
        max_train_samples: score a seeded random subset of this many training examples.
        num_top: most self-influential examples shown.
        k: proponents and opponents shown per probe.
        num_probes: probes (drawn once from validation data by position; shared with other explanation callbacks).
        probe_seed: seed of the probe draw.
        probes: a ready probe set (then none is drawn).
        probe_target: the probes' loss is taken at their ``"label"`` or at the model's ``"prediction"``.
        input_key, target_key, index_key: where inputs, labels and ids are in batches (see ``BatchAccessor``).
        denormalize: maps a model input to a displayable image in [0, 1] (or a ``(mean, std)`` pair); galleries are
            drawn when inputs look like images (``(C, H, W)``) or ``denormalize`` is given.
        seed: seed of the projection and of the subsets.
        budget_fit_end: keep the run at the end of fit within ``max_overhead`` (False: score everything there).
        log_prefix: first component of every logged tag.
        max_overhead: the callback's time as a fraction of fit time (None: no limit).
        strict: raise the callback's exceptions instead of reporting them and continuing.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).
        max_failures: failures in a row after which a part (scoring, a gallery) is switched off.

    Example:
        >>> trainer = Trainer(callbacks=[TracInCallback(every_n_epochs=2)])  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        score_every_n_epochs: Optional[int] = None,
        method: str = "fast",
        final_layer: Optional[str] = None,
        layers: Optional[Sequence[str]] = None,
        projection_dim: Optional[int] = None,
        loss_fn: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
        snapshots: str = "memory",
        train_dataset: Any = None,
        batch_size: Optional[int] = None,
        max_train_samples: Optional[int] = None,
        num_top: int = 16,
        k: int = 4,
        num_probes: int = 8,
        probe_seed: int = 0,
        probes: Optional[ProbeSet] = None,
        probe_target: str = "label",
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        denormalize: Denormalize = None,
        seed: int = 0,
        budget_fit_end: bool = True,
        log_prefix: str = "tracin",
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
    ) -> None:
        super().__init__(
            every_n_epochs=check_optional(check_int, score_every_n_epochs, "score_every_n_epochs", minimum=1),
            max_overhead=max_overhead,
            strict=strict,
            verbose=verbose,
            max_failures=max_failures,
        )
        self.snapshot_every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1)
        self.method = check_choice(method, "method", _METHODS)
        self.final_layer = check_optional(check_instance, final_layer, "final_layer", str)
        self.layers = None if layers is None else list(check_str_list(layers, "layers"))
        self.projection_dim = check_optional(check_int, projection_dim, "projection_dim", minimum=1)
        if self.method == "fast" and (self.layers is not None or self.projection_dim is not None):
            raise ValueError(
                "layers and projection_dim apply to method='exact'; method='fast' covers the final linear layer"
                " (choose it with final_layer=)"
            )
        if self.method == "exact" and self.final_layer is not None:
            raise ValueError("final_layer applies to method='fast'; with method='exact' name the modules in layers=")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (outputs, targets) -> per-example losses, got {loss_fn!r}")
        self.loss_fn = loss_fn
        self.snapshots_from = check_choice(snapshots, "snapshots", _SNAPSHOTS)
        if train_dataset is not None and not (
            hasattr(train_dataset, "__getitem__") and hasattr(train_dataset, "__len__")
        ):
            raise TypeError(
                "train_dataset must be a map-style Dataset (indexable, with a length), got"
                f" {type(train_dataset).__name__}"
            )
        self.train_dataset = train_dataset
        self.batch_size = check_optional(check_int, batch_size, "batch_size", minimum=1)
        self.max_train_samples = check_optional(check_int, max_train_samples, "max_train_samples", minimum=1)
        self.num_top = check_int(num_top, "num_top", minimum=1)
        self.k = check_int(k, "k", minimum=1)
        self.probe_target = check_choice(probe_target, "probe_target", _PROBE_TARGETS)
        self.accessor = BatchAccessor(
            check_key(input_key, "input_key"), check_key(target_key, "target_key"), check_key(index_key, "index_key")
        )
        if denormalize is not None and not callable(denormalize) and not (
            isinstance(denormalize, (tuple, list)) and len(denormalize) == 2
        ):
            raise TypeError(
                "denormalize must be a callable input -> image in [0, 1] or a (mean, std) pair, got"
                f" {type(denormalize).__name__}"
            )
        self.denormalize = denormalize
        self.seed = check_int(seed, "seed")
        self.budget_fit_end = check_bool(budget_fit_end, "budget_fit_end")
        self.log_prefix = sanitize_tag(check_instance(log_prefix, "log_prefix", str))
        if not self.log_prefix:
            raise ValueError(f"log_prefix must contain letters or digits, got {log_prefix!r}")
        self._collector = ProbeCollector(
            num_probes, self.accessor, seed=check_int(probe_seed, "probe_seed"), probes=probes, owner=self
        )
        self.snapshots: list[WeightSnapshot] = []
        self.last_report: Optional[TracInReport] = None
        self.last_metrics: dict[str, float] = {}
        self._scored_state: Optional[tuple[int, int]] = None  # (global step, snapshots) of the last scoring run
        self._lr_sum, self._lr_steps = 0.0, 0  # learning rates of the steps since the last snapshot
        self._lr_group: Optional[tuple[int, int]] = None  # (optimizer, param group) the rates are read from
        self._resolved_layer: Optional[str] = None
        self._scored_names: list[str] = []
        self._dataset: Any = None
        self._collate: Callable[[list[Any]], Any] = default_collate
        self._loader_batch_size = 64
        self._render = False

    def _state_key_fields(self) -> dict[str, Any]:
        return {"log_prefix": self.log_prefix}

    # ----------------------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # a checkpoint being resumed restores its snapshots after this
            self.snapshots, self._scored_state = [], None
            self._lr_sum, self._lr_steps, self._lr_group = 0.0, 0, None

    @override
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        if trainer.state.fn != "fit":
            self._dry_run_done = False  # nothing to check outside fit: check at the next fit's start instead
            return
        self._resolve_data(trainer)
        sample = self._read_positions([0, 1] if len(self._dataset) > 1 else [0])
        try:
            x, y = self.accessor.inputs(sample), self.accessor.targets(sample)
        except KeyError as err:
            raise ValueError(err.args[0] if err.args else str(err)) from err
        if y is None:
            raise ValueError("TracInCallback needs labels in the training batches: set target_key")
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        self._resolve_layers(pl_module, x)
        if self.snapshots_from == "checkpoints" and not getattr(trainer, "checkpoint_callbacks", []):
            raise ValueError(
                "snapshots='checkpoints' reads the ModelCheckpoint files of the run, but the trainer has no"
                " ModelCheckpoint: add ModelCheckpoint(save_top_k=-1) or use snapshots='memory'"
            )
        current = {k: v.detach() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
        try:  # a dry run on two training examples with the current weights
            self._engine(pl_module, [current], [1.0]).score_batch(x, y)
        except (TypeError, ValueError) as err:
            raise ValueError(f"TracInCallback cannot score two training examples: {err}") from err
        except Exception as err:
            raise ValueError(
                f"TracInCallback cannot score two training examples ({type(err).__name__}: {err}); check loss_fn"
                " (outputs, targets) -> per-example losses, input_key and target_key"
            ) from err
        self._render = self._renderable(x[0])

    def _resolve_data(self, trainer: "pl.Trainer") -> None:
        loader = training_dataloader(trainer)
        dataset = self.train_dataset if self.train_dataset is not None else getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "TracInCallback re-reads the training set by position but the training dataloader has no map-style"
                " dataset (an IterableDataset, or several loaders): pass TracInCallback(train_dataset=...)"
            )
        if len(dataset) == 0:
            raise ValueError("TracInCallback: the training dataset is empty")
        self._dataset = dataset
        if isinstance(loader, DataLoader) and self.train_dataset is None:
            self._collate = loader.collate_fn or default_collate
            self._loader_batch_size = loader.batch_size or self._loader_batch_size

    def _resolve_layers(self, pl_module: "pl.LightningModule", x: torch.Tensor) -> None:
        params = dict(pl_module.named_parameters())
        if self.method == "exact":
            if self.layers is None:
                self._scored_names = [n for n, p in params.items() if p.requires_grad]
            else:
                self._scored_names = []
                for name in self.layers:
                    module = resolve_module(pl_module, name, "layers")
                    self._scored_names += [f"{name}.{n}" for n, _ in module.named_parameters()]
            return
        if self.final_layer is not None:
            layer = resolve_module(pl_module, self.final_layer, "final_layer")
            if not isinstance(layer, nn.Linear):
                raise ValueError(
                    f"final_layer={self.final_layer!r} is a {type(layer).__name__}; method='fast' needs an nn.Linear"
                    " (or use method='exact')"
                )
            self._resolved_layer = self.final_layer
        else:
            order = modules_in_execution_order(pl_module, x[:1], predicate=lambda m: isinstance(m, nn.Linear))
            if not order:
                raise ValueError(
                    "method='fast' needs a final nn.Linear but the forward calls none: pass final_layer= or use"
                    " method='exact'"
                )
            self._resolved_layer = order[-1][0]
        self._scored_names = [f"{self._resolved_layer}.weight"]

    def _renderable(self, x: torch.Tensor) -> bool:
        if self.denormalize is None and (x.dim() != 3 or x.shape[0] not in (1, 3)):
            log.info("TracInCallback: the inputs are not (C, H, W) images: only JSON and scalars are logged")
            return False
        check_displayable("TracInCallback", "a training input", x, self.denormalize)
        return True

    # ------------------------------------------------------------------------------------------------------ snapshots
    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = int(trainer.current_epoch)
        max_epochs = getattr(trainer, "max_epochs", None)
        final = bool(trainer.should_stop) or (max_epochs is not None and 0 <= max_epochs - 1 <= epoch)
        if self.snapshots_from == "memory" and (final or (epoch + 1) % self.snapshot_every_n_epochs == 0):
            self._snapshot(trainer, pl_module)
        if final and self.snapshots_from == "memory":
            # the end-of-fit run, while the module is still on its device (Lightning's teardown moves it to the CPU
            # before on_fit_end, which scores only what this missed: a fit ended by max_steps or a late stop)
            self._run(trainer, pl_module, "end of fit", fit_end=True)
        elif self.every_n_epochs is not None and self.is_due(trainer):  # a collective: every rank
            self._run(trainer, pl_module, f"epoch {epoch}", fit_end=False)

    def _snapshot(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = int(trainer.global_step)
        if self.snapshots and self.snapshots[-1].global_step == step:
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        lr = self._lr_sum / self._lr_steps if self._lr_steps else self._learning_rate(trainer, pl_module)
        self._lr_sum, self._lr_steps = 0.0, 0
        self.snapshots.append(WeightSnapshot(int(trainer.current_epoch), step, lr, state))

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # the rate each step trains with: Lightning steps epoch schedulers before on_train_epoch_end runs
        self._lr_sum += self._learning_rate(trainer, pl_module)
        self._lr_steps += 1

    def _learning_rate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> float:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if not optimizers:
            self.warn_once("no optimizer", "TracInCallback found no optimizer: snapshots are weighted with lr=1")
            return 1.0
        if self._lr_group is None or self._lr_group[0] >= len(optimizers):
            self._lr_group = self._find_lr_group(optimizers, pl_module)
        i, j = self._lr_group
        return float(optimizers[i].param_groups[j]["lr"])

    def _find_lr_group(self, optimizers: list[Any], pl_module: "pl.LightningModule") -> tuple[int, int]:
        """(optimizer, param group) holding the scored parameters (found once per fit)."""
        params = dict(pl_module.named_parameters())
        scored = {id(params[n]) for n in self._scored_names if n in params} or {id(p) for p in params.values()}
        found = [
            (i, j, float(group["lr"]))
            for i, optimizer in enumerate(optimizers)
            for j, group in enumerate(optimizer.param_groups)
            if any(id(p) in scored for p in group["params"])
        ]
        if not found:
            return 0, 0
        if len({lr for _, _, lr in found}) > 1:
            self.warn_once(
                "lr groups",
                "TracInCallback: the scored parameters sit in param groups with learning rates"
                f" {sorted({lr for _, _, lr in found})}; snapshots are weighted with the first group's",
            )
        return found[0][0], found[0][1]

    # ------------------------------------------------------------------------------------------------------- scoring
    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._collector.finalize(trainer)  # every rank (a collective for streamed validation data)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.snapshots_from == "memory":
            self._snapshot(trainer, pl_module)
        self._run(trainer, pl_module, "end of fit", fit_end=True)

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", when: str, fit_end: bool) -> None:
        start = time.perf_counter()
        try:
            snapshots = self.run_part(trainer, "snapshots", self._checkpoints, trainer, pl_module) or []
            state = (int(trainer.global_step), len(snapshots))
            proceed = bool(snapshots) and state != self._scored_state  # not twice for the very same snapshots
            if trainer.world_size > 1:  # files seen by some ranks only must not split the collectives below
                proceed = bool(trainer.strategy.reduce_boolean_decision(proceed, all=True))
            if not proceed:
                return
            allowance = self._allowance(fit_end)
            local = self.run_part(
                trainer, "score", self._score_shard, trainer, pl_module, snapshots, allowance, collective=True,
                hint="check loss_fn, the keys and train_dataset",
            )
            if local is None:
                return
            self._scored_state = state
            parts = gather_objects(trainer, local)  # a collective, on every rank
            if trainer.is_global_zero:
                self._report(trainer, pl_module, parts, snapshots, when, time.perf_counter() - start)
        finally:
            self.record_run_cost(time.perf_counter() - start)

    def _allowance(self, fit_end: bool) -> Optional[float]:
        if self.budget.max_overhead is None or (fit_end and not self.budget_fit_end):
            return None
        return max(0.0, self.budget.max_overhead * self.budget.training_seconds() - self.budget.spent)

    def _checkpoints(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[WeightSnapshot]:
        if self.snapshots_from == "memory":
            return list(self.snapshots)
        found: dict[int, WeightSnapshot] = {}
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            dirpath = getattr(callback, "dirpath", None)
            for path in sorted(glob.glob(os.path.join(os.fspath(dirpath), "*.ckpt"))) if dirpath else []:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                step = int(saved.get("global_step", -1))
                if step < 0 or step > int(trainer.global_step) or step in found:
                    continue  # not a Lightning checkpoint of this run, or a copy (last.ckpt) of one already read
                lr = checkpoint_learning_rate(saved)
                if lr is None:
                    raise ValueError(f"{path} records no learning rate (no optimizer state); save with optimizers")
                found[step] = WeightSnapshot(int(saved.get("epoch", -1)), step, lr, saved["state_dict"])
        if not found:
            self.warn_once("no files", "TracInCallback(snapshots='checkpoints') found no .ckpt files to read")
        return [found[s] for s in sorted(found)]

    def _engine(self, pl_module: nn.Module, states: list[Mapping[str, torch.Tensor]], rates: list[float]) -> TracInCP:
        batch_size = self.batch_size or self._loader_batch_size
        if self.method == "fast":
            assert self._resolved_layer is not None
            return TracInCPFast(pl_module, self._resolved_layer, states, rates, self.loss_fn, batch_size=batch_size)
        return TracInCP(pl_module, states, rates, self.layers, self.loss_fn, self.projection_dim, self.seed,
                        batch_size=batch_size)

    def _read_positions(self, positions: Sequence[int]) -> Any:
        return self._collate([self._dataset[int(p)] for p in positions])

    def _plan(self, trainer: "pl.Trainer", budgeted: bool) -> torch.Tensor:
        """The dataset positions this rank scores, in order (see the class docstring)."""
        n = len(self._dataset)
        gen = torch.Generator().manual_seed(self.seed)
        if self.max_train_samples is not None and self.max_train_samples < n:
            positions = torch.randperm(n, generator=gen)[: self.max_train_samples].sort().values
        else:
            positions = torch.arange(n)
        if budgeted:  # a time-limited prefix of a random order is a random subset
            positions = positions[torch.randperm(len(positions), generator=gen)]
        world, rank = max(1, int(trainer.world_size)), int(trainer.global_rank)
        return positions[rank::world]

    def _score_shard(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        snapshots: list[WeightSnapshot],
        allowance: Optional[float],
    ) -> dict[str, Any]:
        start = time.perf_counter()
        if self._dataset is None:
            self._resolve_data(trainer)
        engine = self._engine(pl_module, [s.state for s in snapshots], [s.learning_rate for s in snapshots])
        device = pl_module.device
        probes = self.probes
        test = None
        if probes is not None and len(probes):
            px = probes.inputs.to(device)
            py = probes.targets.to(device) if probes.targets is not None and self.probe_target == "label" else None
            if py is None:
                if self.probe_target == "label":
                    self.warn_once("probe labels", "TracInCallback: the probes have no labels: predictions are used")
                py = self._predict(pl_module, px)
            test = engine.prepare(px, py)
        positions = self._plan(trainer, allowance is not None)
        planned = len(positions)
        batch_size = self.batch_size or self._loader_batch_size
        rows: list[tuple[torch.Tensor, ...]] = []
        done = 0
        with global_rng_preserved():  # dataset transforms, loader seeds: the training's streams stay untouched
            for b0 in range(0, planned, batch_size):
                chunk = positions[b0 : b0 + batch_size]
                batch = self._read_positions(chunk.tolist())
                batch = trainer.strategy.batch_to_device(batch, device)
                x, y = self.accessor.inputs(batch), self.accessor.targets(batch)
                if y is None:
                    raise ValueError("a training batch holds no labels; set target_key")
                ids = self.accessor.indices(batch)
                scores = engine.score_batch(x, y, test)
                rows.append((
                    chunk.clone(),
                    (chunk if ids is None else ids.reshape(-1)).long().cpu().clone(),
                    scores.self_influence,
                    torch.zeros(len(chunk), 0) if scores.influence is None else scores.influence.T.contiguous(),
                    y.detach().reshape(len(chunk), -1)[:, 0].long().cpu().clone(),
                    self._predict(pl_module, x).cpu(),
                ))
                done += len(chunk)
                elapsed = time.perf_counter() - start
                if allowance is not None and done < planned and elapsed * (1 + len(chunk) / done) > allowance:
                    break  # the next batch would not fit the budget
        names = ("positions", "ids", "self_influence", "influence", "labels", "predictions")
        local = {name: torch.cat([r[i] for r in rows]) for i, name in enumerate(names)}
        local["planned"] = planned
        return local

    def _predict(self, pl_module: "pl.LightningModule", x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), preserve_modes(pl_module, mode=False):
            out = pl_module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError("TracInCallback reads predictions as argmax of (batch, classes) outputs of the module")
        return out.argmax(1).detach()

    # ------------------------------------------------------------------------------------------------------ reporting
    def _report(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        parts: list[Any],
        snapshots: list[WeightSnapshot],
        when: str,
        seconds: float,
    ) -> None:
        parts = [p for p in parts if p is not None]
        names = ("ids", "self_influence", "influence", "labels", "predictions")
        positions = torch.cat([p["positions"] for p in parts])
        columns = dedupe_by_id(positions, *(torch.cat([p[n] for p in parts]) for n in names))
        order = torch.argsort(columns[0])
        positions, ids, self_influence, influence, labels, predictions = (c[order] for c in columns)
        planned = sum(int(p["planned"]) for p in parts)
        ranked, excluded = rank_by_self_influence(self_influence)
        report = TracInReport(
            when, [s.epoch for s in snapshots], [s.learning_rate for s in snapshots], positions, ids, self_influence,
            labels, predictions, ranked, planned, excluded,
        )
        if influence.shape[1] > 0:
            report.influence = influence.T.contiguous()
            report.proponents = top_influence(report.influence, self.k, largest=True)[0]
            report.opponents = top_influence(report.influence, self.k, largest=False)[0]
        self.last_report = report
        if excluded:
            self.warn_once("nonfinite", f"TracInCallback: {excluded} training examples had NaN/inf scores and were"
                                        " left out of the ranking (counted in tracin/excluded_nonfinite)")
        if len(positions) < planned:
            self.warn_once(
                "subset",
                f"TracInCallback scored {len(positions)} of {planned} training examples ({when}) to stay within"
                f" max_overhead={self.budget.max_overhead}; pass budget_fit_end=False to score all of them at the end"
                " of fit (it runs after the last training step), or raise max_overhead",
            )
        top = ranked[: self.num_top]
        metrics = {
            "num_checkpoints": float(len(snapshots)),
            "scored_examples": float(len(positions)),
            "scored_fraction": len(positions) / max(1, planned),
            "self_influence_mean": float(self_influence[ranked].mean()) if len(ranked) else float("nan"),
            "self_influence_max": float(self_influence[ranked[0]]) if len(ranked) else float("nan"),
            "top_label_disagreement": float((labels[top] != predictions[top]).float().mean()) if len(top) else 0.0,
            "excluded_nonfinite": float(excluded),
            "seconds": seconds,
        }
        self.last_metrics = {f"{self.log_prefix}/{k}": v for k, v in metrics.items()}
        log.log(  # the run at the end of fit is reported by the end-of-fit summary
            logging.DEBUG if when == "end of fit" else logging.INFO,
            f"TracInCallback ({when}): {len(positions)} training examples scored over {len(snapshots)} snapshots;"
            f" most self-influential ids {report.ranked_ids[:5]}"
        )
        self.run_part(trainer, "json", self._log_json, trainer, report)
        if self._render and len(top):
            self.run_part(trainer, "gallery", self._log_self_gallery, trainer, report, top,
                          hint="check denormalize and train_dataset")
        if self._render and report.influence is not None and self.probes is not None:
            self.run_part(trainer, "probe galleries", self._log_probe_galleries, trainer, pl_module, report,
                          hint="check denormalize and train_dataset")
        self.run_part(trainer, "scalars", log_scalars, trainer, self.last_metrics)

    def _input(self, position: int) -> torch.Tensor:
        return self.accessor.inputs(self._read_positions([position]))[0]

    def _log_json(self, trainer: "pl.Trainer", report: TracInReport) -> None:
        r = report.ranked
        log_json(trainer, f"{self.log_prefix}/self_influence", {
            "when": report.when,
            "snapshot_epochs": report.epochs,
            "learning_rates": report.learning_rates,
            "planned": report.planned,
            "excluded_nonfinite": report.excluded_nonfinite,
            "ids": report.ids[r].tolist(),
            "positions": report.positions[r].tolist(),
            "self_influence": report.self_influence[r].tolist(),
            "labels": report.labels[r].tolist(),
            "predictions": report.predictions[r].tolist(),
        })
        if report.influence is not None and self.probes is not None:
            probes = self.probes
            entries = []
            for i in range(report.influence.shape[0]):
                entry: dict[str, Any] = {
                    "probe_index": None if probes.indices is None else int(probes.indices[i]),
                    "label": None if probes.targets is None else int(probes.targets[i]),
                }
                for kind, rows in (("proponents", report.proponents), ("opponents", report.opponents)):
                    assert rows is not None
                    valid = rows[i][rows[i] >= 0]
                    entry[kind] = report.ids[valid].tolist()
                    entry[f"{kind}_positions"] = report.positions[valid].tolist()
                    entry[f"{kind}_scores"] = report.influence[i, valid].tolist()
                entries.append(entry)
            log_json(trainer, f"{self.log_prefix}/probes", {"when": report.when, "probes": entries})

    def _log_self_gallery(self, trainer: "pl.Trainer", report: TracInReport, top: torch.Tensor) -> None:
        image = self_influence_gallery(
            [self._input(int(report.positions[i])) for i in top], report.ids[top].tolist(),
            report.labels[top].tolist(), report.predictions[top].tolist(), report.self_influence[top].tolist(),
            self.denormalize,
        )
        log_image(trainer, f"{self.log_prefix}/self_influence", image)

    def _log_probe_galleries(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", report: TracInReport
    ) -> None:
        probes = self.probes
        assert probes is not None and report.influence is not None
        predictions = self._predict(pl_module, probes.inputs.to(pl_module.device)).cpu()
        for kind, rows in (("proponents", report.proponents), ("opponents", report.opponents)):
            assert rows is not None
            safe = rows.clamp(min=0)
            inputs = [[self._input(int(report.positions[j])) for j in rows[i] if j >= 0] for i in range(len(rows))]
            image = influence_gallery(
                probes.inputs, probes.targets, predictions, inputs, report.ids[safe], report.labels[safe],
                report.influence.gather(1, safe), kind=kind, denormalize=self.denormalize,
            )
            log_image(trainer, f"{self.log_prefix}/{kind}", image)

    # ----------------------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "snapshots": [dataclasses.asdict(s) for s in self.snapshots],
            "scored_state": self._scored_state,
            "lr_since_snapshot": (self._lr_sum, self._lr_steps),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.snapshots = [WeightSnapshot(**s) for s in state_dict.get("snapshots", [])]
        scored = state_dict.get("scored_state")
        self._scored_state = None if scored is None else tuple(scored)  # type: ignore[assignment]
        self._lr_sum, self._lr_steps = state_dict.get("lr_since_snapshot", (0.0, 0))

    def summary(self) -> Optional[str]:
        """The last scoring run: what was scored and the most self-influential training ids."""
        from lightning_lens.report.summaries import tracin_summary

        report = self.last_report
        if report is None:
            return None
        top = report.ranked[: self.num_top]
        disagreement = float((report.labels[top] != report.predictions[top]).float().mean()) if len(top) else None
        return tracin_summary(report.when, len(report.positions), report.planned, len(report.epochs),
                              report.ranked_ids, disagreement)
