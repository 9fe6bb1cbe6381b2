"""What each callback adds to the fit time of the demo, at its default settings.

The demo (``examples/quickstart.py``): SpuriousDigits (1x32x32, 1,438 training and 359 validation images), the small
CNN of ``lightning_lens.testing.LitClassifier``, 8 epochs, batch 64, CPU. Each configuration fits a fresh model from
the same seed: no callback, each of ``SaliencyMapCallback()``, ``RandomizationSanityCheck()`` and
``SubgroupErrorSlices()`` alone, and the three together. The runs are interleaved (one round runs every
configuration once) and the minimum over rounds is kept, so slow spells of a shared machine hit all configurations
alike. Overhead = fit time with the callback / fit time without - 1. Target: <= 5 % for each callback, <= 10 % for
the three together.

Run: ``python benchmarks/overhead.py [--rounds 3] [--epochs 8] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader


def configurations() -> dict[str, Callable[[], list[Any]]]:
    from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback, SubgroupErrorSlices

    return {
        "none": lambda: [],
        "SaliencyMapCallback()": lambda: [SaliencyMapCallback()],
        "RandomizationSanityCheck()": lambda: [RandomizationSanityCheck()],
        "SubgroupErrorSlices()": lambda: [SubgroupErrorSlices()],
        "all three": lambda: [SaliencyMapCallback(), RandomizationSanityCheck(), SubgroupErrorSlices()],
    }


def fit_seconds(callbacks: list[Any], epochs: int, log_dir: str) -> float:
    from pytorch_lightning import Trainer, seed_everything
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_lens.datasets import SpuriousDigits
    from lightning_lens.testing import LitClassifier

    seed_everything(0, verbose=False)
    train, val = SpuriousDigits("train", seed=0), SpuriousDigits("val", seed=0)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(val, batch_size=256)
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, log_every_n_steps=5,
        logger=TensorBoardLogger(log_dir, name="overhead", default_hp_metric=False),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    model = LitClassifier(lr=2e-3)
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-dir", default="/tmp/lens_overhead_logs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_lens").setLevel(logging.ERROR)

    configs = configurations()
    fit_seconds([], 1, args.log_dir)  # warm-up: imports, allocator, data built once
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, make in configs.items():
            times[name].append(fit_seconds(make(), args.epochs, args.log_dir))
    base = min(times["none"])
    print(f"demo fit, {args.epochs} epochs, {args.threads} threads, min of {args.rounds} interleaved rounds")
    print(f"{'configuration':<30}{'fit s':>8}{'overhead':>10}   all rounds (s)")
    for name, values in times.items():
        best = min(values)
        overhead = "" if name == "none" else f"{100 * (best / base - 1):+.1f} %"
        print(f"{name:<30}{best:>8.2f}{overhead:>10}   {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
