"""A mixture-of-experts digit classifier whose routing you can watch in TensorBoard.

The 8x8 scikit-learn digits (bundled, nothing downloads) are classified by a MixtureOfExperts layer (8 MLP experts,
top-2 noisy gating, Switch balance loss + ST-MoE z-loss). ``RoutingMonitor`` logs, every validation epoch, the expert
load and its balance, the expert x class routing heatmap, per-expert purity, the NMI between top-1 expert and digit,
and every few epochs the accuracy each digit loses when one expert is masked.

Run:  python examples/moe_digits.py            (about a minute on a laptop CPU)
Then: tensorboard --logdir lens_logs
"""

from __future__ import annotations

import argparse
import os

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lens._pl import Trainer, pl
from lightning_lens.callbacks import RoutingMonitor
from lightning_lens.interpretable_models import MixtureOfExperts, moe_aux_loss
from lightning_lens.testing import LitClassifier


class FlatDigits(Dataset):
    """Flattened digits in [0, 1] as dict items ``{"x", "label", "index"}`` (a fixed 75/25 split)."""

    def __init__(self, split: str, seed: int = 0) -> None:
        data = load_digits()
        x = torch.tensor(data.data / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        cut = int(0.75 * len(y))
        self.ids = order[:cut] if split == "train" else order[cut:]
        self.x, self.y = x[self.ids], y[self.ids]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.y[i], "index": self.ids[i]}


MoEClassifier = LitClassifier  # its training loss adds every MoE layer's auxiliary losses (train/moe_aux_loss)


def build_model(num_experts: int, k: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(),  # a shared stem; the experts then split the work
        MixtureOfExperts(64, 10, num_experts=num_experts, k=k, hidden_features=64, balance_loss_weight=0.05),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--logdir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    torch.set_num_threads(1)  # a model this small runs fastest on one intra-op thread (more only add sync overhead)
    train = DataLoader(FlatDigits("train"), batch_size=64, shuffle=True)
    val = DataLoader(FlatDigits("val"), batch_size=256)
    model = MoEClassifier(build_model(args.experts, args.k), num_classes=10, lr=3e-3)
    monitor = RoutingMonitor(class_names=[str(d) for d in range(10)], ablation_every_n_epochs=5)
    logger = TensorBoardLogger(args.logdir, name="moe_digits")
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=10, default_root_dir=args.logdir)
    trainer.fit(model, train, val)

    acc = trainer.callback_metrics.get("val/acc")
    print(f"\nvalidation accuracy: {float(acc):.3f}" if acc is not None else "")
    for name, stats in monitor.last_statistics.items():
        print(f"layer {name!r}: NMI(top-1 expert, digit) = {stats.nmi:.3f}, load CV = {stats.load_cv:.3f}, "
              f"usage entropy = {stats.usage_entropy:.3f}, mean purity = {stats.mean_purity:.3f}")
        counts = stats.expert_class_counts
        for e in range(counts.shape[0]):
            top = counts[e].argsort(descending=True)[:3].tolist()
            share = ", ".join(f"{d}: {int(counts[e, d])}" for d in top if counts[e, d] > 0)
            print(f"  expert {e}: {int(counts[e].sum()):4d} tokens as top-1  (digits {share})")
    for name, result in monitor.last_ablation.items():
        print(f"ablation of {name!r} (accuracy drop when the expert is masked):")
        for e in range(result.drop.shape[0]):
            worst = int(torch.nan_to_num(result.drop[e], nan=-1.0).argmax())
            print(f"  expert {e}: overall {float(result.overall_drop[e]):+.3f}, "
                  f"digit {worst} {float(result.drop[e, worst]):+.3f}")
    print(f"\nlogs: {os.path.abspath(logger.log_dir)}\nview: tensorboard --logdir {os.path.abspath(args.logdir)}")


if __name__ == "__main__":
    main()
