"""Data-randomization test (Adebayo et al., 2018): explain a twin of the model trained on *permuted* labels.

A model trained on randomly permuted labels can only memorize; a method that explains the model must show
different maps for it than for the real model. Adebayo et al. permuted the training labels once
(``np.random.permutation(y_train)``, class frequencies preserved) and trained until the network fit them.

This is an offline job (it trains a model), never run inside a callback. It is the one function of
:mod:`lightning_lens.sanity` that uses Lightning: on call, it runs
:func:`lightning_lens.lightning_modules.fit_random_label_twin` (a fresh ``Trainer``) on a deep copy of the user's
``LightningModule`` (the given module is never modified). The training runs inside
``torch.random.fork_rng`` seeded from ``seed``, so the caller's global RNG state is unchanged afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens.sanity._common import (
    Methods,
    Reference,
    bind,
    check_batch,
    correspondence,
    median,
    normalize_methods,
    outside_inference_mode,
    predict,
    private_copy,
)
from lightning_lens.sanity.layers import find_layers, reinitialize_
from lightning_lens.sanity.report import MapComparison, VerdictRule, _f
from lightning_lens.sanity.similarity import MapSimilarity
from lightning_lens.utils import BatchAccessor, resolve_target
from lightning_lens.utils.batch import _TARGET_KEYS
from lightning_lens.utils.rng import global_rng_preserved
from lightning_lens.utils.targets import Target

__all__ = ["DataRandomizationReport", "PermutedLabels", "data_randomization_test"]


class PermutedLabels(Dataset):
    """A map-style dataset whose labels are a fixed random permutation of the wrapped dataset's labels.

    Item ``i`` is the wrapped item ``i`` with its label replaced by ``labels[perm[i]]``, so the class frequencies are
    exactly those of the original labels. Items may be dicts (label under ``label_key``, default the first of
    ``label``/``labels``/``target``/``targets``/``y``) or tuples/lists (label at position ``label_key``, default 1).

    Args:
        dataset: a map-style dataset (``len`` and integer indexing).
        labels: the dataset's labels, if known (``dataset.targets`` ...); otherwise read item by item once.
        label_key: where an item's label is.
        seed: seed of the private generator drawing the permutation.

    Example:
        >>> data = [(torch.zeros(2), c) for c in [0, 0, 1, 2]]
        >>> permuted = PermutedLabels(data, seed=0)
        >>> sorted(int(permuted[i][1]) for i in range(4))
        [0, 0, 1, 2]
    """

    def __init__(
        self,
        dataset: Any,
        labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        label_key: Optional[Union[str, int]] = None,
        seed: int = 0,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("dataset must be a map-style dataset (len() and integer indexing)")
        self.dataset = dataset
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty")
        self.label_key = label_key if label_key is not None else self._default_key(dataset[0])
        if labels is None:
            labels = [int(torch.as_tensor(self._read(dataset[i]))) for i in range(n)]
        self.labels = torch.as_tensor(labels).long().reshape(-1)
        if self.labels.numel() != n:
            raise ValueError(f"labels has {self.labels.numel()} entries for a dataset of {n} items")
        generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(n, generator=generator)
        self.permuted = self.labels[self.permutation]

    @staticmethod
    def _default_key(item: Any) -> Union[str, int]:
        if isinstance(item, Mapping):
            key = next((k for k in _TARGET_KEYS if k in item), None)
            if key is None:
                raise KeyError(f"no label found in a dict item with keys {list(item)}; pass label_key='<your key>'")
            return key
        if isinstance(item, (tuple, list)) and len(item) > 1:
            return 1
        raise TypeError(f"cannot find the label of an item of type {type(item).__name__}; pass label_key")

    def _read(self, item: Any) -> Any:
        try:
            return item[self.label_key]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(f"label_key={self.label_key!r} does not select a label in the dataset's items") from err

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        label = self.permuted[index]
        original = self._read(item)
        value: Any = label.to(original.dtype) if isinstance(original, torch.Tensor) else int(label)
        if isinstance(item, Mapping):
            return {**item, self.label_key: value}
        parts = list(item)
        parts[self.label_key] = value  # type: ignore[index]
        return type(item)(parts) if isinstance(item, tuple) and not hasattr(item, "_fields") else (
            type(item)(*parts) if isinstance(item, tuple) else parts)


@dataclass
class DataRandomizationReport(MapComparison):
    """Result of :func:`data_randomization_test`: a :class:`~lightning_lens.sanity.report.MapComparison` of the real
    model's and the random-label model's maps (``similarity``, ``floor`` and ``ceiling`` on the real model,
    ``verdicts``).

    Attributes:
        targets: ``(B,)`` classes explained.
        train_accuracy: the random-label model's accuracy on (up to ``eval_examples`` of) its permuted training
            labels: how well it memorized them. Chance is about ``1 / classes``.
        probe_accuracy: the random-label model's accuracy on the probes' true ``targets`` (if labels were given).
        epochs: epochs trained.
        maps: ``{method: (2, B, *spatial)}`` normalized absolute maps (real model, random-label model).
        model: the random-label model (a ``LightningModule``).
    """

    targets: torch.Tensor
    train_accuracy: float
    probe_accuracy: float
    epochs: int
    maps: dict[str, torch.Tensor]
    model: Any

    def to_table(self) -> tuple[list[str], list[list[Any]]]:
        metrics = sorted({m for d in self.similarity.values() for m in d})
        columns = ["method", "verdict", "score", *metrics]
        rows = [[n, self.verdicts[n].outcome, self.verdicts[n].score,
                 *[median(d[m]) if m in d else math.nan for m in metrics]] for n, d in self.similarity.items()]
        return columns, rows

    def summary(self) -> str:
        lines = [f"Data randomization test (Adebayo et al. 2018): model trained {self.epochs} epoch(s) on permuted"
                 f" labels (fit {_f(self.train_accuracy)} of them; accuracy on the probes' labels"
                 f" {_f(self.probe_accuracy)})"]
        if self.train_accuracy < 0.5:
            lines.append("  warning: the random-label model fits under half of its labels; train longer (max_epochs)"
                         " for a conclusive test")
        return "\n".join(lines + self._method_lines())

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "train_accuracy": self.train_accuracy, "probe_accuracy": self.probe_accuracy,
                "targets": self.targets.tolist(), **self._comparison_dict()}


@outside_inference_mode
def data_randomization_test(
    module: nn.Module,
    train_dataset: Any,
    inputs: torch.Tensor,
    target: Target = None,
    methods: Methods = ("gradient", "guided_backprop"),
    *,
    labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    label_key: Optional[Union[str, int]] = None,
    input_key: Optional[Union[str, int]] = None,
    reinitialize: bool = True,
    max_epochs: int = 50,
    batch_size: int = 64,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    dataloader_kwargs: Optional[dict[str, Any]] = None,
    eval_examples: int = 2048,
    seed: int = 0,
    similarity: Optional[MapSimilarity] = None,
    rule: Optional[VerdictRule] = None,
) -> DataRandomizationReport:
    """Train a copy of ``module`` on permuted labels and compare its maps of ``inputs`` with the real model's.

    Args:
        module: the user's ``LightningModule`` (trained); its forward must return ``(batch, classes)`` logits. A deep
            copy is trained; ``module`` itself is never modified.
        train_dataset: the map-style training dataset whose labels get permuted (items as the module's
            ``training_step`` expects them, once collated).
        inputs: ``(B, ...)`` probes to explain with both models.
        target: class explained for both models (int, ``B`` labels, ``None``: the real model's prediction).
        methods: as in :func:`~lightning_lens.sanity.cascading_randomization`.
        labels: the dataset's labels, if known (saves reading every item once).
        label_key, input_key: where labels/inputs are in items and batches (dict key or tuple position).
        reinitialize: re-initialize every parameter of the copy before training (the paper trains from scratch);
            ``False`` fine-tunes the trained weights on the permuted labels.
        max_epochs: training epochs (Adebayo et al. trained 50-100 epochs to fit random labels).
        batch_size: training batch size.
        trainer_kwargs: overrides for the fresh ``Trainer`` (defaults: ``max_epochs``, ``devices=1``, no logger,
            no checkpointing, no progress bar, no model summary, no validation).
        dataloader_kwargs: extra ``DataLoader`` arguments (``num_workers``, ``collate_fn`` ...).
        eval_examples: training examples on which the fit of the permuted labels is measured.
        seed: seed of the permutation, re-initialization, shuffling and training RNG.
        similarity, rule: as in :func:`~lightning_lens.sanity.cascading_randomization`.

    Example:
        >>> report = data_randomization_test(lit_module, train_set, probes.inputs, probes.targets,
        ...                                  max_epochs=30)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    # lazily: the twin's Trainer lives in the package's one Lightning-facing module; the rest of sanity/ is plain torch
    from lightning_lens.lightning_modules import check_lightning_module

    check_lightning_module(module, "module", fix="its training_step and configure_optimizers train the twin; wrap a"
                           " plain nn.Module in lightning_lens.testing.LitClassifier")
    for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("eval_examples", eval_examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    similarity = similarity or MapSimilarity()
    rule = rule or VerdictRule()
    specs = normalize_methods(methods)
    permuted = PermutedLabels(train_dataset, labels=labels, label_key=label_key, seed=seed)

    real, real_memo = private_copy(module)
    x = check_batch(inputs, real)
    targets = resolve_target(target, predict(real, x))
    real_methods = [bind(label, spec, module, real, real_memo) for label, spec in specs]
    references = [Reference.compute(m, x, targets, similarity) for m in real_methods]

    user_args = dict(dataloader_kwargs or {})
    if "batch_sampler" in user_args:
        loader_args = user_args
    elif "sampler" in user_args:
        loader_args = {"batch_size": batch_size, **user_args}
    else:
        loader_args = {"batch_size": batch_size, "shuffle": True,
                       "generator": torch.Generator().manual_seed(seed), **user_args}
    loader = DataLoader(permuted, **loader_args)
    twin, epochs = fit_seeded_copy(module, loader, x, seed=seed, reinitialize=reinitialize, max_epochs=max_epochs,
                                   trainer_kwargs=trainer_kwargs)
    with global_rng_preserved():  # a dataset's random transforms: reproducible, and the caller's streams untouched
        torch.manual_seed(seed)
        random_model, _ = private_copy(twin)
        random_model = random_model.to(x.device)
        accessor = BatchAccessor(input_key=input_key, target_key=permuted.label_key)
        train_accuracy = _accuracy(random_model, permuted, accessor, batch_size, eval_examples, loader_args,
                                   x.device, seed)
    probe_accuracy = math.nan
    if isinstance(target, torch.Tensor) or (isinstance(target, Sequence) and not isinstance(target, str)):
        probe_accuracy = float((predict(random_model, x).argmax(dim=1) == targets).float().mean())

    sims, floors, ceilings, verdicts, maps = {}, {}, {}, {}, {}
    for (label, spec), ref in zip(specs, references):
        twin_method = bind(label, spec, module, random_model, correspondence(module, random_model))
        scores, prepared = ref.compare(twin_method.explain(x, targets), similarity)
        name = ref.method.name
        sims[name] = {k: v.float().cpu() for k, v in scores.items()}
        floors[name], ceilings[name] = ref.floor, ref.ceiling
        verdicts[name] = rule.judge(name, {k: v.unsqueeze(0) for k, v in sims[name].items()}, ref.floor, ref.ceiling)
        maps[name] = torch.stack([ref.prepared.absolute.float().cpu(), prepared.absolute.float().cpu()])
    return DataRandomizationReport(sims, floors, ceilings, verdicts, targets.cpu(), train_accuracy, probe_accuracy,
                                   epochs, maps, twin)


def fit_seeded_copy(
    module: nn.Module,
    loader: DataLoader,
    probe: torch.Tensor,
    *,
    seed: int,
    reinitialize: bool,
    max_epochs: int,
    trainer_kwargs: Optional[Mapping[str, Any]],
) -> tuple[nn.Module, int]:
    """Train a deep copy of ``module`` on ``loader`` with a fresh Trainer, from ``seed``; returns ``(copy, epochs)``.

    The fit draws dropout and shuffling from the global RNG: it is seeded for reproducibility inside ``fork_rng``, which
    restores the caller's state afterwards, so the user's training is untouched. With ``reinitialize`` the copy's
    layers (found by one forward of ``probe``) are re-drawn from ``seed`` first. Shared by the data randomization
    test and ROAR.
    """
    from lightning_lens.lightning_modules import fit_random_label_twin

    twin = _trainable_copy(module)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if reinitialize:
            generator = torch.Generator().manual_seed(seed)
            for layer in find_layers(twin, probe.to(next(twin.parameters()).device))[0]:
                reinitialize_(layer, generator, batchnorm="reset")
        epochs = fit_random_label_twin(twin, loader, max_epochs=max_epochs, trainer_kwargs=trainer_kwargs)
    return twin, epochs


def _trainable_copy(module: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as err:
        raise TypeError(
            f"module: copy.deepcopy failed ({err}); the data randomization test trains a deep copy of it"
        ) from err


def _accuracy(model: nn.Module, dataset: PermutedLabels, accessor: BatchAccessor, batch_size: int, limit: int,
              loader_args: dict[str, Any], device: torch.device, seed: int) -> float:
    args = {k: v for k, v in loader_args.items()
            if k not in ("shuffle", "generator", "sampler", "batch_sampler", "drop_last")}
    # a generator of our own: a DataLoader without one draws its workers' base seed from the global RNG
    args.update(batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    correct = seen = 0
    for batch in DataLoader(dataset, shuffle=False, **args):
        xb = accessor.inputs(batch).to(device)
        yb = accessor.targets(batch)
        if yb is None:
            raise ValueError("no labels in the training batches; pass label_key")
        pred = predict(model, xb).argmax(dim=1).cpu()
        correct += int((pred == yb.long().cpu()).sum())
        seen += int(yb.numel())
        if seen >= limit:
            break
    return correct / max(seen, 1)
