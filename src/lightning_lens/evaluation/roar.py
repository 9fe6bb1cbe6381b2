"""RemOve And Retrain (ROAR; Hooker, Erhan, Kindermans & Kim, "A Benchmark for Interpretability Methods in Deep
Neural Networks", NeurIPS 2019).

For each method and each fraction ``t``, the top-``t`` features of every training and test example (ranked by the
method's attributions on the trained model) are replaced by their per-channel mean over the training set; a fresh
copy of the model is trained on the modified training set and evaluated on the modified test set. A method that
finds the informative features makes the retrained model's accuracy fall faster than removing random features does.
Retraining is what separates ROAR from deletion curves: without it, the accuracy drop may come from the
distribution shift of the removal rather than from the information removed.

**Cost.** ``(n_methods + 1) * n_fractions + 1`` full trainings (one per method and fraction, the random control's
fractions, and one on the unmodified data for ``t = 0``), plus one explanation of every training and test example per
method. This is an offline job, never a per-epoch callback.

**Lightning.** Like :func:`~lightning_lens.sanity.data_randomization_test`, each retraining is a deep copy of the
user's ``LightningModule`` (re-initialized) fitted by a fresh, quiet ``Trainer``
(:func:`lightning_lens.lightning_modules.fit_random_label_twin`, imported lazily); the given module is never modified
and the caller's global RNG state is restored afterwards (``torch.random.fork_rng``). Batches are ``(inputs, labels)``
tuples, as :class:`~lightning_lens.testing.LitClassifier` takes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens.utils.checks import check_float, check_int

__all__ = ["ROARReport", "remove_and_retrain", "remove_features"]

Data = Union[TensorDataset, tuple[torch.Tensor, torch.Tensor], list]
RANDOM = "random"


@dataclass
class ROARReport:
    """Result of :func:`remove_and_retrain`.

    Attributes:
        fractions: the removed fractions ``t``, with 0 first (the unmodified data).
        accuracy: ``{method: (T,)}`` test accuracy of the retrained model at each fraction; ``"random"`` is the control.
        verdicts: ``{method: Verdict}``: ``"passes"`` when the method's accuracy is below the random control's by more
            than ``margin`` on average over the fractions (``score``: that mean gap), ``"fails"`` when above it by more
            than ``margin``, else ``"inconclusive"`` (on par with random, which Hooker et al. count against a method).
        margin: the verdicts' margin.
        epochs: epochs each retraining ran.
        retrainings: how many models were trained.
    """

    fractions: list[float]
    accuracy: dict[str, torch.Tensor]
    verdicts: dict[str, Any]
    margin: float
    epochs: int
    retrainings: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: one row per method (and the random control): verdict, accuracy at every fraction."""
        columns = ["method", "verdict", "gap to random", *[f"acc@{t:g}" for t in self.fractions]]
        rows = []
        for name, acc in self.accuracy.items():
            v = self.verdicts.get(name)
            rows.append([name, v.outcome if v else "control", v.score if v else math.nan, *acc.tolist()])
        return columns, rows

    def summary(self) -> str:
        lines = [f"ROAR (Hooker et al. 2019): test accuracy after removing the top-t features and retraining"
                 f" ({self.retrainings} trainings of {self.epochs} epoch(s))",
                 "  t: " + " ".join(f"{t:>6g}" for t in self.fractions)]
        for name, acc in self.accuracy.items():
            lines.append(f"  {name}: " + " ".join(f"{float(a):6.3f}" for a in acc))
        lines += [f"  {v}" for v in self.verdicts.values()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions), "accuracy": {n: a.tolist() for n, a in self.accuracy.items()},
                "verdicts": {n: v.to_dict() for n, v in self.verdicts.items()}, "margin": self.margin,
                "epochs": self.epochs, "retrainings": self.retrainings}


def _tensors(data: Data, argument: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorDataset):
        data = data.tensors  # type: ignore[assignment]
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"{argument} must be an (inputs, labels) pair of tensors or a TensorDataset of them, got"
                        f" {type(data).__name__}")
    x, y = data
    if not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"{argument}: the inputs must be a floating-point (N, ...) tensor, got {x.dtype}"
                        f" {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"{argument}: the labels must be N = {x.shape[0]} integer class indices, got {y.dtype}"
                         f" {tuple(y.shape)}")
    return x.detach(), y.detach().long()


