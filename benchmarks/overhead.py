"""What each callback adds to the fit time of the demo, at its default settings.

The demo (``examples/quickstart.py``): SpuriousDigits (1x32x32, 1,438 training and 359 validation images), the small
CNN of ``lightning_lens.testing.LitClassifier``, 8 epochs, batch 64, CPU. Each configuration fits a fresh model from
the same seed: no callback, each of ``SaliencyMapCallback()``, ``RandomizationSanityCheck()`` and
``SubgroupErrorSlices()`` alone, and the three together. The runs are interleaved (one round runs every
configuration once, each round starting at another configuration) and the minimum over rounds is kept, so slow
spells of a shared machine hit all configurations alike. Overhead = fit time with the callback / fit time without -
1, printed for the minimum wall times (the issue's measure), the minimum CPU times and as the median of the per-round
ratios. Target: <= 5 % for each callback, <= 10 % for the three together. On a virtual machine whose fit times swing
by 10-20 % from run to run (two runs of the same configuration included), use many rounds, and read the breakdown,
whose ratios are taken within one run.

``--breakdown`` instead fits each configuration once with every callback hook, the setup check
(``check_setup``), each isolated part (``run_part``) and each image logged (``loggers.log_image``, encoding included)
timed, and prints where each callback's time goes as a share of the same fit's wall and CPU time: ratios taken within
one run stay meaningful on a loaded machine, where the interleaved minimum does not (the load average is printed with
every table).

Run: ``python benchmarks/overhead.py [--rounds 3] [--epochs 8] [--threads 2] [--breakdown]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections import defaultdict
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
    return fit_times(callbacks, epochs, log_dir)[0]


def fit_times(callbacks: list[Any], epochs: int, log_dir: str) -> tuple[float, float]:
    """Wall and process CPU seconds of one fit of the demo."""
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
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, train_loader, val_loader)
    return time.perf_counter() - start, time.process_time() - cpu


#: what --breakdown times on each callback (besides run_part, keyed by part name)
_TIMED = (
    "setup", "on_fit_start", "check_setup", "on_train_start", "on_train_epoch_start", "on_train_epoch_end",
    "on_train_batch_start", "on_train_batch_end", "on_validation_start", "on_validation_epoch_start",
    "on_validation_batch_start", "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
    "on_sanity_check_start", "on_sanity_check_end", "on_fit_end", "on_save_checkpoint", "teardown",
)


class HookTimes:
    """Wall and CPU seconds per (callback, hook or part); ``total`` counts outermost calls only (no double count)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        self.total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.depth: dict[str, int] = defaultdict(int)
        self.images = 0

    def instrument(self, callback: Any) -> None:
        from lightning_lens._pl import Callback

        owner = type(callback).__name__
        for name in _TIMED + ("run_part",):
            fn = getattr(callback, name, None)
            # Lightning's own no-op hooks are not the callback's work (timing them would add preemption noise)
            if callable(fn) and getattr(type(callback), name, None) is not getattr(Callback, name, None):
                setattr(callback, name, self._timed(owner, name, fn))

    def count_images(self) -> Callable[[], None]:
        """Count (and time, as a row of the calling callback) every ``loggers.log_image``; returns the undo."""
        from lightning_lens import loggers

        original = loggers.log_image

        def log_image(*args: Any, **kwargs: Any) -> Any:
            self.images += 1
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                row = self.rows[("(any)", "loggers.log_image")]
                row[0] += time.perf_counter() - start
                row[1] += time.process_time() - cpu
                row[2] += 1

        loggers.log_image = log_image
        return lambda: setattr(loggers, "log_image", original)

    def _timed(self, owner: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = f"part:{args[1]}" if name == "run_part" else name
            outer = self.depth[owner] == 0
            self.depth[owner] += 1
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[owner] -= 1
                wall, used = time.perf_counter() - start, time.process_time() - cpu
                row = self.rows[(owner, key)]
                row[0] += wall
                row[1] += used
                row[2] += 1
                if outer:
                    self.total[owner][0] += wall
                    self.total[owner][1] += used

        return timed


def breakdown(configs: dict[str, Callable[[], list[Any]]], epochs: int, log_dir: str) -> None:
    """One instrumented fit per configuration: each callback's time by hook and part, as a share of the fit."""
    for name, make in configs.items():
        if name == "none":
            continue
        callbacks = make()
        times = HookTimes()
        for cb in callbacks:
            times.instrument(cb)
        undo = times.count_images()
        try:
            wall, cpu = fit_times(callbacks, epochs, log_dir)
        finally:
            undo()
        load = os.getloadavg()[0]
        print(f"\n{name}: fit {wall:.2f} s wall, {cpu:.2f} s CPU, {epochs} epochs, load average {load:.1f}")
        for owner, (w, c) in times.total.items():
            due = next((getattr(cb, "run_epochs", None) for cb in callbacks if type(cb).__name__ == owner), None)
            print(f"  {owner}: {w:.3f} s wall = {100 * w / wall:.1f} % of the fit, {c:.3f} s CPU ="
                  f" {100 * c / cpu:.1f} %; due epochs {due}")
        print(f"  images logged: {times.images}")
        print(f"  {'callback':<28}{'hook or part':<40}{'calls':>6}{'wall s':>9}{'% fit':>7}{'cpu s':>9}{'% cpu':>7}")
        for (owner, key), (w, c, n) in sorted(times.rows.items(), key=lambda kv: -kv[1][1]):
            if c < 0.001 * cpu and w < 0.001 * wall:
                continue
            print(f"  {owner:<28}{key:<40}{int(n):>6}{w:>9.3f}{100 * w / wall:>7.1f}{c:>9.3f}{100 * c / cpu:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-dir", default="/tmp/lens_overhead_logs")
    parser.add_argument("--breakdown", action="store_true",
                        help="one instrumented fit per configuration: where each callback's time goes")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_lens").setLevel(logging.ERROR)

    configs = configurations()
    if args.only:
        configs = {k: v for k, v in configs.items() if k == "none" or args.only in k}
    fit_seconds([], 1, args.log_dir)  # warm-up: imports, allocator, data built once
    if args.breakdown:
        breakdown(configs, args.epochs, args.log_dir)
        return
    walls: dict[str, list[float]] = {name: [] for name in configs}
    cpus: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # each round starts elsewhere: no order bias
            wall, cpu = fit_times(configs[name](), args.epochs, args.log_dir)
            walls[name].append(wall)
            cpus[name].append(cpu)
    print(f"demo fit, {args.epochs} epochs, {args.threads} threads, {args.rounds} interleaved rounds,"
          f" load average {os.getloadavg()[0]:.1f} at the end")
    print("overhead = fit time with the callback / without - 1: of the minimum wall times (the issue's measure), of the"
          " minimum CPU times, and the median over rounds of each round's wall-time ratio (a slow spell hits one round's"
          " runs alike)")
    print(f"{'configuration':<30}{'fit s':>8}{'min wall':>10}{'min CPU':>10}{'median':>10}   all rounds, wall (s)")
    for name, values in walls.items():
        best = min(values)
        if name == "none":
            cells = ["", "", ""]
        else:
            median = statistics.median(w / b for w, b in zip(values, walls["none"]))
            cells = [f"{100 * (best / min(walls['none']) - 1):+.1f} %",
                     f"{100 * (min(cpus[name]) / min(cpus['none']) - 1):+.1f} %", f"{100 * (median - 1):+.1f} %"]
        print(f"{name:<30}{best:>8.2f}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}   {' '.join(f'{v:.2f}' for v in values)}")

if __name__ == "__main__":
    main()
