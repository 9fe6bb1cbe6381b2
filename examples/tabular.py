"""Tabular: an MLP on scikit-learn's breast cancer table with a planted leaky column, permutation importance and slices.

LeakyTabular adds a column ``leak`` equal to the label plus a little noise in training. Here the validation split keeps
it consistent (``eval_leak_mode="consistent"``), as a leak in a real pipeline would be, so the model's reliance on it
shows: PermutationImportanceMonitor logs the drop of accuracy when each feature is shuffled (``importance/leak`` rises
as the model learns to lean on it), SaliencyMapCallback draws per-patient feature attributions as bar charts, and
SubgroupErrorSlices finds the slices of the validation data (tumour size and texture tertiles) where the model fails.

Run:
    python examples/tabular.py            # under a minute
    python examples/tabular.py --fast     # seconds (CI)
    tensorboard --logdir lens_logs
"""

from __future__ import annotations

import argparse
import os

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_lens.callbacks import PermutationImportanceMonitor, SaliencyMapCallback, SubgroupErrorSlices
from lightning_lens.datasets import LeakyTabular
from lightning_lens.testing import LitClassifier, TabularMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few seconds: two epochs (for CI)")
    args = parser.parse_args()

    seed_everything(args.seed)
    train = LeakyTabular("train", seed=args.seed)
    val = LeakyTabular("val", seed=args.seed, eval_leak_mode="consistent")
    names = train.feature_names
    callbacks = [
        PermutationImportanceMonitor(feature_names=names, n_repeats=3 if args.fast else 5, top_k=8),
        SaliencyMapCallback(methods=["gradient_x_input", "integrated_gradients"], feature_names=names, num_probes=4,
                            top_k_features=8),
        SubgroupErrorSlices(metadata_keys=["mean_radius_bin", "mean_texture_bin"]),
    ]
    logger = TensorBoardLogger(args.log_dir, name="tabular", default_hp_metric=False)
    trainer = Trainer(max_epochs=2 if args.fast else args.epochs, accelerator="cpu", devices=1, logger=logger,
                      callbacks=callbacks, log_every_n_steps=5, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=not args.fast)
    trainer.fit(LitClassifier(TabularMLP(train.num_features, train.num_classes), num_classes=train.num_classes,
                              lr=1e-2),
                DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed)),
                DataLoader(val, batch_size=64))
    ranking = callbacks[0].last_result.ranking()[:5]
    print(f"val/acc = {float(trainer.callback_metrics['val/acc']):.3f}; most important features (drop of accuracy):"
          f" {', '.join(f'{n} {v:.3f}' for n, v in ranking)}")
    print(f"Logs: {os.path.abspath(logger.log_dir)}")


if __name__ == "__main__":
    main()
