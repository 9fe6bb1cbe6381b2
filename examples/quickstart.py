"""Quick start: train a small CNN with saliency maps logged to TensorBoard every epoch.

The data is SpuriousDigits (scikit-learn's bundled digits at 32x32, built offline): in 90% of the training images a
small bright square sits at a position that gives the class away, a shortcut the model is free to learn. In the
validation images the square appears at random positions, so the maps show whether the model looks at the digit or
at the square.

Run (``make demo`` does this in a fresh virtual environment):
    python examples/quickstart.py
    tensorboard --logdir lens_logs
    python -m lightning_lens report lens_logs -o lens_logs/report.html   # one self-contained HTML page

In TensorBoard: Images -> ``saliency/<method>`` (rows: probes with label and prediction; columns: input, map,
overlay; drag the step slider to watch the maps change as the model trains); Scalars -> ``saliency/<method>/...``
summaries and ``quality/<method>/relevance_mass/square`` (share of the positive attribution for the predicted class
that falls on the square, over probes that carry one) next to ``.../square_chance`` (the square's area fraction).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.report.html import report_command
from lightning_lens.testing import LitClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-probes", type=int, default=10)  # one per digit class
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    seed_everything(args.seed)
    train = SpuriousDigits("train", seed=args.seed)
    val = SpuriousDigits("val", seed=args.seed)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(val, batch_size=256)

    saliency = SaliencyMapCallback(
        methods=["gradient", "smoothgrad", "integrated_gradients", "gradcam"],
        method_kwargs={"smoothgrad": {"n_samples": 20}, "integrated_gradients": {"n_steps": 20}},
        num_probes=args.num_probes,
        target="prediction",  # explain what the model predicts: a prediction driven by the square shows it
        quality_metrics=["relevance_mass"],
        mask_regions=["square", "digit"],
        # four methods on a 4-second fit cost more than the default budget of 5 % of fit time, which would let the
        # methods take turns; a demo affords 25 %
        max_overhead=0.25,
    )
    logger = TensorBoardLogger(save_dir=args.log_dir, name="quickstart", default_hp_metric=False)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[saliency],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(LitClassifier(lr=2e-3), train_loader, val_loader)

    metrics = trainer.callback_metrics
    print()
    print(f"Trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s: val/acc = {float(metrics['val/acc']):.3f}")
    print(
        f"Saliency maps of {len(saliency.probes)} probes for {', '.join(saliency.method_names)} logged at the first and"
        " the last epoch and at as many epochs in between as max_overhead=0.25 (25 % of fit time) allows; see the"
        " SaliencyMapCallback summary above for which epochs each method got."
    )
    print(
        "Validation images carry the shortcut square at random positions, so a model that learned the shortcut is"
        " misled there (hence the modest val/acc): compare quality/<method>/relevance_mass/square with"
        " .../square_chance to see how much of each explanation sits on the square."
    )
    print(f"Logs: {os.path.abspath(logger.log_dir)}")
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.exists(tensorboard):
        tensorboard = "tensorboard"
    elif not os.path.relpath(tensorboard).startswith(".."):
        tensorboard = os.path.relpath(tensorboard)
    print(f"Open them with:  {tensorboard} --logdir {args.log_dir}   (then browse to http://localhost:6006)")
    print(f"or build one self-contained HTML page of the run:  {report_command(args.log_dir)}")


if __name__ == "__main__":
    main()
