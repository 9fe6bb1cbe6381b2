"""Time every attribution method and its efficiency against the cost of one input gradient.

efficiency = n * t_grad / t_method, where t_grad is one forward + input-gradient backward of the whole batch and
n is the number of such passes the method needs by definition (``n_samples`` for SmoothGrad, ``n_steps`` for IG,
1 for single-pass methods, 2 for Guided Grad-CAM). 1.0 means the method costs exactly n plain gradient passes; the
multi-sample methods should reach >= 0.9 at their defaults, i.e. expanding the batch into chunks of noisy copies or
path points must not add overhead. Grad-CAM backpropagates only to its layer and Occlusion runs forward passes only
(n = window positions), so both can exceed 1. The last rows time SmoothGrad with other chunk sizes (``batch_size``)
to show why the default is what it is. Each repeat times n back-to-back gradient passes and then the method, so both
span about the same wall-clock time; the medians over a few repeats are printed. Rerun on a quiet machine.

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
from lightning_lens.attribution._batching import resolve_batch_size
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


def paired_times(ref: Callable[[], object], n: int, fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """``(t_grad, t_method, efficiency)``: ``n`` back-to-back reference passes and one method call, alternated.

    Timing n reference passes (rather than one) makes both measurements span the same wall-clock time, so load
    from other processes hits them alike; the efficiency is the median over the pairs of ``T(n refs) / T(method)``.
    """
    ref()
    fn()  # warm-up
    t_refs, t_fns = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            ref()
        t_refs.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        t_fns.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(t_refs, t_fns)]
    return statistics.median(t_refs) / n, statistics.median(t_fns), statistics.median(ratios)


def gradient_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + input-gradient backward of the batch, in eval mode, as the methods run it."""
    probe = get_method("gradient", model)

    def once() -> None:
        with probe.explaining():
            input_gradients(model, x, 0)

    return once


def passes(method: Attribution, x: torch.Tensor) -> int:
    if hasattr(method, "n_samples"):
        return method.n_samples
    if hasattr(method, "n_steps"):
        return method.n_steps
    if method.name == "guided_gradcam":  # a Grad-CAM pass and a guided-backprop pass
        return 2
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
    ref = gradient_pass(model, x)
    print(f"\n{label}: batch {tuple(x.shape)}")
    print(f"{'method':<48} {'n':>4} {'t_grad (ms)':>11} {'time (ms)':>10} {'efficiency':>10}")
    rows = [(name + (f" ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else ""), get_method(name, model, **kw))
            for name, kw in METHODS]
    rows += [(f"smoothgrad (batch_size={b})", get_method("smoothgrad", model, batch_size=b)) for b in (64, 160, 512, 1600)]
    for shown, method in rows:
        n = passes(method, x)
        t_ref, t, efficiency = paired_times(ref, n, lambda: method.attribute(x, target=0), repeats)
        print(f"{shown:<48} {n:>4} {t_ref * 1e3:>11.1f} {t * 1e3:>10.1f} {efficiency:>10.2f}")


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    for c in (3, 1):
        print(f"default batch_size for {args.batch} x {c}x32x32: {resolve_batch_size(None, args.batch, c * 32 * 32)} rows")
    run("4-conv CNN, 3x32x32", small_cnn(3, 10), torch.rand(args.batch, 3, 32, 32, generator=gen), args.repeats)
    run("demo model (SmallCNN), 1x32x32", small_cnn(1, 10), torch.rand(args.batch, 1, 32, 32, generator=gen),
        args.repeats)


if __name__ == "__main__":
    main()