def _position_scores(maps: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` scores of the removable positions: pixels (``sum_c |a_c|``) of ``(N, C, *spatial)`` maps, features
    of ``(N, D)`` maps."""
    maps = maps.detach().abs().float()
    return (maps.sum(dim=1) if maps.dim() >= 3 else maps).flatten(1)


def remove_features(inputs: torch.Tensor, scores: torch.Tensor, fraction: float, fill: torch.Tensor) -> torch.Tensor:
    """``inputs`` with the ``round(fraction * P)`` highest-scoring positions of each example set to ``fill``.

    Positions are pixels of ``(N, C, *spatial)`` inputs (all channels replaced) or features of ``(N, D)`` inputs;
    ``scores`` is ``(N, P)``; ``fill`` broadcasts over one example (per-channel means: ``(C, 1, ...)``).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> remove_features(x, torch.tensor([[0.1, 0.9, 0.5, 0.2]]), 0.5, torch.zeros(4)).tolist()
        [[1.0, 0.0, 0.0, 4.0]]
    """
    n, positions = scores.shape
    count = int(round(fraction * positions))
    if count == 0:
        return inputs.clone()
    mask = torch.zeros(n, positions, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, scores.topk(count, dim=1).indices, True)
    if inputs.dim() >= 3:
        mask = mask.view(n, 1, *inputs.shape[2:])
    else:
        mask = mask.view(n, *inputs.shape[1:])
    return torch.where(mask.to(inputs.device), torch.broadcast_to(fill.to(inputs), inputs.shape), inputs)


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    if x.dim() >= 3:
        return x.transpose(0, 1).flatten(1).mean(dim=1).view(-1, *([1] * (x.dim() - 2)))
    return x.mean(dim=0)


def remove_and_retrain(
    module: nn.Module,
    train_data: Data,
    test_data: Data,
    methods: Any = ("gradient",),
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    *,
    max_epochs: int = 10,
    batch_size: int = 64,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    reinitialize: bool = True,
    attribution_batch_size: int = 256,
    margin: float = 0.02,
    seed: int = 0,
) -> ROARReport:
    """ROAR: accuracy of models retrained without the top-``t`` features of each method, beside random removal.

    Args:
        module: the trained ``LightningModule`` (its forward returns ``(batch, classes)`` logits, its
            ``training_step`` takes ``(inputs, labels)`` batches); the methods explain it, deep copies are retrained.
        train_data, test_data: ``(inputs, labels)`` tensors or a ``TensorDataset`` of them.
        methods: attribution methods (registry names, ``(name, kwargs)`` pairs, ...; see
            :func:`~lightning_lens.attribution.method_specs`); each explains the model's *predicted* class (the true
            label would leak into the ranking).
        fractions: the fractions ``t`` in ``(0, 1)`` of positions (pixels or features) removed.
        max_epochs, batch_size, trainer_kwargs: the retraining (a fresh quiet ``Trainer`` per model).
        reinitialize: re-initialize each copy before training (ROAR trains from scratch); ``False`` fine-tunes.
        attribution_batch_size: examples per explanation call.
        margin: the verdicts' margin on the mean accuracy gap to random removal.
        seed: seeds the random ranking, the re-initialization, shuffling and training (the same for every model).

    Returns:
        A :class:`ROARReport`; cost in the module docstring.

    Example:
        >>> report = remove_and_retrain(lit_module, (x_train, y_train), (x_test, y_test), ["gradient", "smoothgrad"],
        ...                             fractions=(0.3, 0.7), max_epochs=5)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    from lightning_lens.attribution.registry import method_specs, resolve_method
    from lightning_lens.lightning_modules import check_lightning_module
    from lightning_lens.sanity._common import predict, private_copy
    from lightning_lens.sanity.data_randomization import fit_seeded_copy
    from lightning_lens.sanity.report import Verdict

    check_lightning_module(module, "module", fix="each retraining fits a copy with a fresh Trainer; wrap a plain"
                           " nn.Module in lightning_lens.testing.LitClassifier")
    x_train, y_train = _tensors(train_data, "train_data")
    x_test, y_test = _tensors(test_data, "test_data")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"train_data and test_data inputs differ in shape: {tuple(x_train.shape[1:])} vs"
                         f" {tuple(x_test.shape[1:])}")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
        raise TypeError(f"fractions must be a non-empty list of fractions in (0, 1), got {fractions!r}")
    ts = [check_float(t, "fractions", minimum=0.0, maximum=1.0, open_min=True, open_max=True) for t in fractions]
    check_int(max_epochs, "max_epochs", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(attribution_batch_size, "attribution_batch_size", minimum=1)
    margin = check_float(margin, "margin", minimum=0.0)
    check_int(seed, "seed")
    specs = method_specs(methods, allow_single=True)
    if any(name == RANDOM for name, _ in specs):
        raise ValueError("methods: 'random' is the control ROAR always runs; leave it out of methods")

    explained, _ = private_copy(module)
    device = next(explained.parameters()).device

    def ranking(method: Any, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, x.shape[0], attribution_batch_size):
            xb = x[start:start + attribution_batch_size].to(device)
            target = predict(explained, xb).argmax(dim=1)
            parts.append(_position_scores(method.attribute(xb, target=target)).cpu())
        return torch.cat(parts)

    with torch.inference_mode(False):
        rankings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, spec in specs:
            method = resolve_method(spec, explained)
            rankings[name] = (ranking(method, x_train), ranking(method, x_test))
        generator = torch.Generator().manual_seed(seed)
        positions = _position_scores(x_train[:1]).shape[1]
        rankings[RANDOM] = (torch.rand(x_train.shape[0], positions, generator=generator),
                            torch.rand(x_test.shape[0], positions, generator=generator))
        fill = _channel_mean(x_train)

        epochs_run = 0

        def retrain(train_x: torch.Tensor, test_x: torch.Tensor) -> float:
            nonlocal epochs_run
            # the same seed for every model: the accuracies differ by the data only
            loader = DataLoader(TensorDataset(train_x, y_train), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            twin, epochs_run = fit_seeded_copy(module, loader, train_x[:2], seed=seed, reinitialize=reinitialize,
                                               max_epochs=max_epochs, trainer_kwargs=trainer_kwargs)
            trained, _ = private_copy(twin)
            trained_device = next(trained.parameters()).device
            correct = 0
            for start in range(0, test_x.shape[0], attribution_batch_size):
                xb = test_x[start:start + attribution_batch_size].to(trained_device)
                pred = predict(trained, xb).argmax(dim=1).cpu()
                correct += int((pred == y_test[start:start + attribution_batch_size]).sum())
            return correct / test_x.shape[0]

        clean = retrain(x_train, x_test)
        accuracy: dict[str, torch.Tensor] = {}
        retrainings = 1
        for name, (train_scores, test_scores) in rankings.items():
            values = [clean]
            for t in ts:
                values.append(retrain(remove_features(x_train, train_scores, t, fill),
                                      remove_features(x_test, test_scores, t, fill)))
                retrainings += 1
            accuracy[name] = torch.tensor(values)

    verdicts = {}
    random_acc = accuracy[RANDOM][1:]
    for name, _ in specs:
        acc = accuracy[name][1:]
        gap = float((random_acc - acc).mean())
        common = dict(method=name, metric="accuracy_gap_to_random", similarity=float(acc.mean()), floor=math.nan,
                      ceiling=float(random_acc.mean()), score=gap, stages_used=len(ts))
        if gap > margin:
            verdicts[name] = Verdict(outcome="passes", reason=f"removing its top features costs {gap:.3f} more"
                                     " accuracy than removing random ones", **common)
        elif gap < -margin:
            verdicts[name] = Verdict(outcome="fails", reason=f"removing its top features costs {-gap:.3f} less"
                                     " accuracy than removing random ones", **common)
        else:
            verdicts[name] = Verdict(outcome="inconclusive", reason=f"on par with random removal (gap {gap:.3f},"
                                     f" margin {margin})", **common)
    return ROARReport(fractions=[0.0, *ts], accuracy=accuracy, verdicts=verdicts, margin=margin, epochs=epochs_run,
                      retrainings=retrainings)
