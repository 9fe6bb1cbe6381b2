"""PrivacyAuditCallback under DDP (2 CPU processes, gloo) vs one process: run by
tests/callbacks/test_privacy_audit.py, which also imports ``make_module``.

Trains a small MLP on 96 SpuriousDigits, unshuffled, 32 examples per step in both runs (one process: batches of 32;
two: 16 per rank, every other example), so the weights agree up to rounding. The callback audits 39 members against
39 validation samples (odd: the ranks' shares differ in size) every epoch; rank zero writes its history and the
gathered statistics to ``--out`` as JSON (rank one writes what it holds: nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens.callbacks import PrivacyAuditCallback
from lightning_lens.lightning_modules import LitClassifier

# tests/_ddp.py: tests/ is on sys.path under pytest (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402
from _data import FlippedDigits  # noqa: E402

NUM_TRAIN, NUM_AUDITED, STEP_BATCH = 96, 39, 32


def make_module(seed: int = 0, dropout: float = 0.0) -> LitClassifier:
    torch.manual_seed(seed)
    layers = [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 64), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return LitClassifier(nn.Sequential(*layers, nn.Linear(64, 10)), optimizer="sgd", lr=0.1)


def run_fit(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    train, val = FlippedDigits(NUM_TRAIN, 0.0), FlippedDigits(60, 0.0, "val")
    callback = PrivacyAuditCallback(num_samples=NUM_AUDITED, batch_size=8, max_overhead=None, strict=True)
    trainer = _ddp.trainer(devices, root, [callback], max_epochs=2, logger=False, enable_checkpointing=False,
                           use_distributed_sampler=False, num_sanity_val_steps=0)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the launcher sets it in the processes it starts
    shard = list(range(rank, NUM_TRAIN, devices))
    trainer.fit(make_module(), DataLoader(train, batch_size=STEP_BATCH // devices, sampler=shard),
                DataLoader(val, batch_size=STEP_BATCH // devices))
    out: dict = {"rank": trainer.global_rank, "history": None}
    if trainer.is_global_zero:
        out["history"] = callback.history
        stats = callback.last_statistics
        out["statistics"] = {group: {k: v.tolist() for k, v in cols.items()} for group, cols in stats.items()}
    return out


def main() -> None:
    args = _ddp.script_arguments().parse_args()
    _ddp.write_result(args.out, run_fit(args.devices, args.root))


if __name__ == "__main__":
    main()
