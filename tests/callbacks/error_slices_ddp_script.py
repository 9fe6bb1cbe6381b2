"""Deterministic runs with SubgroupErrorSlices, on 1 process or under DDP (gloo, 2 CPU processes).

Used in-process by the callback tests and as a script by the DDP tests (Lightning relaunches this file for rank 1):

- ``python error_slices_ddp_script.py --devices 2 --out result.json``: ``trainer.validate`` on a dataset with an
  index key (the binning, PCA and clusters fitted on a sample of ``FIT_ROWS`` rows); rank zero writes the slices
  found, and every rank writes to ``result.json.rank<r>`` the bytes it contributed to collectives and the bytes of
  its rows (what gathering them would send).
- ``... --mode fit-fail --out result.json``: a 2-epoch fit on data without an index key (ids from ``SampleIds``) in
  which rank zero's slice search fails at the first epoch; every rank writes what it ended with to
  ``result.json.rank<r>``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens._pl import Callback, LightningModule, Trainer
from lightning_lens.callbacks import SubgroupErrorSlices

N_CLASSES = 4


class PlantedImages(Dataset):
    """1x4x4 "images" whose first four pixels one-hot encode a class; a planted group shows the wrong class.

    Metadata: ``colour`` (0-3), ``size`` (0-2), ``shade`` (uniform float). In ``colour=2 & size=1`` 80% of the images
    encode ``(label + 1) % 4`` (so a reader of those pixels errs); elsewhere 4% do.
    """

    def __init__(self, n: int = 1001, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.label = rng.integers(0, N_CLASSES, n)
        self.colour = rng.integers(0, 4, n)
        self.size = rng.integers(0, 3, n)
        self.shade = rng.uniform(0, 1, n)
        self.planted = (self.colour == 2) & (self.size == 1)
        wrong = rng.random(n) < np.where(self.planted, 0.8, 0.04)
        shown = np.where(wrong, (self.label + 1) % N_CLASSES, self.label)
        images = rng.uniform(0, 0.2, (n, 1, 4, 4)).astype(np.float32)
        images[np.arange(n), 0, 0, shown] = 1.0
        images[np.arange(n), 0, 1, :3] += np.eye(3, dtype=np.float32)[self.size]  # size is visible to the network
        self.images = torch.from_numpy(images)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.label[i]), "index": i, "colour": int(self.colour[i]),
                "size": int(self.size[i]), "shade": float(self.shade[i])}


class Unindexed(Dataset):
    """:class:`PlantedImages` items without their ``index``: sample ids must come from the callback itself."""

    def __init__(self, n: int = 1001, seed: int = 0) -> None:
        self.base = PlantedImages(n, seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        del item["index"]
        return item


class PixelReader(LightningModule):
    """Flatten -> Linear(16, 8) -> ReLU -> Linear(8, 4), initialised to read the class pixels (logit = 10 x pixel).

    ``return_logits=False`` makes ``validation_step`` return only the loss (the callback must then run a forward).
    """

    def __init__(self, return_logits: bool = True, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))
        with torch.no_grad():
            self.net[1].weight.zero_()
            self.net[1].bias.zero_()
            self.net[1].weight[:8, :8] = torch.eye(8)
            self.net[3].weight.zero_()
            self.net[3].bias.zero_()
            self.net[3].weight[:, :4] = 10 * torch.eye(4)
        self.return_logits = return_logits
        self.lr = lr
        self.forward_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        return self.net(x)

    @staticmethod
    def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = self._xy(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("val/loss", loss, sync_dist=True)
        return {"loss": loss, "logits": logits} if self.return_logits else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


FIT_ROWS = 200  # the sample the DDP run fits the binning, PCA and clusters on (the other rows are only counted)


def count_collective_bytes() -> dict[str, int]:
    """Wrap torch.distributed's collectives: the returned dict adds up the payload this rank contributes to each."""
    import torch.distributed as dist

    counter: dict[str, int] = defaultdict(int)

    def wrap(name: str, size: Any) -> None:
        original = getattr(dist, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counter[name] += int(size(*args, **kwargs))
            return original(*args, **kwargs)

        setattr(dist, name, wrapped)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    wrap("all_reduce", lambda tensor, *a, **k: nbytes(tensor))
    wrap("all_gather", lambda tensor_list, tensor, *a, **k: nbytes(tensor))
    wrap("all_gather_object", lambda object_list, obj, *a, **k: len(pickle.dumps(obj)))
    wrap("broadcast_object_list", lambda objects, src=0, *a, **k: len(pickle.dumps(objects)) * (dist.get_rank() == src))
    return counter


class RowBytes(Callback):
    """Records the pickled size of the rows ``target`` collected this epoch (what gathering them would send)."""

    def __init__(self, target: SubgroupErrorSlices) -> None:
        self.target = target
        self.bytes = 0

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_lens.callbacks.error_slices import _concat_rows

        self.bytes = len(pickle.dumps(_concat_rows(self.target._rows)))


def make_callback(**kwargs: Any) -> SubgroupErrorSlices:
    defaults = dict(min_support=20, embedding_layer="net.2", num_images=8, n_clusters=6)
    defaults.update(kwargs)
    return SubgroupErrorSlices(**defaults)


def run_validate(devices: int = 1, root: str = ".", indexed: bool = True, **cb_kwargs: Any) -> SubgroupErrorSlices:
    cb = make_callback(**cb_kwargs)
    rows = RowBytes(cb)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[rows, cb],
    )
    data = PlantedImages() if indexed else Unindexed()
    trainer.validate(PixelReader(), DataLoader(data, batch_size=64))
    cb.trainer_is_global_zero = trainer.is_global_zero
    cb.trainer_global_rank = trainer.global_rank
    cb.row_bytes = rows.bytes
    return cb


