"""RoutingMonitor: how every mixture-of-experts layer routes the validation data, and what each expert is for."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_lens._pl import Callback, pl, rank_zero_warn
from lightning_lens.callbacks._gather import dedupe_by_id, gather_rows
from lightning_lens.interpretable_models.moe import (
    ExpertAblation,
    MixtureOfExperts,
    RoutingRecord,
    RoutingStatistics,
    ablation_accuracy,
    ablation_predictions,
    moe_layers,
    routing_statistics,
)
from lightning_lens.utils import BatchAccessor, resolve_module
from lightning_lens.utils.checks import check_int

__all__ = ["RoutingMonitor"]

# columns of the per-token rows: sample id, call of the layer within the step, token position, label, then the k
# experts and the k kept flags
_ID, _CALL, _POS, _LABEL, _FIXED = 0, 1, 2, 3, 4


class RoutingMonitor(Callback):
    """Logs the routing of every :class:`~lightning_lens.interpretable_models.MixtureOfExperts` layer at the end of
    each validation epoch, and every ``ablation_every_n_epochs`` epochs what masking each expert costs per class.

    While the validation loop runs it turns ``record_routing`` on for each MoE layer (restoring the previous value
    afterwards) and keeps, per token of dataloader 0, the chosen experts, whether capacity dropped them, and the
    example's label (a ``(B,)`` label is shared by the ``T`` tokens of a ``(B, T, D)`` input; ``(B, T)`` labels are
    used per token). Then, for each layer, named by its module path ``<layer>``, it logs through
    :mod:`lightning_lens.loggers`:

    - scalars ``moe/<layer>/load_cv`` (coefficient of variation of assignments per expert), ``usage_entropy``
      (normalized to [0, 1]), ``max_top1_share``, ``dead_experts``, ``drop_rate``, ``balance_loss`` and ``z_loss``
      (token-weighted means over the epoch), ``load/expert_<i>``;
    - with integer labels: ``nmi`` (normalized mutual information between top-1 expert and label), ``mean_purity``
      and ``purity/expert_<i>`` (share of the expert's tokens in its most common class), and the figure
      ``moe/<layer>/expert_class_counts`` (expert x class counts of top-1 routing);
    - every ``ablation_every_n_epochs`` epochs (and on every ``trainer.validate``): each expert in turn is masked out
      of routing (``masked_experts``: tokens go to their best remaining experts; no parameter changes) on the first
      ``ablation_samples`` validation examples; scalars ``moe/<layer>/ablation/acc_drop/expert_<i>`` (overall
      accuracy drop), the figure ``moe/<layer>/ablation/acc_drop`` (expert x class accuracy drop) and the table
      ``moe/<layer>/ablation/summary``.

    It warns (``rank_zero_warn``) when a layer's routing collapses: one expert is the top-1 choice of more than
    ``collapse_threshold`` of the tokens. Results stay available as ``last_statistics`` and ``last_ablation``.

    Training is untouched: recording only stores detached tensors, the ablation runs without gradients in eval mode
    (modes and masks restored), and gating noise only exists in training mode. Under DDP every rank gathers all
    ranks' rows; tokens of samples a ``DistributedSampler`` repeats are dropped by sample index when batches carry
    one (``index_key``), else they are counted twice (at most ``world_size - 1`` samples); every rank computes, rank
    zero logs. Only validation dataloader 0 is used.

    Args:
        layers: dotted names of the MoE layers to monitor (default: every MoE layer of the LightningModule).
        num_classes: number of classes (default: ``max(label) + 1`` over the epoch).
        class_names: labels of the classes in figures and tables.
        collapse_threshold: warn when one expert is the top-1 expert of more than this share of tokens, in (0, 1].
        ablation_every_n_epochs: run the per-expert ablation on validation epochs ``n - 1, 2n - 1, ...``; ``None`` or
            0 never.
        ablation_samples: validation examples the ablation uses (the first ones of dataloader 0).
        ablation_batch_size: examples per forward pass in the ablation.
        forward_fn: ``forward_fn(pl_module, inputs) -> logits`` for the ablation (default ``pl_module(inputs)``);
            predictions are the argmax of the last dimension.
        max_tokens: tokens kept per layer and epoch (later ones are not counted; a warning says so).
        log_figures: log the heatmaps (scalars and tables are always logged).
        input_key, target_key, index_key: where batches hold inputs, labels and sample indices
            (see :class:`~lightning_lens.utils.BatchAccessor`).

    Example:
        >>> monitor = RoutingMonitor(ablation_every_n_epochs=5, collapse_threshold=0.6)
        >>> # Trainer(callbacks=[monitor], logger=TensorBoardLogger("logs")).fit(model_with_moe_layers, ...)
    """

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        collapse_threshold: float = 0.6,
        ablation_every_n_epochs: Optional[int] = 5,
        ablation_samples: int = 512,
        ablation_batch_size: int = 256,
        forward_fn: Optional[Callable[["pl.LightningModule", torch.Tensor], torch.Tensor]] = None,
        max_tokens: int = 2_000_000,
        log_figures: bool = True,
        input_key: Union[int, str, Callable[[Any], Any], None] = None,
        target_key: Union[int, str, Callable[[Any], Any], None] = None,
        index_key: Union[int, str, Callable[[Any], Any], None] = None,
    ) -> None:
        super().__init__()
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError("layers must be a sequence of dotted module names, e.g. ['model.moe1'], or None")
        if num_classes is not None:
            check_int(num_classes, "num_classes", minimum=1)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        if isinstance(collapse_threshold, bool) or not isinstance(collapse_threshold, (int, float)) \
                or not 0 < collapse_threshold <= 1:
            raise ValueError(f"collapse_threshold must be a share in (0, 1], got {collapse_threshold!r}")
        if ablation_every_n_epochs is not None and (isinstance(ablation_every_n_epochs, bool)
                                                    or not isinstance(ablation_every_n_epochs, int)
                                                    or ablation_every_n_epochs < 0):
            raise ValueError(f"ablation_every_n_epochs must be an int >= 0 or None, got {ablation_every_n_epochs!r}")
        for name, value in (("ablation_samples", ablation_samples), ("ablation_batch_size", ablation_batch_size),
                            ("max_tokens", max_tokens)):
            check_int(value, name, minimum=1)
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(
                f"forward_fn must be callable(pl_module, inputs) -> logits, got {type(forward_fn).__name__}"
            )
        self.layer_names = None if layers is None else list(layers)
        self.num_classes = num_classes
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.collapse_threshold = float(collapse_threshold)
        self.ablation_every_n_epochs = ablation_every_n_epochs or 0
        self.ablation_samples = ablation_samples
        self.ablation_batch_size = ablation_batch_size
        self.forward_fn = forward_fn
        self.max_tokens = max_tokens
        self.log_figures = log_figures
        self.accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self.last_statistics: dict[str, RoutingStatistics] = {}
        self.last_ablation: dict[str, ExpertAblation] = {}
        self._layers: list[tuple[str, MixtureOfExperts]] = []
        self._hooks: list[Any] = []
        self._saved_flags: list[tuple[MixtureOfExperts, bool]] = []
        self._collecting = False
        self._in_batch = False
        self._pending: list[tuple[str, RoutingRecord, float, float]] = []
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._losses: dict[str, list[tuple[float, float, float]]] = {}
        self._tokens: dict[str, int] = {}
        self._samples: list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self._num_samples = 0
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._layers = self._find_layers(pl_module)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop()
        if trainer.sanity_checking:
            return
        if not self._layers:
            self._layers = self._find_layers(pl_module)
        self._rows = {name: [] for name, _ in self._layers}
        self._losses = {name: [] for name, _ in self._layers}
        self._tokens = {name: 0 for name, _ in self._layers}
        self._samples, self._num_samples = [], 0
        self._saved_flags = [(layer, layer.record_routing) for _, layer in self._layers]
        for name, layer in self._layers:
            layer.record_routing = True
            self._hooks.append(layer.register_forward_hook(self._make_hook(name)))
        self._collecting = True

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pending = []
        self._in_batch = self._collecting and dataloader_idx == 0

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._in_batch:
            return
        self._in_batch = False
        labels, ids = self.accessor.targets(batch), self.accessor.indices(batch)
        calls: dict[str, int] = {}
        for name, record, balance, z in self._pending:  # a layer may run several times in one step
            self._add_record(name, calls.setdefault(name, 0), record, labels, ids, balance, z)
            calls[name] += 1
        self._pending = []
        if self._ablation_due(trainer) and self._num_samples < self.ablation_samples:
            x = self.accessor.inputs(batch)
            take = min(x.shape[0], self.ablation_samples - self._num_samples)
            self._samples.append((
                x[:take].detach().cpu().clone(),
                None if labels is None else labels[:take].detach().cpu().clone(),
                None if ids is None else ids[:take].detach().cpu().clone(),
            ))
            self._num_samples += take

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._collecting:
            return
        try:
            self._stop()
            self.last_statistics = {}
            for name, layer in self._layers:
                stats = self._layer_statistics(trainer, pl_module, name, layer)
                if stats is not None:
                    self.last_statistics[name] = stats
            if self._ablation_due(trainer):
                self.last_ablation = self._ablation(trainer, pl_module)
        finally:
            self._rows, self._losses, self._samples = {}, {}, []

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stop()

    # -------------------------------------------------------------------------------------------------- collecting
    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._in_batch and module.last_routing is not None:
                self._pending.append((name, module.last_routing, float(module.balance_loss.detach()),
                                      float(module.z_loss.detach())))
        return hook

    def _stop(self) -> None:
        """Remove the hooks and restore every layer's ``record_routing`` (idempotent)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer, flag in self._saved_flags:
            layer.record_routing = flag
        self._saved_flags = []
        self._collecting = self._in_batch = False
        self._pending = []

    def _add_record(self, name: str, call: int, record: RoutingRecord, labels: Optional[torch.Tensor],
                    ids: Optional[torch.Tensor], balance: float, z: float) -> None:
        lead = record.experts.shape[:-1]
        n = record.num_tokens
        self._losses[name].append((float(n), balance, z))
        if self._tokens[name] >= self.max_tokens:
            self._warn_once(f"max_tokens/{name}", f"RoutingMonitor: layer {name!r} saw more than max_tokens="
                                                  f"{self.max_tokens} tokens this epoch; later tokens are not counted")
            return
        batch = lead[0] if len(lead) else 1
        per_sample = n // max(batch, 1)
        position = torch.arange(per_sample).repeat(batch)
        label_col = torch.full((n,), -1, dtype=torch.long)
        if labels is not None:
            label_col = self._token_labels(name, labels.cpu(), lead, label_col)
        id_col = torch.full((n,), -1, dtype=torch.long)
        if ids is not None and ids.numel() == batch:
            id_col = ids.cpu().long().repeat_interleave(per_sample)
        rows = torch.cat([id_col[:, None], torch.full((n, 1), call), position[:, None], label_col[:, None],
                          record.experts.reshape(n, -1).cpu().long(), record.kept.reshape(n, -1).cpu().long()],
                         dim=1)
        self._rows[name].append(rows)  # on the CPU: an epoch of tokens should not hold accelerator memory
        self._tokens[name] += n

    def _token_labels(self, name: str, labels: torch.Tensor, lead: torch.Size, default: torch.Tensor) -> torch.Tensor:
        if labels.is_floating_point() or labels.is_complex():
            self._warn_once("float_labels", "RoutingMonitor: the labels are not integer class indices (a regression "
                                            "target?); class metrics (NMI, purity, heatmap, ablation) are skipped")
            return default
        labels = labels.long()
        if tuple(labels.shape) == tuple(lead):
            return labels.reshape(-1)
        if labels.dim() == 1 and len(lead) >= 1 and labels.shape[0] == lead[0]:
            return labels.repeat_interleave(default.shape[0] // max(lead[0], 1))
        self._warn_once(f"label_shape/{name}", f"RoutingMonitor: labels of shape {tuple(labels.shape)} do not match "
                                               f"the tokens {tuple(lead)} of layer {name!r}; its class metrics are "
                                               "skipped")
        return default

    # ---------------------------------------------------------------------------------------------------- metrics
    def _layer_statistics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", name: str,
                          layer: MixtureOfExperts) -> Optional[RoutingStatistics]:
        k = layer.k
        local = torch.cat(self._rows[name]) if self._rows[name] else torch.zeros(0, _FIXED + 2 * k, dtype=torch.long)
        rows = gather_rows(trainer, local.to(pl_module.device)).cpu()
        losses = gather_rows(trainer, torch.tensor(self._losses[name] or [[0.0, 0.0, 0.0]], dtype=torch.float64,
                                                   device=pl_module.device)).cpu()
        if trainer.world_size > 1:
            rows = self._dedupe(rows)
        if rows.shape[0] == 0:
            return None
        labels = rows[:, _LABEL]
        has_labels = bool((labels >= 0).any())
        num_classes = self._num_classes(labels) if has_labels else None
        stats = routing_statistics(rows[:, _FIXED:_FIXED + k], layer.num_experts, kept=rows[:, _FIXED + k:].bool(),
                                   labels=labels if has_labels else None, num_classes=num_classes)
        tokens = losses[:, 0].sum()
        if stats.max_top1_share > self.collapse_threshold:
            top = int(stats.top1_share.argmax())
            rank_zero_warn(
                f"RoutingMonitor: the routing of MoE layer {name!r} collapsed: expert {top} is the top-1 expert of "
                f"{stats.max_top1_share:.0%} of the validation tokens (collapse_threshold="
                f"{self.collapse_threshold:.0%}); raise balance_loss_weight, add moe_aux_loss to the training loss or "
                "enable noisy_gating"
            )
        if trainer.is_global_zero:
            scalars = {f"moe/{name}/{key}": value for key, value in stats.scalars().items() if not math.isnan(value)}
            if tokens > 0:
                scalars[f"moe/{name}/balance_loss"] = float((losses[:, 0] * losses[:, 1]).sum() / tokens)
                scalars[f"moe/{name}/z_loss"] = float((losses[:, 0] * losses[:, 2]).sum() / tokens)
            for e in range(layer.num_experts):
                scalars[f"moe/{name}/load/expert_{e}"] = float(stats.load[e])
                if stats.purity is not None and not torch.isnan(stats.purity[e]):
                    scalars[f"moe/{name}/purity/expert_{e}"] = float(stats.purity[e])
            self._log_statistics(trainer, name, layer, stats, scalars)
        return stats

    def _log_statistics(self, trainer: "pl.Trainer", name: str, layer: MixtureOfExperts, stats: RoutingStatistics,
                        scalars: dict[str, float]) -> None:
        from lightning_lens.loggers import log_figure, log_scalars

        log_scalars(trainer, scalars)
        if self.log_figures and stats.expert_class_counts is not None:
            from lightning_lens.render import plot_heatmap_matrix

            fig = plot_heatmap_matrix(
                stats.expert_class_counts, row_labels=[f"expert {e}" for e in range(layer.num_experts)],
                col_labels=self._class_labels(stats.expert_class_counts.shape[1]),
                title=f"{name}: top-1 expert x class (NMI {stats.nmi:.2f}, epoch {trainer.current_epoch})",
                xlabel="class", ylabel="top-1 expert",
            )
            log_figure(trainer, f"moe/{name}/expert_class_counts", fig)

    def _ablation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, ExpertAblation]:
        have = torch.tensor([float(bool(self._samples) and all(y is not None for _, y, _ in self._samples))],
                            device=pl_module.device)
        # every rank must take the same branch around the collectives below
        if trainer.world_size > 1:
            have = trainer.strategy.all_gather(have).reshape(-1)
        if not bool(have.min() > 0):
            self._warn_once("ablation_data", "RoutingMonitor: no labelled validation examples were collected; the "
                                             "per-expert ablation is skipped (set target_key)")
            return {}
        inputs = torch.cat([x for x, _, _ in self._samples])
        targets = torch.cat([y for _, y, _ in self._samples])
        ids = None if any(i is None for _, _, i in self._samples) else torch.cat([i for _, _, i in self._samples])
        if targets.is_floating_point():
            self._warn_once("float_labels", "RoutingMonitor: the labels are not integer class indices (a regression "
                                            "target?); class metrics (NMI, purity, heatmap, ablation) are skipped")
            return {}
        results: dict[str, ExpertAblation] = {}
        for name, layer in self._layers:
            if layer.num_experts - len(layer.masked_experts) - 1 < layer.k:
                continue  # masking one more expert would leave fewer than k
            experts = [e for e in range(layer.num_experts) if e not in layer.masked_experts]
            preds = ablation_predictions(pl_module, layer, inputs, forward=self._forward, experts=experts,
                                         batch_size=self.ablation_batch_size)  # (1 + E', n, ...)
            n = inputs.shape[0]
            preds = preds.reshape(preds.shape[0], n, -1).permute(1, 0, 2).reshape(n, -1)
            flat_targets = targets.reshape(n, -1).long()
            if flat_targets.shape[1] * (len(experts) + 1) != preds.shape[1]:
                raise ValueError(f"forward_fn predictions of shape {tuple(preds.shape)} do not match labels of shape "
                                 f"{tuple(targets.shape)}; forward_fn must return logits with the labels' shape + "
                                 "(classes,)")
            id_col = (ids if ids is not None else torch.full((n,), -1)).reshape(n, 1).long()
            local = torch.cat([id_col, flat_targets, preds], dim=1).to(pl_module.device)
            rows = gather_rows(trainer, local).cpu()
            if trainer.world_size > 1 and bool((rows[:, 0] >= 0).all()):
                _, rows = dedupe_by_id(rows[:, 0], rows)
            width = flat_targets.shape[1]
            labels = rows[:, 1:1 + width]
            all_preds = rows[:, 1 + width:].reshape(rows.shape[0], len(experts) + 1, width).permute(1, 0, 2)
            result = ablation_accuracy(all_preds, labels, num_classes=self._num_classes(labels.reshape(-1)))
            results[name] = result
            if trainer.is_global_zero:
                self._log_ablation(trainer, name, experts, result)
        return results

    def _log_ablation(self, trainer: "pl.Trainer", name: str, experts: list[int], result: ExpertAblation) -> None:
        from lightning_lens.loggers import log_figure, log_scalars, log_table

        log_scalars(trainer, {f"moe/{name}/ablation/acc_drop/expert_{e}": float(result.overall_drop[j])
                              for j, e in enumerate(experts)})
        classes = self._class_labels(result.drop.shape[1])
        rows = []
        for j, e in enumerate(experts):
            drop = result.drop[j]
            worst = int(torch.nan_to_num(drop, nan=float("-inf")).argmax()) if drop.numel() else 0
            rows.append([f"expert {e}", float(result.overall_drop[j]), classes[worst], float(drop[worst])])
        log_table(trainer, f"moe/{name}/ablation/summary",
                  ["masked expert", "accuracy drop", "most affected class", "its accuracy drop"], rows)
        if self.log_figures:
            from lightning_lens.render import plot_heatmap_matrix

            fig = plot_heatmap_matrix(
                result.drop, row_labels=[f"expert {e}" for e in experts], col_labels=classes, fmt=".2f",
                title=f"{name}: accuracy drop when an expert is masked (epoch {trainer.current_epoch})",
                xlabel="class", ylabel="masked expert", cmap="magma",
            )
            log_figure(trainer, f"moe/{name}/ablation/acc_drop", fig)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _find_layers(self, pl_module: "pl.LightningModule") -> list[tuple[str, MixtureOfExperts]]:
        if self.layer_names is not None:
            found = []
            for name in self.layer_names:
                module = resolve_module(pl_module, name, argument="layers")
                if not isinstance(module, MixtureOfExperts):
                    raise TypeError(f"layers names {name!r}, a {type(module).__name__}, not a MixtureOfExperts")
                found.append((name, module))
            return found
        found = moe_layers(pl_module)
        if not found:
            raise ValueError("RoutingMonitor found no MixtureOfExperts layer in the LightningModule; add one "
                             "(lightning_lens.interpretable_models.MixtureOfExperts) or remove the callback")
        return found

    def _ablation_due(self, trainer: "pl.Trainer") -> bool:
        if not self.ablation_every_n_epochs or trainer.sanity_checking:
            return False
        if getattr(trainer.state.fn, "value", trainer.state.fn) == "validate":
            return True
        return (trainer.current_epoch + 1) % self.ablation_every_n_epochs == 0

    def _forward(self, pl_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(pl_module, x) if self.forward_fn is not None else pl_module(x)

    def _num_classes(self, labels: torch.Tensor) -> int:
        valid = labels[labels >= 0]
        inferred = int(valid.max()) + 1 if valid.numel() else 1
        if self.num_classes is None:
            return inferred
        if inferred > self.num_classes:
            raise ValueError(f"RoutingMonitor: a label is {inferred - 1} but num_classes={self.num_classes}")
        return self.num_classes

    def _class_labels(self, num_classes: int) -> list[str]:
        if self.class_names is not None and len(self.class_names) == num_classes:
            return self.class_names
        return [str(c) for c in range(num_classes)]

    @staticmethod
    def _dedupe(rows: torch.Tensor) -> torch.Tensor:
        with_id = rows[:, _ID] >= 0
        if not bool(with_id.any()):
            return rows
        keyed = rows[with_id]
        calls, positions = int(keyed[:, _CALL].max()) + 1, int(keyed[:, _POS].max()) + 1
        key = (keyed[:, _ID] * calls + keyed[:, _CALL]) * positions + keyed[:, _POS]
        _, kept = dedupe_by_id(key, keyed)
        return torch.cat([kept, rows[~with_id]])

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
