r"""
Privacy audit during training
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

How well a threshold attack tells training samples from held-out ones, epoch by epoch, from the loss and from the
explanations the run may log or serve (Shokri, Strobel & Zick 2021, "On the Privacy Risks of Model Explanations").
The statistics, directions, AUC and TPR at low FPR are :mod:`lightning_lens.privacy`'s; this callback reads a fixed
subset of the training data (members) and as many validation samples (non-members), and logs.

Tags written (``privacy`` is ``log_prefix``, ``<s>`` a statistic such as ``loss`` or ``gradient_variance``):

=================================  ====================================================================================
``privacy/<s>/auc``                scalar: ROC AUC of the threshold attack (0.5: no leak; a curve over epochs)
``privacy/<s>/tpr_at_fpr``         scalar: true-positive rate at ``fpr`` false positives (default 1 %)
``privacy/<s>/excluded``           scalar: NaN/inf values left out (members plus non-members)
``privacy/attacks``                table: one row per statistic (direction, AUC, TPR, threshold, counts)
=================================  ====================================================================================
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate
from typing_extensions import override

from lightning_lens._pl import pl
from lightning_lens.attribution.registry import MethodSpec, method_specs
from lightning_lens.callbacks._base import LensCallback, log
from lightning_lens.callbacks._gather import dedupe_by_id, gather_objects
from lightning_lens.callbacks.knn_memory import training_dataloader
from lightning_lens.loggers import log_scalars, log_table, sanitize_tag
from lightning_lens.privacy.membership import (
    DIRECTIONS,
    SCORES,
    ThresholdAttack,
    attacks_from_statistics,
    membership_statistics,
)
from lightning_lens.utils import BatchAccessor
from lightning_lens.utils.checks import (
    check_choice,
    check_float,
    check_instance,
    check_int,
    check_key,
    check_str_list,
)
from lightning_lens.utils.rng import global_rng_preserved

__all__ = ["PrivacyAuditCallback"]

_GROUPS = ("members", "non_members")


class PrivacyAuditCallback(LensCallback):
    """Membership-inference AUCs of the loss and of explanation statistics, every ``every_n_epochs`` epochs (see the
    module docstring for the tags).

    **Samples.** ``num_samples`` training samples (members) and as many validation samples (non-members) are drawn
    once, by dataset position, with private generators seeded by ``seed`` (so 1 and N processes use the same ones).
    Each due epoch, at the end of validation, the statistics of these samples are computed with the current weights
    (the loss under ``no_grad``; the explanation statistics through ``method``'s template, which asks autograd for
    input gradients only and restores every mode); the global RNGs are restored after reading the data. Under DDP each
    rank computes every ``world_size``-th sample of both sets; rank zero gathers, de-duplicates by position and
    attacks, so the AUCs equal a single process's.

    **Warnings.** When a statistic's AUC passes ``warn_auc``, a warning (once per statistic) says so: the model (or
    the explanations it serves) tells its training samples apart.

    Args:
        every_n_epochs: audit every n-th epoch (the first and last epoch of fit and ``trainer.validate()`` always).
        num_samples: members and non-members each (fewer if a dataset is smaller).
        statistics: names from :data:`lightning_lens.privacy.DIRECTIONS`.
        method: the explanation behind the gradient statistics (any registered method spec).
        score: what the explanation statistics differentiate: ``"probability"`` (the label's softmax probability, as
            Shokri et al. 2021; the default), ``"log_probability"`` or ``"logit"`` (see
            :mod:`lightning_lens.privacy.membership`).
        warn_auc: AUC above which a statistic is reported as leaking.
        fpr: the false-positive rate the true-positive rate is read at.
        seed: seed of the draw of the samples.
        batch_size: samples per forward.
        train_dataset: the (map-style) members' source; default: the training dataloader's dataset.
        val_dataset: the non-members' source; default: the first validation dataloader's dataset.
        input_key, target_key: where inputs and labels are in collated items (see ``BatchAccessor``).
        log_prefix: first component of every logged tag.
        max_overhead, strict, verbose, max_failures: see :class:`~lightning_lens.callbacks._base.LensCallback`.

    Example:
        >>> audit = PrivacyAuditCallback(num_samples=64, statistics=["loss", "gradient_variance"])
        >>> audit.statistics
        ('loss', 'gradient_variance')
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 128,
        statistics: Sequence[str] = ("loss", "gradient_norm", "gradient_variance"),
        method: MethodSpec = "gradient",
        score: str = "probability",
        warn_auc: float = 0.6,
        fpr: float = 0.01,
        seed: int = 0,
        batch_size: int = 64,
        train_dataset: Any = None,
        val_dataset: Any = None,
        input_key: Any = None,
        target_key: Any = None,
        log_prefix: str = "privacy",
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
        max_failures: int = 3,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, max_overhead=max_overhead, strict=strict, verbose=verbose,
            max_failures=max_failures,
        )
        self.num_samples = check_int(num_samples, "num_samples", minimum=2)
        self.statistics = check_str_list(statistics, "statistics")
        unknown = [s for s in self.statistics if s not in DIRECTIONS]
        if unknown or not self.statistics or len(set(self.statistics)) != len(self.statistics):
            raise ValueError(
                f"statistics must name each of {sorted(DIRECTIONS)} at most once, got {list(self.statistics)}"
            )
        (self.method_label, self.method), = method_specs(method, "method", allow_single=True)
        self.score = check_choice(check_instance(score, "score", str), "score", SCORES)
        self.warn_auc = check_float(warn_auc, "warn_auc", minimum=0.0, maximum=1.0)
        self.fpr = check_float(fpr, "fpr", minimum=0.0, maximum=1.0)
        self.seed = check_int(seed, "seed")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        for name, dataset in (("train_dataset", train_dataset), ("val_dataset", val_dataset)):
            if dataset is not None and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
                raise TypeError(f"{name} must be a map-style Dataset (indexable, with a length), got"
                                f" {type(dataset).__name__}")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.accessor = BatchAccessor(check_key(input_key, "input_key"), check_key(target_key, "target_key"))
        self.log_prefix = sanitize_tag(check_instance(log_prefix, "log_prefix", str))
        if not self.log_prefix:
            raise ValueError(f"log_prefix must contain letters or digits, got {log_prefix!r}")
        self.history: list[dict[str, Any]] = []  #: one entry per audit: epoch, step and every statistic's AUC
        self.last_attacks: dict[str, ThresholdAttack] = {}
        self.last_statistics: dict[str, dict[str, torch.Tensor]] = {}
        self._sources: dict[str, Any] = {}
        self._positions: dict[str, torch.Tensor] = {}
        self._collate: dict[str, Any] = {}
        self._active = False

    def _state_key_fields(self) -> dict[str, Any]:
        return {"log_prefix": self.log_prefix}

    # ----------------------------------------------------------------------------------------------------------- setup
    @override
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        self._active = False
        train = self.train_dataset if self.train_dataset is not None else self._loader_dataset(
            training_dataloader(trainer), "train")
        val = self.val_dataset if self.val_dataset is not None else self._loader_dataset(
            _first_loader(getattr(trainer, "val_dataloaders", None)), "val")
        if val is None and self.val_dataset is None:  # at on_fit_start the loop has not set its loaders up yet
            val = self._loader_dataset(_validation_source(trainer), "val")
        if train is None or val is None:
            missing = "train_dataset" if train is None else "val_dataset"
            if trainer.state.fn != "fit":
                self.warn_once("no data", f"PrivacyAuditCallback: no {missing.split('_')[0]} data to audit under"
                                          f" trainer.{trainer.state.fn}(); pass {missing}= to audit there")
                return
            raise ValueError(
                f"PrivacyAuditCallback reads members from the training data and non-members from the validation data"
                f" by position, but found no map-style {missing.split('_')[0]} dataset: pass {missing}=..."
            )
        self._sources = {"members": train, "non_members": val}
        n = min(self.num_samples, len(train), len(val))
        if n < 1:
            raise ValueError("PrivacyAuditCallback: the training or validation dataset is empty")
        self._positions = {
            group: torch.randperm(len(source), generator=torch.Generator().manual_seed(self.seed + i))[:n].sort().values
            for i, (group, source) in enumerate(self._sources.items())
        }
        try:  # a dry run on two members
            self._statistics_of(trainer, pl_module, "members", self._positions["members"][:2])
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(
                f"PrivacyAuditCallback cannot compute {list(self.statistics)} with method={self.method_label!r} and"
                f" score={self.score!r} on two training samples: {err}; check method, score, input_key and target_key"
            ) from err
        self._active = True

    def _loader_dataset(self, loader: Any, which: str) -> Any:
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        self._collate[which] = (loader.collate_fn if isinstance(loader, DataLoader) else None) or default_collate
        return dataset

    # ---------------------------------------------------------------------------------------------------------- audit
    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active or not self.is_due(trainer):  # _active is the same on every rank (same data, same checks)
            return
        start = time.perf_counter()
        try:
            local = self.run_part(trainer, "statistics", self._local_statistics, trainer, pl_module, collective=True,
                                  hint="check method and the batch keys")
            if local is None:
                return
            parts = gather_objects(trainer, local)  # a collective, on every rank
            if trainer.is_global_zero:
                self.run_part(trainer, "report", self._report, trainer, parts)
        finally:
            self.record_run_cost(time.perf_counter() - start)

    def _local_statistics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
        world, rank = max(1, int(trainer.world_size)), int(trainer.global_rank)
        return {
            group: self._statistics_of(trainer, pl_module, group, self._positions[group][rank::world])
            for group in _GROUPS
        }

    def _statistics_of(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", group: str, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        source = self._sources[group]
        collate = self._collate.get("train" if group == "members" else "val", default_collate)
        columns: dict[str, list[torch.Tensor]] = {s: [] for s in self.statistics}
        with global_rng_preserved():  # item transforms must not move the training's random streams
            for b0 in range(0, len(positions), self.batch_size):
                chunk = positions[b0 : b0 + self.batch_size]
                batch = collate([source[int(p)] for p in chunk])
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                x, y = self.accessor.inputs(batch), self.accessor.targets(batch)
                if y is None:
                    raise ValueError("the samples hold no labels; set target_key")
                stats = membership_statistics(pl_module, x, torch.as_tensor(y).reshape(-1), self.statistics,
                                              self.method, score=self.score)
                for s in self.statistics:
                    columns[s].append(stats[s])
        out = {s: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for s, v in columns.items()}
        out["positions"] = positions.clone()
        return out

    # ------------------------------------------------------------------------------------------------------ reporting
    def _report(self, trainer: "pl.Trainer", parts: list[Any]) -> None:
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for group in _GROUPS:
            positions = torch.cat([p[group]["positions"] for p in parts])
            columns = dedupe_by_id(positions, *(torch.cat([p[group][s] for p in parts]) for s in self.statistics))
            order = torch.argsort(columns[0])
            merged[group] = {"positions": columns[0][order]}
            merged[group].update({s: c[order] for s, c in zip(self.statistics, columns[1:])})
        attacks = attacks_from_statistics(
            {s: merged["members"][s] for s in self.statistics},
            {s: merged["non_members"][s] for s in self.statistics},
            self.fpr,
        )
        self.last_statistics, self.last_attacks = merged, attacks
        epoch = int(trainer.current_epoch)
        self.history.append({"epoch": epoch, "step": int(trainer.global_step),
                             **{s: a.auc for s, a in attacks.items()}})
        metrics: dict[str, float] = {}
        for s, a in attacks.items():
            metrics[f"{self.log_prefix}/{s}/auc"] = a.auc
            metrics[f"{self.log_prefix}/{s}/tpr_at_fpr"] = a.tpr_at_fpr
            metrics[f"{self.log_prefix}/{s}/excluded"] = float(a.excluded_members + a.excluded_non_members)
            if a.auc > self.warn_auc:
                self.warn_once(
                    f"leak:{s}",
                    f"PrivacyAuditCallback: a threshold attack on {s} tells training samples from validation samples"
                    f" with AUC {a.auc:.3f} > warn_auc={self.warn_auc} at epoch {epoch}: "
                    + ("the model's losses" if s == "loss" else f"the model's {self.method_label} explanations")
                    + " leak membership; consider regularisation, early stopping or DP training",
                )
        log.info(
            "PrivacyAuditCallback (epoch %d): membership AUCs %s",
            epoch, ", ".join(f"{s} {a.auc:.3f}" for s, a in attacks.items()),
        )
        log_scalars(trainer, metrics)
        columns = ["statistic", "direction", "auc", "tpr_at_fpr", "threshold", "members", "non_members", "excluded"]
        rows = [[a.statistic, a.direction, a.auc, a.tpr_at_fpr, a.threshold, a.n_members, a.n_non_members,
                 a.excluded_members + a.excluded_non_members] for a in attacks.values()]
        log_table(trainer, f"{self.log_prefix}/attacks", columns, rows,
                  legend=f"threshold attacks, members flagged on the 'direction' side of 'threshold';"
                         f" tpr_at_fpr at fpr={self.fpr:g}; method {self.method_label} of the label's {self.score}")

    # ----------------------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders


def _validation_source(trainer: "pl.Trainer") -> Any:
    """The first validation loader before the loop has set it up (at ``on_fit_start``), or None."""
    loop = trainer.fit_loop.epoch_loop.val_loop if trainer.state.fn == "fit" else trainer.validate_loop
    try:
        source = loop._data_source  # a private API, as in _base.first_validation_batch
        return _first_loader(source.dataloader()) if source.is_defined() else None
    except Exception:
        return None
