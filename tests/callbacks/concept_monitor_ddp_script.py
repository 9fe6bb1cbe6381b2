"""ConceptMonitor under DDP (2 CPU processes, gloo) vs one process: run by tests/callbacks/test_concept_monitor.py.

Validates a fixed concept bottleneck model on 301 seven-segment digits (odd, so the DistributedSampler repeats one
sample) given as ``(x, concepts, y)`` tuples without sample indices (the monitor's rank-safe position ids are used),
and writes rank zero's metrics to ``--out`` as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens.callbacks import ConceptMonitor
from lightning_lens.datasets import SevenSegmentDigits
from lightning_lens.interpretable_models import ConceptBottleneckModule

# tests/_ddp.py: tests/ is on sys.path under pytest (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402

NUM_SAMPLES = 301


def run_validate(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val = SevenSegmentDigits("val", seed=0)
    data = TensorDataset(val.images[:NUM_SAMPLES], val.concepts[:NUM_SAMPLES], val.labels[:NUM_SAMPLES])
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 7))
    module = ConceptBottleneckModule(concept_encoder=encoder, num_concepts=7, num_classes=10,
                                     concept_names=val.concept_names)
    monitor = ConceptMonitor(num_random_orders=3, leakage_folds=3)
    trainer = _ddp.trainer(devices, root, [monitor])
    trainer.validate(module, DataLoader(data, batch_size=64), verbose=False)
    result = {"rank": trainer.global_rank, "num_samples": monitor.last_num_samples, "metrics": monitor.last_metrics}
    if devices == 1:
        result["logged"] = _ddp.read_scalars(trainer.logger.log_dir)
    return result


def main() -> None:
    args = _ddp.script_arguments().parse_args()
    _ddp.write_result(args.out, run_validate(args.devices, args.root))


if __name__ == "__main__":
    main()
