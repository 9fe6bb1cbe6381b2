"""RoutingMonitor under DDP (2 CPU processes, gloo) vs one process: run by tests/callbacks/test_routing_monitor.py.

Validates a fixed model on 539 digits (odd, so the DistributedSampler repeats one sample) and writes each rank's
routing statistics and ablation (on 200 of the samples) to ``--out`` as JSON. ``--tuples``: ``(x, y)`` batches
without sample indices (the monitor's rank-safe position ids are used); ``--fail-rank r``: the ablation's
``forward_fn`` raises on rank ``r``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_lens.callbacks import RoutingMonitor
from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.testing import LitClassifier

# the data set and the DDP scaffolding live in tests/_data.py and tests/_ddp.py; tests/ is on sys.path under pytest
# (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402
from _data import FlatDigits  # noqa: E402

NUM_SAMPLES = 539


class FailOnRank:
    """``forward_fn`` that raises on one rank once the dry run (2 samples) is over."""

    def __init__(self, rank: Optional[int]) -> None:
        self.rank = rank

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == self.rank and x.shape[0] > 2:
            raise RuntimeError(f"rank {rank} broke")
        return module(x)


def run_validate(devices: int, root: str, tuples: bool = False, fail_rank: Optional[int] = None) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(64), MixtureOfExperts(64, 32, 4, k=2, noise_seed=0), nn.ReLU(), nn.Linear(32, 10))
    model = LitClassifier(net, num_classes=10)
    monitor = RoutingMonitor(ablation_every_n_epochs=1, ablation_samples=200, forward_fn=FailOnRank(fail_rank))
    trainer = _ddp.trainer(devices, root, [monitor])
    digits = FlatDigits("val")
    data = (TensorDataset(digits.x[:NUM_SAMPLES], digits.y[:NUM_SAMPLES]) if tuples
            else Subset(digits, range(NUM_SAMPLES)))
    trainer.validate(model, DataLoader(data, batch_size=64), verbose=False)
    stats, ablation = monitor.last_statistics["model.1"], monitor.last_ablation.get("model.1")
    return {
        "rank": trainer.global_rank,
        "num_tokens": stats.num_tokens,
        "nmi": round(stats.nmi, 6),
        "expert_class_counts": stats.expert_class_counts.tolist(),
        "drop": None if ablation is None else [[round(v, 6) for v in row]
                                               for row in ablation.drop.nan_to_num(-9.0).tolist()],
        "support": None if ablation is None else ablation.support.tolist(),
    }


def main() -> None:
    parser = _ddp.script_arguments()
    parser.add_argument("--tuples", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    _ddp.write_result(args.out, run_validate(args.devices, args.root, tuples=args.tuples, fail_rank=args.fail_rank))


if __name__ == "__main__":
    main()
