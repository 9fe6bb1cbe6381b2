"""RoutingMonitor under DDP (2 CPU processes, gloo) vs one process: run by tests/moe/test_moe_routing_monitor.py.

Validates a fixed model on 539 digits (odd, so the DistributedSampler repeats one sample) and writes rank zero's
routing statistics and ablation to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import RoutingMonitor
from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.testing import LitClassifier

# the data set lives in this folder's conftest; loaded under a unique name (other folders have a conftest too)
_spec = importlib.util.spec_from_file_location("moe_tests_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
FlatDigits = _conftest.FlatDigits


def run_validate(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(64), MixtureOfExperts(64, 32, 4, k=2, noise_seed=0), nn.ReLU(), nn.Linear(32, 10))
    model = LitClassifier(net, num_classes=10)
    monitor = RoutingMonitor(ablation_every_n_epochs=1, ablation_samples=1000)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      logger=TensorBoardLogger(root, name="tb"), enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[monitor], default_root_dir=root)
    trainer.validate(model, DataLoader(Subset(FlatDigits("val"), range(539)), batch_size=64))
    stats, ablation = monitor.last_statistics["model.1"], monitor.last_ablation["model.1"]
    return {
        "rank": trainer.global_rank,
        "num_tokens": stats.num_tokens,
        "nmi": round(stats.nmi, 6),
        "expert_class_counts": stats.expert_class_counts.tolist(),
        "drop": [[round(v, 6) for v in row] for row in ablation.drop.nan_to_num(-9.0).tolist()],
        "support": ablation.support.tolist(),
    }


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
