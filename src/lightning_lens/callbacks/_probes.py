"""The probe set inside Lightning: drawn once from the validation data by dataset position, shared by rule.

**Drawing.** A map-style validation dataset (the usual case) is read directly: :meth:`ProbeSet.from_dataset` draws
positions with a private generator seeded by ``probe_seed``, reads a few candidates for their labels, keeps the chosen
items (collated by the loader's ``collate_fn`` and moved through the LightningModule's batch-transfer hooks) and
nothing else. The draw depends on the dataset and the seed only, so 1 and N processes pick the same probes, with no
communication, and no validation batch is copied. A stream (``IterableDataset``, or a loader without positions) is
sampled during the first validation epoch into a bounded :class:`~lightning_lens.utils.probes.ProbePool` (about
``num_probes`` plus the number of classes examples); under DDP the pools of all ranks are merged (a collective, in
:meth:`ProbeCollector.finalize`).

**Sharing.** Callbacks of one trainer with the same ``num_probes``, ``probe_seed`` and batch keys share one probe set
(the first drawn). A callback asking for another ``num_probes`` or ``probe_seed`` draws its own, and a warning names
both callbacks so that nobody expects them to show the same examples. Explicitly passed probes are never replaced.

**Resume.** The probes are saved in the checkpoint with ``num_probes`` and ``probe_seed``: a resumed callback keeps
them (also if the validation data changed), unless it now asks for another ``num_probes`` or ``probe_seed``: then it
draws anew and says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import LensCallback
from lightning_lens.callbacks._gather import gather_objects
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.checks import check_instance, check_int
from lightning_lens.utils.probes import ProbePool

__all__ = ["ProbeCallback", "ProbeCollector", "shared_probes"]


class ProbeCollector:
    """Draws and holds the probe set of one callback (see the module docstring).

    Args:
        num: how many probes.
        accessor: reads inputs, labels, ids, metadata and masks from batches.
        seed: seed of the private generator that picks the probes.
        probes: a ready probe set (then nothing is drawn).
        owner: the callback it belongs to; other callbacks of the trainer are found through their ``_collector``.
    """

    def __init__(
        self,
        num: int,
        accessor: BatchAccessor,
        seed: int = 0,
        probes: Optional[ProbeSet] = None,
        owner: Any = None,
    ) -> None:
        self.num = check_int(num, "num_probes", minimum=1)
        self.seed = check_int(seed, "probe_seed")
        if probes is not None and not isinstance(probes, ProbeSet):
            raise TypeError(f"probes must be a lightning_lens.utils.ProbeSet or None, got {type(probes).__name__}")
        self.accessor = check_instance(accessor, "accessor", BatchAccessor)
        self.probes = probes
        self.owner = owner
        self.explicit = probes is not None
        self._pool: Optional[ProbePool] = None
        self._pool_epoch: Optional[tuple[Any, int]] = None
        self._pool_complete = False
        self._checked: Optional[tuple[Any, int]] = None
        self._stream = False

    # ------------------------------------------------------------------------------------------------------- identity
    @property
    def settings(self) -> tuple[int, int]:
        """``(num_probes, probe_seed)``: what the collector asks for."""
        return (self.num, self.seed)

    def _share_key(self) -> tuple[Any, ...]:
        a = self.accessor
        return (self.num, self.seed, a.input_key, a.target_key, a.index_key)

    def _name(self) -> str:
        return getattr(self.owner, "name", type(self.owner).__name__)

    # -------------------------------------------------------------------------------------------------------- drawing
    def update(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int = 0) -> None:
        """Offer a validation batch (call from ``on_validation_batch_end``). Only a stream without positions is
        sampled, during the first real validation epoch, while no probes exist; otherwise this does nothing."""
        if self.probes is not None or self._pool_complete or trainer.sanity_checking or dataloader_idx != 0:
            return
        epoch = (trainer.state.fn, int(trainer.current_epoch))
        if self._checked != epoch:  # once per epoch: is the validation data a stream?
            self._checked = epoch
            self._stream = _map_style_loader(trainer) is None
        if not self._stream:
            return
        if self._pool is None:
            self._pool_epoch = epoch
            self._pool = ProbePool(self.num, seed=self.seed + 7919 * int(trainer.global_rank), accessor=self.accessor)
        elif epoch != self._pool_epoch:  # one full epoch sampled: the pool is complete
            self._pool_complete = True
            return
        self._pool.add(batch)

    def finalize(self, trainer: "pl.Trainer") -> Optional[ProbeSet]:
        """The probes, drawn now if needed (call on every rank at the same point, e.g. in ``on_validation_epoch_end``:
        for a stream the ranks' samples are merged, a collective). Returns None when there is nothing to draw from."""
        if self.probes is None and not trainer.sanity_checking:
            if self._pool is not None:
                self.probes = self._draw_from_pools(trainer)
            else:
                self.probes = self._shared(trainer) or self._draw_from_dataset(trainer)
        return self.probes

    def _shared(self, trainer: "pl.Trainer") -> Optional[ProbeSet]:
        """A peer's probes drawn with the same settings; warns (once, on rank zero) about peers with other settings."""
        mine = self._share_key()
        found = None
        callbacks = list(getattr(trainer, "callbacks", []))
        for position, peer in _peers(trainer, self):
            if peer.explicit:
                continue
            if peer._share_key() == mine:
                found = found or peer.probes
            elif peer.settings != self.settings and position < _index(callbacks, self.owner):
                self._warn(
                    f"probes:{peer._name()}",
                    f"{self._name()} (num_probes={self.num}, probe_seed={self.seed}) and {peer._name()}"
                    f" (num_probes={peer.num}, probe_seed={peer.seed}) ask for different probes, so each draws its"
                    " own and they show different examples; give both the same num_probes and probe_seed to share"
                    " one probe set",
                    trainer,
                )
        return found

    def _draw_from_dataset(self, trainer: "pl.Trainer") -> Optional[ProbeSet]:
        loader = _map_style_loader(trainer)
        if loader is None:
            return None
        module = trainer.lightning_module
        device = getattr(module, "device", torch.device("cpu"))

        def transfer(batch: Any) -> Any:
            return trainer.strategy.batch_to_device(batch, device) if module is not None else batch

        return ProbeSet.from_dataset(
            loader.dataset, self.num, self.accessor, seed=self.seed, collate_fn=loader.collate_fn, transfer=transfer
        )

    def _draw_from_pools(self, trainer: "pl.Trainer") -> Optional[ProbeSet]:
        local = self._pool
        pools = gather_objects(trainer, local)  # a collective under DDP: every rank has a pool (maybe empty)
        merged: Optional[ProbePool] = None
        for pool in pools:
            if pool is None:
                continue
            if merged is None:
                merged = ProbePool(self.num, seed=self.seed, accessor=self.accessor)
            merged.merge(pool)
        self._pool = None
        self._pool_complete = True
        if merged is None or len(merged) == 0:
            return None
        return merged.draw()

    def _warn(self, key: str, message: str, trainer: Optional["pl.Trainer"] = None) -> None:
        if trainer is not None and not getattr(trainer, "is_global_zero", True):
            return
        warn_once = getattr(self.owner, "warn_once", None)
        if callable(warn_once):
            warn_once(key, message)
        else:
            warnings.warn(message, UserWarning, stacklevel=3)

    # ---------------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "probes": None if self.probes is None else self.probes.state_dict(),
            "num_probes": self.num,
            "probe_seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("probes") is None or self.explicit:
            return
        saved = (state.get("num_probes", self.num), state.get("probe_seed", self.seed))
        if saved != self.settings:
            self._warn(
                "probes:resume",
                f"{self._name()}: the checkpoint's probes were drawn with num_probes={saved[0]},"
                f" probe_seed={saved[1]}; this run asks for num_probes={self.num}, probe_seed={self.seed}, so the"
                " probes are drawn anew (the maps before and after the resume show different examples). Resume with"
                f" num_probes={saved[0]}, probe_seed={saved[1]} to keep them.",
            )
            self.probes = None
            return
        self.probes = ProbeSet.from_state_dict(dict(state["probes"]))


class ProbeCallback(LensCallback):
    """Base of the callbacks that explain the probes of a :class:`ProbeCollector` in ``self._collector`` (built with
    ``owner=self``): exposes them as :attr:`probes`, offers it the validation batches and keeps the probes in the
    checkpoint. Subclasses draw them with ``self._collector.finalize(trainer)`` on every rank (e.g. first in
    ``on_validation_epoch_end`` of a due epoch).
    """

    _collector: ProbeCollector

    @property
    def probes(self) -> Optional[ProbeSet]:
        """The probe set (None until drawn)."""
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
        return {**super().state_dict(), **self._collector.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._collector.load_state_dict(state_dict)


def shared_probes(trainer: "pl.Trainer", exclude: Any = None) -> Optional[ProbeSet]:
    """Probes another callback of this trainer drew with the settings of ``exclude``'s collector (any drawn probes
    when ``exclude`` has none), or None."""
    mine = getattr(exclude, "_collector", None)
    for cb in getattr(trainer, "callbacks", []):
        if cb is exclude:
            continue
        peer = getattr(cb, "_collector", None)
        if isinstance(peer, ProbeCollector):
            same = not isinstance(mine, ProbeCollector) or peer._share_key() == mine._share_key()
            if peer.probes is not None and same:
                return peer.probes
        elif mine is None and isinstance(getattr(cb, "probes", None), ProbeSet):
            return cb.probes
    return None


def _peers(trainer: "pl.Trainer", collector: ProbeCollector) -> list[tuple[int, ProbeCollector]]:
    out = []
    for i, cb in enumerate(getattr(trainer, "callbacks", [])):
        peer = getattr(cb, "_collector", None)
        if cb is not collector.owner and isinstance(peer, ProbeCollector) and peer is not collector:
            out.append((i, peer))
    return out


def _index(callbacks: list[Any], owner: Any) -> int:
    return next((i for i, cb in enumerate(callbacks) if cb is owner), len(callbacks))


def _map_style_loader(trainer: "pl.Trainer") -> Optional[torch.utils.data.DataLoader]:
    """The first validation ``DataLoader`` if it reads a map-style dataset in collated batches, else None."""
    loop = trainer.validate_loop if trainer.state.fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
    combined = getattr(loop, "_combined_loader", None)
    loaders = combined.iterables if combined is not None else getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if not isinstance(loaders, torch.utils.data.DataLoader):
        return None
    dataset = loaders.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not getattr(loaders, "_auto_collation", True):
        return None
    try:
        len(dataset)
    except TypeError:
        return None
    return loaders
