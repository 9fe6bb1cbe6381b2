"""Differentially private training and what it does to explanations: the demo CNN trained with DP-SGD at several
privacy levels epsilon, with saliency maps and a membership audit logged for each run, and a table of how far each
model's maps are from the non-private model's.

DP-SGD (Abadi et al. 2016) clips every example's gradient to ``--max-grad-norm`` and adds Gaussian noise, through
Opacus (``pip install lightning-lens[privacy]``): the demo model (SmallCNN: convolutions, ReLU, max-pooling, linear;
no BatchNorm, which per-example gradients forbid) is wrapped in Opacus's ``GradSampleModule`` inside a
LightningModule whose ``configure_optimizers`` returns a ``DPOptimizer`` with the noise multiplier that reaches the
target epsilon (RDP accountant, delta ``--delta``) over the planned steps; the training loader samples batches by
Poisson sampling (Opacus's ``DPDataLoader``), as the accountant assumes. The per-example gradient hooks are on only
around training steps, so the explanation callbacks' input gradients never reach the optimizer.

For each run the table gives: the epsilon spent (the accountant's), validation accuracy, the mean Spearman rank
correlation of its absolute gradient maps with the non-private model's on fixed validation images, the share of the
(absolute) map on the digit and on the shortcut square (relevance mass, Arras et al. 2022; the square only where
one is drawn), and the membership-inference AUC of the loss (PrivacyAuditCallback, training images against test images
drawn like them): the sanity-checks talk's claim is that the maps of a sufficiently private model look like noise.

Run:
    python examples/dp_explanations.py                 # epsilons 1, 8 and non-private, 8 epochs
    python examples/dp_explanations.py --fast          # the CI mode: seconds, a small subset, 1 epoch
    tensorboard --logdir lens_logs/dp_explanations

Writes ``dp_table.csv`` and ``dp_table.md`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import warnings

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_lens.callbacks import PrivacyAuditCallback, SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.evaluation import relevance_mass_accuracy
from lightning_lens.lightning_modules import LitClassifier
from lightning_lens.loggers import table_to_markdown
from lightning_lens.sanity import spearman
from lightning_lens.testing.models import SmallCNN

log = logging.getLogger("dp_explanations")


class DPClassifier(LitClassifier):
    """LitClassifier trained with DP-SGD: per-example gradients (Opacus ``GradSampleModule``), clipped and noised
    by a ``DPOptimizer`` whose steps an RDP accountant records."""

    def __init__(self, model: torch.nn.Module, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 sample_rate: float, lr: float) -> None:
        from opacus import GradSampleModule

        super().__init__(GradSampleModule(model), optimizer="sgd", lr=lr)
        self.model.disable_hooks()
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.sample_rate = expected_batch_size, sample_rate
        from opacus.accountants import RDPAccountant

        self.accountant = RDPAccountant()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        optimizer = DPOptimizer(
            torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return optimizer

    # Per-example gradient hooks run only around training steps: the explanation callbacks' input gradients (at
    # setup and in validation) would otherwise reach the hooks, which expect a training forward before every backward
    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self.model.enable_hooks()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.model.disable_hooks()

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0


def _train_loader(data: SpuriousDigits, indices: torch.Tensor, batch_size: int, seed: int, private: bool) -> DataLoader:
    dataset = TensorDataset(data.images[indices], data.labels[indices])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if not private:
        return loader
    from opacus.data_loader import DPDataLoader

    return DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))


def _maps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Absolute gradient maps of the label's score, ``(B, 1, H, W)``."""
    from lightning_lens.attribution import Gradient

    return Gradient(model).attribute(images, target=labels, abs=True).sum(1, keepdim=True)


