"""A fixed probe set: the few validation examples every explanation callback shows, stable across epochs and resumes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lightning_lens.utils.batch import BatchAccessor


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [v for p in parts for v in p]


@dataclass
class ProbeSet:
    """Inputs with their labels, dataset indices, metadata and masks, kept on the CPU.

    Build it with :meth:`from_batches`; store it with :meth:`state_dict` (plain tensors, picklable).

    Example:
        >>> batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
        >>> probes = ProbeSet.from_batches(batches, num=4, seed=0)
        >>> len(probes), sorted(probes.targets.tolist())
        (4, [0, 0, 1, 1])
    """

    inputs: torch.Tensor
    targets: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

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
        xs, ys, ids, metas, masks = [], [], [], [], []
        seen = 0
        for batch in batches:
            x = accessor.inputs(batch)
            xs.append(x.detach().cpu().clone())
            y = accessor.targets(batch)
            ys.append(None if y is None else y.detach().cpu().clone())
            i = accessor.indices(batch)
            ids.append(None if i is None else i.detach().cpu().clone())
            metas.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in accessor.metadata(batch).items()})
            masks.append({k: v.detach().cpu().clone() for k, v in accessor.masks(batch).items()})
            seen += x.shape[0]
            if seen >= cap:
                break
        if not xs:
            raise ValueError("no batches to draw probes from: is the validation dataloader empty?")
        inputs = torch.cat(xs)
        targets = torch.cat(ys) if all(y is not None for y in ys) else None
        indices = torch.cat(ids) if all(i is not None for i in ids) else None
        metadata = {k: _cat([m[k] for m in metas]) for k in metas[0] if all(k in m for m in metas)}
        mask_d = {k: torch.cat([m[k] for m in masks]) for k in masks[0] if all(k in m for m in masks)}

        gen = torch.Generator().manual_seed(seed)
        n = inputs.shape[0]
        num = min(num, n)
        order = torch.randperm(n, generator=gen)
        if targets is not None and targets.dim() == 1:
            # round-robin over classes so every class shows up before any repeats
            by_class: dict[int, list[int]] = {}
            for j in order.tolist():
                by_class.setdefault(int(targets[j]), []).append(j)
            picked: list[int] = []
            queues = [by_class[c] for c in sorted(by_class)]
            while len(picked) < num:
                for q in queues:
                    if q and len(picked) < num:
                        picked.append(q.pop(0))
            chosen = torch.tensor(picked)
        else:
            chosen = order[:num]
        return cls(
            inputs=inputs[chosen],
            targets=None if targets is None else targets[chosen],
            indices=None if indices is None else indices[chosen],
            metadata={k: (v[chosen] if isinstance(v, torch.Tensor) else [v[j] for j in chosen.tolist()])
                      for k, v in metadata.items()},
            masks={k: v[chosen] for k, v in mask_d.items()},
        )

    def to(self, device: torch.device | str) -> "ProbeSet":
        """A copy whose tensors live on ``device``."""
        mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return ProbeSet(
            inputs=self.inputs.to(device),
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
