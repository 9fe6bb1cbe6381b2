"""Collecting the probe set inside Lightning: from the first real validation epoch's batches, once.

Shared by every callback that explains a fixed set of examples, so they show the same probes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_lens._pl import Callback, pl
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.checks import check_int


class ProbeCollector:
    """Gathers candidate batches during validation and draws a :class:`ProbeSet` from them at epoch end.

    Rank zero draws; the result is broadcast so every rank holds the same probes. Once drawn, the probes stay fixed
    (also across checkpoint resume, through :meth:`state_dict`; probes passed explicitly win over a checkpoint's).

    Args:
        num: how many probes.
        accessor: reads inputs, labels, ids, metadata and masks from batches.
        seed: seed of the private generator that picks the probes.
        probes: a ready probe set (then nothing is collected).
        owner: the callback collecting; given, the probes another callback of the trainer already holds are reused
            (see :func:`shared_probes`) and nothing is collected while they exist.
    """

    def __init__(
        self,
        num: int,
        accessor: BatchAccessor,
        seed: int = 0,
        probes: Optional[ProbeSet] = None,
        owner: Any = None,
    ) -> None:
        check_int(num, "num_probes", minimum=1)
        if probes is not None and not isinstance(probes, ProbeSet):
            raise TypeError(f"probes must be a lightning_lens.utils.ProbeSet or None, got {type(probes).__name__}")
        self.num = num
        self.accessor = accessor
        self.seed = seed
        self.probes = probes
        self.owner = owner
        self.explicit = probes is not None
        self._batches: list[Any] = []
        self._seen = 0
        self._cap = max(20 * num, 512)

    def update(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int = 0) -> None:
        """Keep a CPU copy of ``batch`` while candidates are still needed (call from ``on_validation_batch_end``)."""
        if self.probes is not None or trainer.sanity_checking or dataloader_idx != 0 or self._seen >= self._cap:
            return
        if self.owner is not None and shared_probes(trainer, exclude=self.owner) is not None:
            return
        self._batches.append(_to_cpu(batch))
        self._seen += int(self.accessor.inputs(batch).shape[0])

    def finalize(self, trainer: "pl.Trainer") -> Optional[ProbeSet]:
        """Draw the probes from what was collected (call from ``on_validation_epoch_end``); returns them or None."""
        if self.probes is None and self.owner is not None:
            self.probes = shared_probes(trainer, exclude=self.owner)
        if self.probes is None and not trainer.sanity_checking:
            probes = None
            if self._batches:
                # under trainer.validate() this runs in inference mode; tensors made outside it are normal tensors,
                # which later autograd passes and in-place ops accept
                with torch.inference_mode(False):
                    probes = ProbeSet.from_batches(self._batches, self.num, self.accessor, seed=self.seed)
            if trainer.world_size > 1:
                probes = trainer.strategy.broadcast(probes, src=0)
            self.probes = probes
            self._batches = []
        return self.probes

    def state_dict(self) -> dict[str, Any]:
        return {"probes": None if self.probes is None else self.probes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("probes") is not None and not self.explicit:
            self.probes = ProbeSet.from_state_dict(state["probes"])


class ProbeCallback(Callback):
    """Base of the callbacks that explain the probes of a :class:`ProbeCollector` in ``self._collector`` (built with
    ``owner=self``): exposes them as :attr:`probes`, feeds the collector every validation batch and keeps the probes
    in the checkpoint. Subclasses draw them with ``self._collector.finalize(trainer)`` in ``on_validation_epoch_end``.
    """

    _collector: ProbeCollector

    @property
    def probes(self) -> Optional[ProbeSet]:
        """The probe set (None until drawn); other lightning-lens callbacks reuse it."""
        return self._collector.probes

    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collector.update(trainer, batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, **self._collector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._collector.load_state_dict(state_dict)


def shared_probes(trainer: "pl.Trainer", exclude: Any = None) -> Optional[ProbeSet]:
    """The probe set another callback of this trainer already drew (attribute ``probes``), if any."""
    for cb in trainer.callbacks:
        if cb is exclude:
            continue
        probes = getattr(cb, "probes", None)
        if isinstance(probes, ProbeSet):
            return probes
    return None


def _to_cpu(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().clone()
    if isinstance(batch, dict):
        return {k: _to_cpu(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_cpu(v) for v in batch) if not hasattr(batch, "_fields") else type(batch)(
            *(_to_cpu(v) for v in batch))
    return batch
