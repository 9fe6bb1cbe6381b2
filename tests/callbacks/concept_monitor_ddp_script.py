"""ConceptMonitor under DDP (2 CPU processes, gloo) vs one process: run by tests/callbacks/test_concept_monitor.py.

Validates a fixed concept bottleneck model on 301 seven-segment digits (odd, so the DistributedSampler repeats one
sample) given as ``(x, concepts, y)`` tuples without sample indices (the monitor's rank-safe position ids are used),
and writes rank zero's metrics to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import ConceptMonitor
from lightning_lens.datasets import SevenSegmentDigits
from lightning_lens.interpretable_models import ConceptBottleneckModule

NUM_SAMPLES = 301


def read_scalars(log_dir: str) -> dict[str, float]:
    """Last value of every scalar in the TensorBoard event files under ``log_dir``."""
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def run_validate(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val = SevenSegmentDigits("val", seed=0)
    data = TensorDataset(val.images[:NUM_SAMPLES], val.concepts[:NUM_SAMPLES], val.labels[:NUM_SAMPLES])
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 7))
    module = ConceptBottleneckModule(concept_encoder=encoder, num_concepts=7, num_classes=10,
                                     concept_names=val.concept_names)
    monitor = ConceptMonitor(num_random_orders=3, leakage_folds=3)
    logger = TensorBoardLogger(root, name="tb")
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=logger,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                      default_root_dir=root)
    trainer.validate(module, DataLoader(data, batch_size=64), verbose=False)
    result = {"rank": trainer.global_rank, "num_samples": monitor.last_num_samples, "metrics": monitor.last_metrics}
    if devices == 1:
        result["logged"] = read_scalars(logger.log_dir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    result = run_validate(args.devices, args.root)
    Path(f"{args.out}.rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
