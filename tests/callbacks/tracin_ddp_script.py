"""TracInCallback under DDP (2 CPU processes, gloo) vs one process: run by tests/callbacks/test_tracin.py, which also
imports its helpers (``FlippedDigits``, ``make_module``).

Trains an MLP on 96 SpuriousDigits with 10 % flipped labels, unshuffled, 32 examples per step in both runs (one
process: batches of 32; two: 16 per rank, every other example, gradients averaged: Lightning's own
DistributedSampler would shuffle), so the snapshots agree up to rounding. The callback
scores a seeded subset of 95 training examples (odd: the ranks' shards differ in size) and 4 probes; rank zero's
report is written to ``--out`` as JSON (rank one writes what it holds: nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens.callbacks import TracInCallback
from lightning_lens.lightning_modules import LitClassifier

# tests/_ddp.py: tests/ is on sys.path under pytest (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402
from _data import FlippedDigits  # noqa: E402

NUM_TRAIN, NUM_SCORED, STEP_BATCH = 96, 95, 32


def make_module(seed: int = 0, lr: float = 0.05, dropout: float = 0.0) -> LitClassifier:
    torch.manual_seed(seed)
    layers = [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 32), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return LitClassifier(nn.Sequential(*layers, nn.Linear(32, 10)), optimizer="sgd", lr=lr)


def run_fit(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    train, val = FlippedDigits(NUM_TRAIN), FlippedDigits(40, 0.0, "val")
    callback = TracInCallback(every_n_epochs=1, max_train_samples=NUM_SCORED, num_probes=4, k=3, batch_size=16,
                              max_overhead=None, strict=True)
    trainer = _ddp.trainer(devices, root, [callback], max_epochs=2, logger=False, enable_checkpointing=False,
                           use_distributed_sampler=False, num_sanity_val_steps=0)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the launcher sets it in the processes it starts
    shard = list(range(rank, NUM_TRAIN, devices))
    trainer.fit(make_module(), DataLoader(train, batch_size=STEP_BATCH // devices, sampler=shard),
                DataLoader(val, batch_size=STEP_BATCH // devices))
    report = callback.last_report
    out: dict = {"rank": trainer.global_rank, "report": None}
    if report is not None:
        out["report"] = {
            "positions": report.positions.tolist(),
            "ids": report.ids.tolist(),
            "self_influence": report.self_influence.tolist(),
            "influence": report.influence.tolist(),
            "labels": report.labels.tolist(),
            "predictions": report.predictions.tolist(),
            "ranked_ids": report.ranked_ids,
            "proponents": report.proponents.tolist(),
            "opponents": report.opponents.tolist(),
            "epochs": report.epochs,
            "learning_rates": report.learning_rates,
            "planned": report.planned,
        }
    return out


def main() -> None:
    args = _ddp.script_arguments().parse_args()
    _ddp.write_result(args.out, run_fit(args.devices, args.root))


if __name__ == "__main__":
    main()
