"""A fixed probe set: the few validation examples every explanation callback shows, stable across epochs and resumes.

Probes are drawn by dataset position (:meth:`ProbeSet.from_dataset`): a private generator permutes the positions of
the validation dataset, the first candidates are read for their labels, and the probes are taken round-robin over
classes (:func:`spread_over_classes`). Only the chosen items are kept, and the draw depends on the dataset and the
seed alone, so one process and N processes (whose samplers shard the same dataset) pick the same probes. Streams
without positions (an ``IterableDataset``) go through :class:`ProbePool`, a bounded uniform sample of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lightning_lens.utils.batch import BatchAccessor, Inputs, input_batch_size, map_inputs
from lightning_lens.utils.checks import check_int
from lightning_lens.utils.rng import global_rng_preserved

__all__ = ["ProbePool", "ProbeSet", "spread_over_classes"]

#: candidates whose labels are read to spread the probes over classes: ``max(8 * num, 128)``
_CANDIDATES_PER_PROBE = 8
_MIN_CANDIDATES = 128
_READ_CHUNK = 64


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [v for p in parts for v in p]


def _cat_inputs(parts: list[Inputs]) -> Inputs:
    """Model inputs of several probe sets, concatenated leaf by leaf (one structure for all)."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    if isinstance(first, tuple):
        return tuple(torch.cat([p[j] for p in parts]) for j in range(len(first)))  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def _take(value: Any, rows: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows]
    return [value[j] for j in rows.tolist()]


def spread_over_classes(candidates: torch.Tensor, labels: Optional[torch.Tensor], num: int) -> torch.Tensor:
    """The first ``num`` of ``candidates`` (already in random order), taken round-robin over classes.

    Every class present among the candidates shows up once (classes in increasing order) before any class shows up
    twice. Without labels (``None`` or not one integer per candidate), the first ``num`` candidates. The result is a
    prefix-stable sequence: the first ``k`` picks for ``num`` equal the picks for ``num = k`` when each class occurs
    among the candidates.

    Example:
        >>> spread_over_classes(torch.tensor([7, 3, 5, 1, 0]), torch.tensor([1, 1, 0, 2, 0]), num=4).tolist()
        [5, 7, 1, 0]
    """
    candidates = torch.as_tensor(candidates).reshape(-1)
    num = min(check_int(num, "num", minimum=1), int(candidates.numel()))
    usable = (
        labels is not None
        and labels.dim() == 1
        and labels.shape[0] == candidates.shape[0]
        and not labels.is_floating_point()
        and not labels.is_complex()
    )
    if not usable:
        return candidates[:num].clone()
    by_class: dict[int, list[int]] = {}
    for j, y in enumerate(labels.tolist()):  # type: ignore[union-attr]
        by_class.setdefault(int(y), []).append(j)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < num:
        for q in queues:
            if depth < len(q) and len(picked) < num:
                picked.append(q[depth])
        depth += 1
    return candidates[torch.tensor(picked, dtype=torch.long)]


