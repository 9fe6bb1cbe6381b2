"""Shortcut detection: watch a model drift onto a spurious signal in TensorBoard.

Two identical SmallCNNs train on SpuriousDigits: one on data where 90% of the training images carry a small bright
square at a class-specific position (the shortcut), one on the same digits without it. Both are validated on images
that all carry the square at their class's position, and ``SaliencyMapCallback`` logs, every epoch, the saliency maps
of a fixed probe set together with the relevance mass on the square (Arras et al. 2022) beside its chance level,
the square's area fraction. A second validation set without any square shows what the shortcut costs.

Run:
    python examples/shortcut_detection.py            # ~1-2 minutes on a laptop CPU
    tensorboard --logdir lens_logs/shortcut          # the two runs side by side

In TensorBoard: Scalars -> ``quality/gradient/relevance_mass/square`` climbs far above
``.../square_chance`` for ``with_shortcut`` and stays near it for ``without_shortcut``; Images ->
``saliency/gradient`` shows where; ``val/acc/dataloader_idx_1`` (images without the square) is lower for the model
that leans on the shortcut.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN

METHODS = ["gradient", "integrated_gradients", "gradcam"]
METRICS = ["relevance_mass", "pointing_game"]


def train_run(name: str, shortcut_fraction: float, args: argparse.Namespace) -> Path:
    """Fit one model and return its TensorBoard log directory."""
    seed_everything(args.seed, workers=True)
    train = SpuriousDigits("train", seed=args.seed, train_shortcut_fraction=shortcut_fraction)
    # validation 0: every image carries the square at its class's position (the probes come from here)
    with_square = SpuriousDigits("val", seed=args.seed, eval_shortcut_mode="consistent", eval_shortcut_fraction=1.0)
    # validation 1: the same digits without any square
    no_square = SpuriousDigits("val", seed=args.seed, eval_shortcut_mode="absent")
    loader = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=loader)
    val_loaders = [DataLoader(with_square, batch_size=128), DataLoader(no_square, batch_size=128)]

    logger = TensorBoardLogger(args.log_dir, name="shortcut", version=name, default_hp_metric=False)
    saliency = SaliencyMapCallback(
        methods=METHODS,
        method_kwargs={"integrated_gradients": {"n_steps": 16}},
        num_probes=args.num_probes,
        quality_metrics=METRICS,
        mask_regions=["square", "digit"],
    )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[saliency],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
        deterministic=True,
    )
    model = LitClassifier(SmallCNN(in_channels=1, num_classes=10, width=args.width), lr=3e-3)
    trainer.fit(model, train_loader, val_loaders)
    return Path(logger.log_dir)


def last_scalars(log_dir: Path) -> dict[str, float]:
    """The last logged value of every scalar tag in a TensorBoard run (read back from the event files)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=8, help="SmallCNN width (channels of the first convolutions)")
    parser.add_argument("--num-probes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models run best on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    runs = {
        "with_shortcut": train_run("with_shortcut", 0.9, args),
        "without_shortcut": train_run("without_shortcut", 0.0, args),
    }
    scalars = {name: last_scalars(path) for name, path in runs.items()}

    print(f"\nTrained both models in {time.perf_counter() - start:.0f} s.")
    print("\nRelevance mass on the square (share of the map's positive relevance inside it), last epoch:")
    print(f"{'method':<22} {'chance':>8} {'with_shortcut':>14} {'without_shortcut':>17}")
    for method in METHODS:
        key = f"quality/{method}/relevance_mass/square"
        chance = scalars["with_shortcut"][f"{key}_chance"]
        with_s, without_s = scalars["with_shortcut"][key], scalars["without_shortcut"][key]
        print(f"{method:<22} {chance:>8.4f} {with_s:>8.3f} ({with_s / chance:4.1f}x)"
              f" {without_s:>9.3f} ({without_s / chance:4.1f}x)")
    print("\nPointing game on the square (share of maps whose maximum lies on it):")
    for method in METHODS:
        key = f"quality/{method}/pointing_game/square"
        with_s, without_s = scalars["with_shortcut"][key], scalars["without_shortcut"][key]
        print(f"{method:<22} with: {with_s:.2f}   without: {without_s:.2f}")
    print("\nValidation accuracy   with square / without square:")
    for name in runs:
        s = scalars[name]
        print(f"{name:<22} {s['val/acc/dataloader_idx_0']:.3f} / {s['val/acc/dataloader_idx_1']:.3f}")
    print(f"\nLogs: {Path(args.log_dir, 'shortcut').resolve()}")
    print(f"Open them side by side with:\n    tensorboard --logdir {Path(args.log_dir, 'shortcut')}")


if __name__ == "__main__":
    main()
