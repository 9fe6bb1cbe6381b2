"""RoutingMonitor: how every mixture-of-experts layer routes the validation data, and what each expert is for."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_lens._pl import pl, rank_zero_warn
from lightning_lens.callbacks._base import LensCallback, log
from lightning_lens.callbacks._gather import (
    SampleIds,
    dedupe_by_id,
    gather_objects,
    gather_rows,
    validation_dataset_size,
)
from lightning_lens.interpretable_models.moe import (
    ROW_FIXED,
    ROW_LABEL,
    ExpertAblation,
    MixtureOfExperts,
    RoutingRecord,
    RoutingStatistics,
    ablation_accuracy,
    ablation_predictions,
    moe_layers,
    pack_ablation_rows,
    router_rows,
    routing_losses,
    routing_row_keys,
    routing_rows,
    routing_scalars,
    routing_statistics_from_rows,
    routing_summary,
    suggested_balance_loss_weight,
    token_labels,
    unpack_ablation_rows,
)
from lightning_lens.utils import BatchAccessor, preserve_modes, resolve_module
from lightning_lens.utils.checks import (
    check_bool,
    check_fraction,
    check_instance,
    check_int,
    check_key,
    check_optional,
    check_str_list,
)

__all__ = ["RoutingMonitor"]

Key = Union[int, str, Callable[[Any], Any], None]
_FLOAT_LABELS = ("RoutingMonitor: the labels are not integer class indices (a regression target?); class metrics "
                 "(NMI, purity, heatmap, ablation) are skipped")


class RoutingMonitor(LensCallback):
    """Logs the routing of every :class:`~lightning_lens.interpretable_models.MixtureOfExperts` layer at the end of
    due validation epochs, and every ``ablation_every_n_epochs`` epochs what masking each expert costs per class.

    While a due validation epoch runs it turns ``record_routing`` on for each MoE layer (restoring the previous value
    afterwards) and keeps, per token of dataloader 0, the chosen experts, whether capacity dropped them, and the
    example's label (a ``(B,)`` label is shared by the ``T`` tokens of a ``(B, T, D)`` input; ``(B, T)`` labels are
    used per token). Then, for each layer, named by its module path ``<layer>``, it computes the statistics with
    :mod:`lightning_lens.interpretable_models.moe` and logs through :mod:`lightning_lens.loggers`:

    - scalars ``moe/<layer>/load_cv`` (coefficient of variation of assignments per expert), ``usage_entropy``
      (normalized to [0, 1]), ``max_top1_share``, ``dead_experts``, ``drop_rate``, ``balance_loss`` and ``z_loss``
      (the layer's load-balancing and router z-loss over all the epoch's tokens taken as one batch, so they do not
      depend on the batch size or the number of processes), ``load/expert_<i>``;
    - with integer labels: ``nmi`` (normalized mutual information between top-1 expert and label), ``mean_purity``
      and ``purity/expert_<i>`` (share of the expert's tokens in its most common class), and the figure
      ``moe/<layer>/expert_class_counts`` (expert x class counts of top-1 routing);
    - every ``ablation_every_n_epochs`` epochs (and on every ``trainer.validate``): each expert in turn is masked out
      of routing (``masked_experts``: tokens go to their best remaining experts; no parameter changes) on the
      ``ablation_samples`` validation examples with the smallest sample ids (the first ones of an unshuffled loader
      without an index key); scalars ``moe/<layer>/ablation/acc_drop/expert_<i>`` (overall accuracy drop), the
      figure ``moe/<layer>/ablation/acc_drop`` (expert x class accuracy drop) and the table
      ``moe/<layer>/ablation/summary``.

    It warns when a layer's routing collapses: one expert is the top-1 choice of more than ``collapse_threshold`` of
    the tokens. Results stay available as ``last_statistics`` and ``last_ablation``; at the end of fit rank zero logs
    one summary line (``logging.getLogger("lightning_lens")``, INFO).

    Training is untouched: recording only stores detached tensors, the ablation runs without gradients in eval mode
    (modes and masks restored), and gating noise only exists in training mode. Under DDP the tokens carry rank-safe
    sample ids (the batch's indices, or the positions a ``DistributedSampler`` gives), every rank gathers all ranks'
    rows and drops the tokens of the samples the sampler repeats, the ablation is shared out over the ranks and
    gathered, every rank computes, rank zero logs: the numbers equal a 1-process run's. The statistics, the figures
    and the ablation are isolated parts: one failing is reported and the rest carries on (see
    :class:`~lightning_lens.callbacks._base.LensCallback`). Only validation dataloader 0 is used.

    Args:
        layers: dotted names of the MoE layers to monitor (one name or a list; default: every MoE layer of the
            LightningModule).
        num_classes: number of classes (default: ``max(label) + 1`` over the epoch).
        class_names: labels of the classes in figures and tables.
        collapse_threshold: warn when one expert is the top-1 expert of more than this share of tokens, in (0, 1].
        ablation_every_n_epochs: run the per-expert ablation on due validation epochs ``n - 1, 2n - 1, ...``;
            ``None`` or 0 never.
        ablation_samples: validation examples the ablation uses.
        ablation_batch_size: examples per forward pass in the ablation.
        forward_fn: ``forward_fn(pl_module, inputs) -> logits`` for the ablation (default ``pl_module(inputs)``);
            predictions are the argmax of the last dimension.
        max_tokens: tokens kept per layer and epoch (later ones are not counted; a warning says so).
        log_figures: log the heatmaps (scalars and tables are always logged).
        input_key, target_key, index_key: where batches hold inputs, labels and sample indices
            (see :class:`~lightning_lens.utils.BatchAccessor`).
        every_n_epochs: monitor epochs ``n - 1, 2n - 1, ...`` of fit (and always the first and the last).
        max_overhead: the share of fit time the monitor may use; epochs in between are skipped to stay within it
            (None: no limit).
        strict: raise the monitor's own errors instead of reporting them and carrying on.
        verbose: log a summary at the end of fit (see :class:`~lightning_lens.callbacks._base.LensCallback`).

    Example:
        >>> monitor = RoutingMonitor(ablation_every_n_epochs=5, collapse_threshold=0.6)
        >>> # Trainer(callbacks=[monitor], logger=TensorBoardLogger("logs")).fit(model_with_moe_layers, ...)
    """

    def __init__(
        self,
        layers: Union[str, Sequence[str], None] = None,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        collapse_threshold: float = 0.6,
        ablation_every_n_epochs: Optional[int] = 5,
        ablation_samples: int = 512,
        ablation_batch_size: int = 256,
        forward_fn: Optional[Callable[["pl.LightningModule", torch.Tensor], torch.Tensor]] = None,
        max_tokens: int = 2_000_000,
        log_figures: bool = True,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        every_n_epochs: int = 1,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_epochs=check_int(every_n_epochs, "every_n_epochs", minimum=1),
                         max_overhead=max_overhead, strict=strict, verbose=verbose)
        self.layer_names = None if layers is None else list(check_str_list([layers] if isinstance(layers, str)
                                                                           else layers, "layers"))
        self.num_classes = check_optional(check_int, num_classes, "num_classes", minimum=1)
        if class_names is not None:
            if isinstance(class_names, str):
                raise TypeError("class_names must be a sequence of names, one per class, got a single string")
            check_instance(class_names, "class_names", Sequence, hint="one name per class")
            if num_classes is not None and len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.collapse_threshold = check_fraction(collapse_threshold, "collapse_threshold")
        self.ablation_every_n_epochs = check_optional(check_int, ablation_every_n_epochs, "ablation_every_n_epochs",
                                                      minimum=0) or 0
        self.ablation_samples = check_int(ablation_samples, "ablation_samples", minimum=1)
        self.ablation_batch_size = check_int(ablation_batch_size, "ablation_batch_size", minimum=1)
        self.forward_fn = check_optional(check_instance, forward_fn, "forward_fn", Callable,
                                         hint="forward_fn(pl_module, inputs) -> logits")
        self.max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
        self.log_figures = check_bool(log_figures, "log_figures")
        self.accessor = BatchAccessor(input_key=check_key(input_key, "input_key"),
                                      target_key=check_key(target_key, "target_key"),
                                      index_key=check_key(index_key, "index_key"))
        self.last_statistics: dict[str, RoutingStatistics] = {}
        self.last_ablation: dict[str, ExpertAblation] = {}
        self.last_epoch: Optional[int] = None
        self._layers: list[tuple[str, MixtureOfExperts]] = []
        self._hooks: list[Any] = []
        self._saved_flags: list[tuple[MixtureOfExperts, bool]] = []
        self._ids = SampleIds()
        self._dataset_size: Optional[int] = None
        self._collecting = False
        self._in_batch = False
        self._hook_error: Optional[BaseException] = None
        self._pending: list[tuple[str, RoutingRecord]] = []
        self._reset()

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layer_names}

    # ------------------------------------------------------------------------------------------------------ setup
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        self._layers = self._find_layers(pl_module)
        if batch is None:
            return
        labels = self._read(self.accessor.targets, batch)
        self._read(self.accessor.indices, batch)
        if labels is None:
            self.warn_once("no_labels", "RoutingMonitor found no labels in the validation batch: class metrics (NMI, "
                                        "purity, heatmap) and the ablation are skipped; set target_key")
            return
        if labels.is_floating_point() or labels.is_complex():
            self.warn_once("float_labels", _FLOAT_LABELS)
            return
        if self.num_classes is not None and labels.numel() and not 0 <= int(labels.max()) < self.num_classes:
            raise ValueError(f"the validation batch holds the label {int(labels.max())} but num_classes="
                             f"{self.num_classes}; raise num_classes or leave it None (inferred from the labels)")
        if not self.ablation_every_n_epochs:
            return
        x = self._read(self.accessor.inputs, batch)
        with torch.no_grad(), preserve_modes(pl_module, mode=False):  # a dry run of the ablation's forward
            out = self._forward(pl_module, x[:2])
        want = tuple(labels[:2].shape)
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or tuple(out.shape[:-1]) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"forward_fn (default pl_module(inputs)) returned {got} for 2 inputs with labels of shape "
                             f"{want}; the ablation needs logits of shape labels + (classes,): pass forward_fn="
                             "lambda module, x: <logits>, or ablation_every_n_epochs=None")

    # ------------------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        due = self.is_due(trainer)  # a collective: first, on every rank
        self._stop()
        self._reset()
        if not due:
            return
        if not self._layers:
            self._layers = self._find_layers(pl_module)
        self._dataset_size = validation_dataset_size(trainer)
        self._ids.reset()
        self._rows = {name: [] for name, _ in self._layers}
        self._router = {name: [] for name, _ in self._layers}
        self._tokens = {name: 0 for name, _ in self._layers}
        self._saved_flags = [(layer, layer.record_routing) for _, layer in self._layers]
        for name, layer in self._layers:
            layer.record_routing = True
            self._hooks.append(layer.register_forward_hook(self._make_hook(name)))
        self._collecting = True

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._pending, self._hook_error = [], None
        self._in_batch = self._collecting and dataloader_idx == 0

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._in_batch:
            return
        self._in_batch = False
        start = time.perf_counter()
        self.run_part(trainer, "collect", self._collect, trainer, batch, hint="check target_key and index_key")
        self._work_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stop()
        if not self.is_due(trainer):  # the same answer on every rank: the collectives below run everywhere or nowhere
            return
        start = time.perf_counter()
        try:
            local = self.run_part(trainer, "collect", self._local_rows, pl_module, collective=True)
            if local is not None:
                self._statistics(trainer, pl_module, local)
            if self._ablation_due(trainer):
                self._ablation(trainer, pl_module)
            self.last_epoch = int(trainer.current_epoch)
        finally:
            self.record_run_cost(self._work_seconds + time.perf_counter() - start)
            self._reset()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stop()

    # -------------------------------------------------------------------------------------------------- collecting
    def _reset(self) -> None:
        self._rows: dict[str, list[torch.Tensor]] = {}  # routing rows (long) per layer
        self._router: dict[str, list[torch.Tensor]] = {}  # router rows (float), aligned with the routing rows
        self._tokens: dict[str, int] = {}
        self._samples: list[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = []
        self._num_samples = 0
        self._work_seconds = 0.0

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            try:  # runs inside the model's forward: an error here must not end the validation step
                if self._in_batch and module.last_routing is not None:
                    self._pending.append((name, module.last_routing))
            except Exception as err:
                self._hook_error = err
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

    def _collect(self, trainer: "pl.Trainer", batch: Any) -> None:
        pending, self._pending = self._pending, []
        if self._hook_error is not None:
            raise self._hook_error
        labels, indices = self._read(self.accessor.targets, batch), self._read(self.accessor.indices, batch)
        ablate = self._ablation_due(trainer)
        inputs = self._read(self.accessor.inputs, batch) if ablate else None
        size = self._batch_size(batch, inputs, labels, pending)
        ids = self._ids.next(trainer, size, indices, self._dataset_size)
        calls: dict[str, int] = {}
        for name, record in pending:  # a layer may run several times in one step
            call = calls.get(name, 0)
            calls[name] = call + 1
            self._add_record(name, call, record, labels, ids)
        if ablate:
            self._keep_samples(inputs, labels, ids)

    def _add_record(self, name: str, call: int, record: RoutingRecord, labels: Optional[torch.Tensor],
                    ids: torch.Tensor) -> None:
        n = record.num_tokens
        if self._tokens[name] >= self.max_tokens:
            self.warn_once(f"max_tokens/{name}", f"RoutingMonitor: layer {name!r} saw more than max_tokens="
                                                 f"{self.max_tokens} tokens this epoch; later tokens are not counted")
            return
        lead = record.experts.shape[:-1]
        per_token = None
        if labels is not None:
            try:
                per_token = token_labels(labels.cpu(), lead)
            except TypeError:
                self.warn_once("float_labels", _FLOAT_LABELS)
            except ValueError:
                self.warn_once(f"label_shape/{name}", f"RoutingMonitor: labels of shape {tuple(labels.shape)} do not "
                                                      f"match the tokens {tuple(lead)} of layer {name!r}; its class "
                                                      "metrics are skipped")
        batch = lead[0] if len(lead) else 1
        sample_ids = ids if ids.numel() == batch else None
        # on the CPU: an epoch of tokens should not hold accelerator memory
        self._rows[name].append(routing_rows(record, sample_ids, per_token, call))
        self._router[name].append(router_rows(record))
        self._tokens[name] += n

    def _keep_samples(self, inputs: torch.Tensor, labels: Optional[torch.Tensor], ids: torch.Tensor) -> None:
        """Keep the ``ablation_samples`` samples with the smallest ids seen on this rank (all ranks together then
        hold the globally smallest ones, whatever the sharding)."""
        limit = self.ablation_samples
        ids = ids.cpu()
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self._num_samples >= limit:
            keep = ids < max(int(i.max()) for _, _, i in self._samples)
            if not bool(keep.any()):
                return
        self._samples.append((inputs.detach()[keep.to(inputs.device)].cpu().clone(),
                              None if labels is None else labels.detach()[keep.to(labels.device)].cpu().clone(),
                              ids[keep]))
        self._num_samples += int(keep.sum())
        if self._num_samples > 2 * limit:
            self._trim_samples()

    def _trim_samples(self) -> None:
        if not self._samples:
            return
        x = torch.cat([s[0] for s in self._samples])
        y = None if any(s[1] is None for s in self._samples) else torch.cat([s[1] for s in self._samples])
        ids = torch.cat([s[2] for s in self._samples])
        order = torch.argsort(ids, stable=True)[: self.ablation_samples]
        self._samples = [(x[order], None if y is None else y[order], ids[order])]
        self._num_samples = int(order.numel())

    def _local_rows(self, pl_module: "pl.LightningModule") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, this rank's routing rows and router rows, on the module's device (where the collectives need
        them)."""
        device = pl_module.device
        out = {}
        for name, layer in self._layers:
            chunks, router = self._rows.get(name) or [], self._router.get(name) or []
            rows = torch.cat(chunks) if chunks else torch.zeros(0, ROW_FIXED + 2 * layer.k, dtype=torch.long)
            floats = torch.cat(router) if router else torch.zeros(0, 1 + layer.num_experts)
            out[name] = (rows.to(device), floats.to(device))
        return out

    # ---------------------------------------------------------------------------------------------------- metrics
    def _statistics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                    local: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.last_statistics = {}
        for name, layer in self._layers:  # the same layers, in the same order, on every rank
            rows, router = (gather_rows(trainer, t).cpu() for t in local[name])
            stats = self.run_part(trainer, "metrics", self._layer_statistics, trainer, name, layer, rows, router)
            if stats is None:
                continue
            self.last_statistics[name] = stats
            if trainer.is_global_zero and self.log_figures and stats.expert_class_counts is not None:
                self.run_part(trainer, "figures", self._log_class_counts, trainer, name, layer, stats)

    def _layer_statistics(self, trainer: "pl.Trainer", name: str, layer: MixtureOfExperts, rows: torch.Tensor,
                          router: torch.Tensor) -> Optional[RoutingStatistics]:
        keys, rows, router = dedupe_by_id(routing_row_keys(rows), rows, router)  # drop the repeated samples' tokens
        order = torch.argsort(keys)  # one order for 1 and N processes: float sums agree to the bit
        rows, router = rows[order], router[order]
        if rows.shape[0] == 0:
            return None
        stats = routing_statistics_from_rows(rows, layer.num_experts, num_classes=self._class_count(rows))
        if stats.max_top1_share > self.collapse_threshold:
            top = int(stats.top1_share.argmax())
            weight = layer.balance_loss_weight
            rank_zero_warn(
                f"RoutingMonitor: the routing of MoE layer {name!r} collapsed: expert {top} is the top-1 expert of "
                f"{stats.max_top1_share:.0%} of the validation tokens (collapse_threshold="
                f"{self.collapse_threshold:.0%}); raise the layer's balance_loss_weight from {weight:g} to "
                f"{suggested_balance_loss_weight(weight):g}, and check that the training loss adds "
                "moe_aux_loss(model) (without it no weight helps)"
            )
        if trainer.is_global_zero:
            from lightning_lens.loggers import log_scalars

            tag = _layer_tag(name)
            losses = routing_losses(rows, router, layer.num_experts)
            log_scalars(trainer, {f"moe/{tag}/{key}": value for key, value in routing_scalars(stats, losses).items()})
            _log_expert_layout(trainer, tag, ("load", "purity"))
        return stats

    def _log_class_counts(self, trainer: "pl.Trainer", name: str, layer: MixtureOfExperts,
                          stats: RoutingStatistics) -> None:
        from lightning_lens.loggers import log_figure
        from lightning_lens.render import plot_heatmap_matrix

        fig = plot_heatmap_matrix(
            stats.expert_class_counts, row_labels=[f"expert {e}" for e in range(layer.num_experts)],
            col_labels=self._class_labels(stats.expert_class_counts.shape[1]),
            title=f"{name}: top-1 expert x class (NMI {stats.nmi:.2f}, epoch {trainer.current_epoch})",
            xlabel="class", ylabel="top-1 expert",
        )
        log_figure(trainer, f"moe/{_layer_tag(name)}/expert_class_counts", fig)

    # ---------------------------------------------------------------------------------------------------- ablation
    def _ablation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.last_ablation = {}
        samples = self.run_part(trainer, "collect", self._ablation_inputs, collective=True)
        have = samples is not None and samples[2] is not None and not samples[2].is_floating_point()
        if trainer.world_size > 1:  # every rank must take the same branch around the collectives below
            have = bool(trainer.strategy.reduce_boolean_decision(have, all=True))
        if not have:
            if samples is not None:
                self.warn_once("ablation_data", "RoutingMonitor: no validation examples with integer labels were "
                                                "collected; the per-expert ablation is skipped (set target_key)")
            return
        ids, inputs, labels = samples
        chosen = _chosen_samples(gather_objects(trainer, ids.tolist()), self.ablation_samples, trainer.global_rank)
        layers = self._ablation_layers()
        width = labels.reshape(labels.shape[0], -1).shape[1]
        local = self.run_part(trainer, "ablation", self._ablation_rows, pl_module, layers, inputs[chosen],
                              labels[chosen], ids[chosen], width, collective=True,
                              hint="forward_fn(pl_module, inputs) must return logits of the labels' shape + (classes,)")
        if local is None:
            return
        for name, _, experts in layers:  # the same layers, in the same order, on every rank
            rows = gather_rows(trainer, local[name].to(pl_module.device)).cpu()
            result = self.run_part(trainer, "ablation", self._ablation_result, trainer, name, experts, rows)
            if result is not None:
                self.last_ablation[name] = result
                if trainer.is_global_zero and self.log_figures:
                    self.run_part(trainer, "figures", self._log_ablation_figure, trainer, name, experts, result)

    def _ablation_inputs(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """This rank's kept samples as ``(ids, inputs, labels or None)``."""
        self._trim_samples()
        if not self._samples:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0), None
        x, y, ids = self._samples[0]
        return ids, x, y

    def _ablation_layers(self) -> list[tuple[str, MixtureOfExperts, list[int]]]:
        """Layers where one more expert can be masked, with the experts to mask."""
        return [(name, layer, [e for e in range(layer.num_experts) if e not in layer.masked_experts])
                for name, layer in self._layers if layer.num_experts - len(layer.masked_experts) - 1 >= layer.k]

    def _ablation_rows(self, pl_module: "pl.LightningModule", layers: list[tuple[str, MixtureOfExperts, list[int]]],
                       inputs: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                       width: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer, experts in layers:
            if inputs.shape[0] == 0:  # none of this rank's samples is among the chosen ones
                out[name] = torch.zeros(0, 1 + width * (len(experts) + 2), dtype=torch.long)
                continue
            preds = ablation_predictions(pl_module, layer, inputs, forward=self._forward, experts=experts,
                                         batch_size=self.ablation_batch_size)  # (1 + E', n, ...)
            out[name] = pack_ablation_rows(ids, labels, preds)
        return out

    def _ablation_result(self, trainer: "pl.Trainer", name: str, experts: list[int],
                         rows: torch.Tensor) -> ExpertAblation:
        _, rows = dedupe_by_id(rows[:, 0], rows)
        _, targets, preds = unpack_ablation_rows(rows, runs=len(experts) + 1)
        result = ablation_accuracy(preds, targets, num_classes=self.num_classes)
        if trainer.is_global_zero:
            from lightning_lens.loggers import log_scalars, log_table

            tag = _layer_tag(name)
            log_scalars(trainer, {f"moe/{tag}/ablation/acc_drop/expert_{e}": float(result.overall_drop[j])
                                  for j, e in enumerate(experts)})
            _log_expert_layout(trainer, tag, ("ablation/acc_drop",))
            classes = self._class_labels(result.drop.shape[1])
            table = []
            for j, e in enumerate(experts):
                drop = result.drop[j]
                worst = int(torch.nan_to_num(drop, nan=float("-inf")).argmax()) if drop.numel() else 0
                table.append([f"expert {e}", float(result.overall_drop[j]), classes[worst], float(drop[worst])])
            log_table(trainer, f"moe/{tag}/ablation/summary",
                      ["masked expert", "accuracy drop", "most affected class", "its accuracy drop"], table,
                      legend="accuracy drop: validation accuracy with every expert minus with this expert masked"
                             " (negative: masking it helps); most affected class: the class whose accuracy drops most")
        return result

    def _log_ablation_figure(self, trainer: "pl.Trainer", name: str, experts: list[int],
                             result: ExpertAblation) -> None:
        from lightning_lens.loggers import log_figure
        from lightning_lens.render import plot_heatmap_matrix

        fig = plot_heatmap_matrix(
            result.drop, row_labels=[f"expert {e}" for e in experts],
            col_labels=self._class_labels(result.drop.shape[1]), fmt=".2f",
            title=f"{name}: accuracy drop when an expert is masked (epoch {trainer.current_epoch})\n"
                  "red: accuracy falls, blue: it rises",
            xlabel="class", ylabel="masked expert", cmap="RdBu_r", center=0.0,  # drops can be negative (gains)
        )
        log_figure(trainer, f"moe/{_layer_tag(name)}/ablation/acc_drop", fig)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _find_layers(self, pl_module: "pl.LightningModule") -> list[tuple[str, MixtureOfExperts]]:
        if self.layer_names is not None:
            found = []
            for name in self.layer_names:
                module = resolve_module(pl_module, name, argument="layers")
                if not isinstance(module, MixtureOfExperts):
                    raise TypeError(f"layers names {name!r}, a {type(module).__name__}, not a MixtureOfExperts; name "
                                    "the MixtureOfExperts layers, or leave layers=None (all of them)")
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

    @staticmethod
    def _read(read: Callable[[Any], Any], batch: Any) -> Any:
        try:
            return read(batch)
        except KeyError as err:  # a key that selects nothing is a configuration error
            raise ValueError(err.args[0] if err.args else str(err)) from err

    def _batch_size(self, batch: Any, inputs: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    pending: list[tuple[str, RoutingRecord]]) -> int:
        if inputs is None:
            try:
                inputs = self.accessor.inputs(batch)
            except (KeyError, TypeError):
                inputs = None
        if inputs is not None:
            return int(inputs.shape[0])
        if labels is not None and labels.dim() > 0:
            return int(labels.shape[0])
        lead = pending[0][1].experts.shape[:-1] if pending else ()
        return int(lead[0]) if len(lead) else 1

    def _class_count(self, rows: torch.Tensor) -> Optional[int]:
        if self.num_classes is None or not bool((rows[:, ROW_LABEL] >= 0).any()):
            return None
        top = int(rows[:, ROW_LABEL].max())
        if top >= self.num_classes:
            raise ValueError(f"a label is {top} but num_classes={self.num_classes}; raise num_classes")
        return self.num_classes

    def _class_labels(self, num_classes: int) -> list[str]:
        if self.class_names is not None and len(self.class_names) == num_classes:
            return self.class_names
        return [str(c) for c in range(num_classes)]

    def summary(self) -> Optional[str]:
        """The headline numbers of every MoE layer at the last monitored epoch (logged at the end of fit)."""
        if not self.last_statistics:
            return None
        experts = {name: [e for e in range(layer.num_experts) if e not in layer.masked_experts]
                   for name, layer in self._layers}
        lines = [f"{name or '<module>'}: {routing_summary(stats, self.last_ablation.get(name), experts.get(name))}"
                 for name, stats in self.last_statistics.items()]
        return f"RoutingMonitor (epoch {self.last_epoch}): " + "; ".join(lines)


def _log_expert_layout(trainer: "pl.Trainer", tag: str, series: Sequence[str]) -> None:
    """One multi-line chart per per-expert series (TensorBoard's Custom Scalars tab, W&B line series) instead of a
    card per expert; written once per run (the sink layer skips an unchanged layout)."""
    import re

    from lightning_lens.loggers import log_scalar_layout

    prefix = re.escape(f"moe/{tag}/")
    log_scalar_layout(trainer, {f"moe/{tag}": {f"{s} per expert": [prefix + re.escape(s) + r"/expert_\d+"]
                                               for s in series}})


def _layer_tag(name: str) -> str:
    """The layer's module path as a tag component (``<module>`` for the LightningModule itself)."""
    from lightning_lens.loggers import sanitize_tag

    return sanitize_tag(name) or "module"


def _chosen_samples(ids_per_rank: list[list[int]], limit: int, rank: int) -> torch.Tensor:
    """Which of ``rank``'s samples the ablation uses: the ``limit`` smallest distinct ids over all ranks, each taken
    from the first rank (and position) that holds it. Every rank computes the same choice from the gathered ids."""
    first: dict[int, tuple[int, int]] = {}
    for r, ids in enumerate(ids_per_rank):
        for position, i in enumerate(ids):
            first.setdefault(int(i), (r, position))
    mask = torch.zeros(len(ids_per_rank[rank]), dtype=torch.bool)
    for i in sorted(first)[:limit]:
        r, position = first[i]
        if r == rank:
            mask[position] = True
    return mask
