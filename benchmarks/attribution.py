"""Time every attribution method and its efficiency against the cost of one input gradient.

efficiency = n * t_grad / t_method, where t_grad is one forward + input-gradient backward of the whole batch and
n is the number of such passes the method needs by definition (``n_samples`` for SmoothGrad, ``n_steps`` for IG,
1 for single-pass methods). 1.0 means the method costs exactly n plain gradient passes; the multi-sample methods
should reach >= 0.9 at their defaults (their expansion into large chunks must not add overhead). Occlusion runs
forward passes only, so its n is the number of window positions and its "efficiency" is against fwd+bwd (> 1 is
expected). Medians over a few repeats; the machine may be shared, so rerun when it is quiet.

Run: ``python benchmarks/attribution.py [--repeats 5] [--batch 32] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lightning_lens.attribution import get_method, input_gradients
from lightning_lens.attribution.base import Attribution


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    try:
        from lightning_lens.testing import SmallCNN

        return SmallCNN(in_channels=in_channels, num_classes=num_classes)
    except (ImportError, AttributeError):  # before lightning_lens.testing ships it
        w = 16
        return nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * 64, 64), nn.ReLU(), nn.Linear(64, num_classes),
        )


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_time(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """One forward + input-gradient backward of the batch, in eval mode, as the methods run it."""
    probe = get_method("gradient", model)

    def once() -> None:
        with probe.explaining():
            input_gradients(model, x, 0)

    return median_time(once, max(repeats, 5))


def passes(method: Attribution, x: torch.Tensor) -> int:
    if hasattr(method, "n_samples"):
        return method.n_samples
    if hasattr(method, "n_steps"):
        return method.n_steps
    if method.name == "occlusion":
        counts = method.geometry(x.shape[1:])[2]
        return int(torch.tensor(counts).prod())
    return 1


METHODS = [
    ("gradient", {}), ("gradient_x_input", {}), ("smoothgrad", {}), ("smoothgrad_squared", {}), ("vargrad", {}),
    ("integrated_gradients", {}), ("integrated_gradients", {"method": "riemann_trapezoid"}),
    ("guided_backprop", {}), ("deconvnet", {}), ("gradcam", {}), ("guided_gradcam", {}), ("occlusion", {}),
    ("edge", {}), ("random", {}),
]


def run(label: str, model: nn.Module, x: torch.Tensor, repeats: int) -> None:
    model.eval()
    t_ref = reference_time(model, x, repeats)
    print(f"\n{label}: batch {tuple(x.shape)}, one input-gradient pass t_grad = {t_ref * 1e3:.1f} ms")
    print(f"{'method':<44} {'n':>4} {'time (ms)':>10} {'efficiency':>10}")
    for name, kwargs in METHODS:
        method = get_method(name, model, **kwargs)
        t = median_time(lambda: method.attribute(x, target=0), repeats)
        n = passes(method, x)
        shown = name + (f" {kwargs}" if kwargs else "")
        print(f"{shown:<44} {n:>4} {t * 1e3:>10.1f} {n * t_ref / t:>10.2f}")
    print("SmoothGrad (n=50) efficiency by batch_size (rows per forward):")
    for rows in (32, 64, 128, 256, 512, None):
        method = get_method("smoothgrad", model, batch_size=rows)
        t = median_time(lambda: method.attribute(x, target=0), repeats)
        print(f"  batch_size={str(rows) if rows else 'auto':<6} time {t * 1e3:8.1f} ms  efficiency {50 * t_ref / t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives stable timings on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # model initialisation only
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    run("4-conv CNN, 3x32x32", small_cnn(3, 10), torch.rand(args.batch, 3, 32, 32, generator=gen), args.repeats)
    run("demo model (SmallCNN), 1x32x32", small_cnn(1, 10), torch.rand(args.batch, 1, 32, 32, generator=gen),
        args.repeats)


if __name__ == "__main__":
    main()