def run(args: argparse.Namespace) -> list[dict]:
    seed_everything(args.seed)
    train, val = SpuriousDigits("train", seed=args.seed), SpuriousDigits("val", seed=args.seed)
    n_train = min(args.train_samples or len(train), len(train))
    train_indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:n_train]
    val_subset = Subset(val, range(min(args.val_samples, len(val))))
    val_loader = DataLoader(val_subset, batch_size=256)
    probe = next(iter(DataLoader(val_subset, batch_size=len(val_subset))))
    # non-members for the audit drawn like the training images (squares at the class position in 90 %), so that the
    # attack measures membership, not the shift to the validation split's random squares
    test = SpuriousDigits("test", seed=args.seed, eval_shortcut_mode="consistent", eval_shortcut_fraction=0.9)
    held_out = TensorDataset(test.images, test.labels)
    sample_rate = args.batch_size / n_train
    rows, maps = [], {}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    for eps in sorted(epsilons, key=lambda e: -e):  # the non-private run first: the reference
        private = math.isfinite(eps)
        name = f"eps_{eps:g}" if private else "non_private"
        seed_everything(args.seed)
        net = SmallCNN(width=args.width)
        if private:
            from opacus.accountants.utils import get_noise_multiplier

            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=args.delta, sample_rate=sample_rate,
                                         epochs=args.epochs, accountant="rdp")
            module = DPClassifier(net, sigma, args.max_grad_norm, args.batch_size, sample_rate, args.lr)
        else:
            sigma = 0.0
            module = LitClassifier(net, optimizer="sgd", lr=args.lr)
        saliency = SaliencyMapCallback(methods=["gradient"], num_probes=args.num_probes, max_overhead=None,
                                       quality_metrics=["relevance_mass"], mask_regions=["square", "digit"])
        members = TensorDataset(train.images[train_indices], train.labels[train_indices])
        audit = PrivacyAuditCallback(num_samples=args.audit_samples, statistics=["loss", "gradient_variance"],
                                     train_dataset=members, val_dataset=held_out, max_overhead=None)
        trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[saliency, audit],
                          logger=TensorBoardLogger(args.out_dir, name=name, version=0, default_hp_metric=False),
                          enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                          num_sanity_val_steps=0, log_every_n_steps=5)
        trainer.fit(module, _train_loader(train, train_indices, args.batch_size, args.seed, private), val_loader)
        images, labels = probe["image"], probe["label"]
        maps[name] = _maps(module, images, labels)
        with torch.no_grad():
            accuracy = float((module(images).argmax(1) == labels).float().mean())
        reference = maps.get("non_private", maps[name])
        rows.append({
            "run": name,
            "target_epsilon": eps,
            "epsilon_spent": module.epsilon(args.delta) if private else math.inf,
            "noise_multiplier": sigma,
            "val_acc": accuracy,
            "spearman_vs_non_private": float(spearman(maps[name], reference).nanmean()),
            "mass_on_digit": relevance_mass_accuracy(maps[name], probe["digit_mask"]).value,
            "mass_on_square": relevance_mass_accuracy(maps[name], probe["square_mask"]).value,
            "loss_membership_auc": audit.last_attacks["loss"].auc if audit.last_attacks else math.nan,
        })
    return rows


def write_table(rows: list[dict], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    columns = list(rows[0])
    with open(os.path.join(out_dir, "dp_table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    markdown = table_to_markdown(columns, [[r[c] for c in columns] for r in rows])
    with open(os.path.join(out_dir, "dp_table.md"), "w") as f:
        f.write(markdown + "\n")
    return markdown


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,8,inf", help="comma-separated target epsilons; inf = non-private")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--train-samples", type=int, default=0, help="0: the whole training split")
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--num-probes", type=int, default=10)
    parser.add_argument("--audit-samples", type=int, default=128)
    parser.add_argument("--out-dir", default=os.path.join("lens_logs", "dp_explanations"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a short run for CI: 1 epoch on 256 images, narrow CNN")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.train_samples, args.val_samples, args.width = 1, 256, 64, 4
        args.num_probes, args.audit_samples = 4, 32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", module="opacus")  # its notes on secure RNG and Poisson sampling
    rows = run(args)
    markdown = write_table(rows, args.out_dir)
    log.info("Maps of each DP model against the non-private model's (gradient, |map|):\n%s", markdown)
    log.info("Tables: %s", os.path.abspath(os.path.join(args.out_dir, "dp_table.md")))
    return rows


if __name__ == "__main__":
    main()