@dataclass
class ProbeSet:
    """Inputs with their labels, dataset indices, metadata and masks, kept on the CPU.

    ``inputs`` are what the model takes: one tensor, or, for models with several inputs, a tuple (positional
    arguments) or a dict (keyword arguments, e.g. ``input_ids`` and ``attention_mask``) of tensors with one row per
    probe (see :class:`BatchAccessor`'s ``input_key``).

    Build it with :meth:`from_dataset` (by dataset position, the callbacks' way), :meth:`from_batches` or directly;
    store it with :meth:`state_dict` (plain tensors, picklable). ``indices`` are the batch's index key values when it
    has one (see :class:`BatchAccessor`), else the positions in the dataset the probes were read from.

    Example:
        >>> batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
        >>> probes = ProbeSet.from_batches(batches, num=4, seed=0)
        >>> len(probes), sorted(probes.targets.tolist())
        (4, [0, 0, 1, 1])
    """

    inputs: Inputs
    targets: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return input_batch_size(self.inputs, "ProbeSet.inputs")

    @classmethod
    def from_batch(
        cls, batch: Any, accessor: Optional[BatchAccessor] = None, positions: Optional[torch.Tensor] = None
    ) -> "ProbeSet":
        """Every sample of one batch, copied to the CPU as normal (non-inference) tensors; ``positions`` are the
        samples' dataset positions, used as ``indices`` when the batch has no index key."""
        accessor = accessor or BatchAccessor()
        with torch.inference_mode(False):
            cpu = lambda v: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            targets = accessor.targets(batch)
            indices = accessor.indices(batch)
            if indices is None and positions is not None:
                indices = torch.as_tensor(positions).long()
            return cls(
                inputs=map_inputs(cpu, accessor.inputs(batch)),
                targets=None if targets is None else cpu(targets),
                indices=None if indices is None else cpu(indices),
                metadata={k: cpu(v) if isinstance(v, torch.Tensor) else list(v)
                          for k, v in accessor.metadata(batch).items()},
                masks={k: cpu(v) for k, v in accessor.masks(batch).items()},
            )

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        num: int,
        accessor: Optional[BatchAccessor] = None,
        seed: int = 0,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        transfer: Optional[Callable[[Any], Any]] = None,
        max_candidates: Optional[int] = None,
    ) -> "ProbeSet":
        """Draw ``num`` items of a map-style ``dataset`` by position, spread over classes, reproducibly from ``seed``.

        A private generator permutes ``range(len(dataset))``; the first ``max_candidates`` positions (default
        ``max(8 * num, 128)``) are read in small batches for their labels only, the probes are picked with
        :func:`spread_over_classes`, and only those items are read again and kept. The global RNGs are restored
        afterwards (items may run random transforms).

        Args:
            dataset: supports ``len`` and ``dataset[i]``.
            num: how many probes (fewer if the dataset is smaller).
            accessor: reads inputs, labels, ids, metadata and masks from the collated batch.
            seed: seed of the private generator.
            collate_fn: turns a list of items into a batch (the dataloader's; default: torch's ``default_collate``).
            transfer: applied to each collated batch before it is read (e.g. the move to the model's device with the
                LightningModule's batch-transfer hooks).
            max_candidates: how many positions are read for their labels.

        Example:
            >>> data = torch.utils.data.TensorDataset(torch.randn(40, 1, 4, 4), torch.arange(40) % 4)
            >>> probes = ProbeSet.from_dataset(data, num=4, seed=0)
            >>> sorted(probes.targets.tolist()), torch.equal(probes.inputs, data.tensors[0][probes.indices])
            ([0, 1, 2, 3], True)
        """
        num = check_int(num, "num", minimum=1)
        size = len(dataset)
        if size == 0:
            raise ValueError("the validation dataset is empty: there is nothing to draw probes from")
        accessor = accessor or BatchAccessor()
        collate = collate_fn or torch.utils.data.default_collate
        move = transfer or (lambda b: b)
        cap = min(size, max_candidates or max(_CANDIDATES_PER_PROBE * num, _MIN_CANDIDATES))
        read = lambda rows: move(collate([dataset[int(i)] for i in rows]))  # noqa: E731
        with global_rng_preserved(), torch.inference_mode(False):
            order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
            candidates = order[:cap]
            labels: Optional[torch.Tensor] = None
            if num < size:
                parts = []
                for start in range(0, cap, _READ_CHUNK):
                    y = accessor.targets(read(candidates[start:start + _READ_CHUNK].tolist()))
                    if y is None:
                        parts = []
                        break
                    parts.append(y.detach().cpu().reshape(-1) if y.dim() <= 1 else y.detach().cpu())
                labels = torch.cat(parts) if parts and all(p.dim() == 1 for p in parts) else None
            chosen = spread_over_classes(candidates, labels, num)
            return cls.from_batch(read(chosen.tolist()), accessor, positions=chosen)

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Any],
        num: int,
        accessor: Optional[BatchAccessor] = None,
        seed: int = 0,
        max_candidates: Optional[int] = None,
    ) -> "ProbeSet":
        """Draw ``num`` examples from ``batches``, spread over classes when labels exist, reproducibly from ``seed``.

        Reads at most ``max_candidates`` examples (default ``max(20 * num, 512)``). Uses a private generator: the
        global RNG is untouched.
        """
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        accessor = accessor or BatchAccessor()
        cap = max_candidates or max(20 * num, 512)
        parts: list[ProbeSet] = []
        seen = 0
        for batch in batches:
            parts.append(cls.from_batch(batch, accessor))
            seen += len(parts[-1])
            if seen >= cap:
                break
        if not parts:
            raise ValueError("no batches to draw probes from: is the validation dataloader empty?")
        pool = cls.concat(parts)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        return pool.select(spread_over_classes(order, _class_labels(pool.targets, order), num))

    @classmethod
    def concat(cls, parts: Sequence["ProbeSet"]) -> "ProbeSet":
        """One probe set of ``parts`` in order; a field missing from any part is dropped."""
        first = parts[0]
        return cls(
            inputs=_cat_inputs([p.inputs for p in parts]),
            targets=torch.cat([p.targets for p in parts]) if all(p.targets is not None for p in parts) else None,
            indices=torch.cat([p.indices for p in parts]) if all(p.indices is not None for p in parts) else None,
            metadata={k: _cat([p.metadata[k] for p in parts]) for k in first.metadata
                      if all(k in p.metadata for p in parts)},
            masks={k: torch.cat([p.masks[k] for p in parts]) for k in first.masks if all(k in p.masks for p in parts)},
        )

    def select(self, rows: torch.Tensor) -> "ProbeSet":
        """The probes at ``rows`` (positions in this set), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ProbeSet(
            inputs=map_inputs(lambda v: v[rows], self.inputs),
            targets=None if self.targets is None else self.targets[rows],
            indices=None if self.indices is None else self.indices[rows],
            metadata={k: _take(v, rows) for k, v in self.metadata.items()},
            masks={k: v[rows] for k, v in self.masks.items()},
        )

    def to(self, device: torch.device | str) -> "ProbeSet":
        """A copy whose tensors live on ``device``."""
        mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return ProbeSet(
            inputs=map_inputs(lambda v: v.to(device), self.inputs),
            targets=mv(self.targets),
            indices=mv(self.indices),
            metadata={k: mv(v) for k, v in self.metadata.items()},
            masks={k: v.to(device) for k, v in self.masks.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable state for checkpoints."""
        return {"inputs": self.inputs, "targets": self.targets, "indices": self.indices,
                "metadata": dict(self.metadata), "masks": dict(self.masks)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ProbeSet":
        """Inverse of :meth:`state_dict`."""
        return cls(inputs=state["inputs"], targets=state.get("targets"), indices=state.get("indices"),
                   metadata=dict(state.get("metadata", {})), masks=dict(state.get("masks", {})))


def _class_labels(targets: Optional[torch.Tensor], order: torch.Tensor) -> Optional[torch.Tensor]:
    return None if targets is None or targets.dim() != 1 else targets[order]


class ProbePool:
    """The examples of a stream of batches that a probe draw of ``num`` can pick, in bounded memory: for data without
    positions (an ``IterableDataset``).

    Every example gets a random key from a private generator; the draw takes examples in key order, round-robin over
    classes (:func:`spread_over_classes`), so it only ever needs the ``ceil(num / C)`` smallest keys of each of the
    ``C`` lowest classes (``C <= num``), or the ``num`` smallest keys without labels. Only those are kept: about
    ``num + C`` examples however long the stream. Pools of several processes merge by key (:meth:`merge`).

    Example:
        >>> pool = ProbePool(num=4, seed=0)
        >>> for _ in range(10):
        ...     pool.add((torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])))
        >>> pool.seen, len(pool)
        (40, 4)
        >>> sorted(pool.draw().targets.tolist())  # one per class
        [0, 1, 2, 3]
    """

    def __init__(self, num: int, seed: int = 0, accessor: Optional[BatchAccessor] = None) -> None:
        self.num = check_int(num, "num", minimum=1)
        self.accessor = accessor or BatchAccessor()
        self._gen = torch.Generator().manual_seed(check_int(seed, "seed"))
        self.keys = torch.empty(0, dtype=torch.float64)
        self.samples: Optional[ProbeSet] = None
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    def add(self, batch: Any) -> None:
        """Offer every example of ``batch``."""
        n = input_batch_size(self.accessor.inputs(batch), "the batch's inputs")
        keys = torch.rand(n, generator=self._gen, dtype=torch.float64)
        self.seen += n
        self._keep(keys, ProbeSet.from_batch(batch, self.accessor))

    def merge(self, other: "ProbePool") -> None:
        """Take in another pool's examples (e.g. another process's)."""
        self.seen += other.seen
        if other.samples is not None:
            self._keep(other.keys, other.samples)

    def _keep(self, keys: torch.Tensor, samples: ProbeSet) -> None:
        all_keys = torch.cat([self.keys, keys])
        pool = samples if self.samples is None else ProbeSet.concat([self.samples, samples])
        labels = _class_labels(pool.targets, torch.arange(len(pool)))
        if labels is None or labels.is_floating_point():
            keep = torch.argsort(all_keys)[: self.num]
        else:
            classes = labels.unique(sorted=True)[: self.num]
            depth = math.ceil(self.num / len(classes))
            keep = torch.cat([
                rows[torch.argsort(all_keys[rows])[:depth]]
                for rows in (torch.nonzero(labels == c).reshape(-1) for c in classes)
            ])
            keep = keep[torch.argsort(all_keys[keep])]
        self.keys, self.samples = all_keys[keep], pool.select(keep)

    def draw(self, num: Optional[int] = None) -> ProbeSet:
        """``num`` (default: the pool's) of the kept examples, in key order, spread over classes."""
        if self.samples is None:
            raise ValueError("no batches to draw probes from: is the validation dataloader empty?")
        order = torch.argsort(self.keys)
        num = self.num if num is None else num
        return self.samples.select(spread_over_classes(order, _class_labels(self.samples.targets, order), num))
