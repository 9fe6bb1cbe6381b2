"""Which explanation methods can be trusted, and where the model fails: RandomizationSanityCheck + SubgroupErrorSlices.

A small CNN learns SpuriousDigits (scikit-learn's bundled digits at 32x32; in 90% of the training images a bright
square at a class-specific position gives the label away). Two callbacks watch it:

- ``RandomizationSanityCheck`` (Adebayo et al. 2018) re-draws the trained weights layer by layer at the end of fit
  and says, per method, whether the maps depend on them: gradient and integrated gradients should pass, Guided
  Backprop is the paper's classic fail; the edge and random controls show what a fail and "no signal" look like.
- ``SubgroupErrorSlices`` searches the validation metadata (digit, shortcut presence, stroke thickness) for subgroups
  with a significantly higher error: validation squares sit at random positions, so ``shortcut_present=1`` is where a
  model that took the shortcut gets misled.

Both print a summary at the end of fit (through the ``lightning_lens`` logger) and log tables and figures to
TensorBoard. Run (about a minute on two CPU cores; ``--fast``: a few seconds, for a smoke test):

    python examples/sanity_and_slices.py
    python -m lightning_lens report lens_logs/sanity_and_slices -o lens_logs/sanity_and_slices/report.html
"""

from __future__ import annotations

import argparse
import os

from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_lens.callbacks import RandomizationSanityCheck, SubgroupErrorSlices
from lightning_lens.lightning_modules import LitClassifier, SpuriousDigitsDataModule
from lightning_lens.report.html import report_command


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="one short epoch and fewer probes (a smoke test)")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    check = RandomizationSanityCheck(
        methods=["gradient", "integrated_gradients", "guided_backprop"],
        num_probes=4 if args.fast else 8,
        grid_probes=1,
    )
    slices = SubgroupErrorSlices(metadata_keys=["digit", "shortcut_present", "thickness"], num_images=8)
    logger = TensorBoardLogger(args.log_dir, name="sanity_and_slices", default_hp_metric=False)
    trainer = Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=4 if args.fast else None,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[check, slices],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.fast,
    )
    trainer.fit(LitClassifier(lr=3e-3), datamodule=SpuriousDigitsDataModule(seed=args.seed))

    verdicts = {name: v.outcome for name, v in check.last_report.verdicts.items()} if check.last_report else {}
    print(f"\nVerdicts: {verdicts}")
    print(f"Worst slice: {slices.last_slices[0].name if slices.last_slices else 'none significant'}")
    print(f"Logs: {os.path.abspath(logger.log_dir)}")
    print(f"Report: {report_command(logger.log_dir)}")
    return {"verdicts": verdicts, "slices": [s.name for s in slices.last_slices], "log_dir": logger.log_dir}


if __name__ == "__main__":
    main()