class BreakSearchOnce(Callback):
    """Makes the slice search of ``target`` raise the first time it runs on rank zero."""

    def __init__(self, target: SubgroupErrorSlices) -> None:
        self.target = target

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        find_steps, calls = self.target.finder.find_steps, []

        def failing_find(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the search broke on rank 0")
            return find_steps(*args, **kwargs)

        self.target.finder.find_steps = failing_find


def run_fit_with_failing_search(devices: int = 2, root: str = ".") -> dict[str, Any]:
    """Two epochs of a fixed model (lr=0) on unindexed data; rank zero's search fails at epoch 0."""
    cb = make_callback()
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[cb, BreakSearchOnce(cb)], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = DataLoader(Unindexed(), batch_size=64)
        trainer.fit(PixelReader(lr=0.0), data, data)
    out = {
        "rank": trainer.global_rank,
        "epochs": trainer.current_epoch,
        "last_result": cb.last_result,
        "worst_logged": float(trainer.callback_metrics["slices/worst_accuracy"]),
        "search_failures": [str(w.message) for w in caught if "'search' failed" in str(w.message)],
    }
    if trainer.is_global_zero:
        out["summary"] = summary(cb)
    return out


def summary(cb: SubgroupErrorSlices) -> dict[str, Any]:
    return {
        "n_samples": cb.last_result["n_samples"],
        "worst_accuracy": cb.last_result["worst_accuracy"],
        "slices": [{"name": s.name, "size": s.size, "errors": s.errors, "members": sorted(int(i) for i in s.indices),
                    "q": s.q_value} for s in cb.last_slices],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=".")
    parser.add_argument("--mode", choices=["validate", "fit-fail"], default="validate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "fit-fail":
        result = run_fit_with_failing_search(args.devices, args.root)
        with open(f"{args.out}.rank{result['rank']}", "w") as f:
            json.dump(result, f)
        return
    sent = count_collective_bytes()
    cb = run_validate(args.devices, args.root, fit_rows=FIT_ROWS)
    with open(f"{args.out}.rank{cb.trainer_global_rank}", "w") as f:
        json.dump({"sent": dict(sent), "row_bytes": cb.row_bytes}, f)
    if cb.trainer_is_global_zero:
        with open(args.out, "w") as f:
            json.dump(summary(cb), f)


if __name__ == "__main__":
    main()
