"""Cost of a cascading randomization check against its floor: one explanation per stage.

A cascade over ``S`` layers must explain the probes ``S + 1`` times (original model plus every stage); everything
else (one deep copy, one forward pass to find the layers, re-initialization, normalization and five similarity
metrics per stage, the floor control) is overhead. Target: the whole cascade within 1.3x of ``(S + 1)`` times one
explanation. Measured for the cheapest method (Gradient: overhead weighs most) and for Guided Backprop and
SmoothGrad on the demo CNN with 16 probes of 1x32x32, and, separately, with the edge/random controls on.

Run: ``python benchmarks/sanity.py [--threads N]`` (prints one line per configuration and the ratios). One intra-op
thread by default: on a shared, oversubscribed machine OpenMP's spinning threads make timings of small CPU ops
swing by 10x, which measures the scheduler rather than the code; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_lens.attribution import get_method
from lightning_lens.sanity import cascading_randomization
from lightning_lens.testing import SmallCNN

REPEATS = 7


def _best_seconds(explain, cascade, repeats: int = REPEATS) -> tuple[float, float]:
    """Best-of-``repeats`` times of one explanation and of one cascade, measured interleaved.

    The best time is the least disturbed by other processes on a shared machine; interleaving exposes both
    measurements to the same load.
    """
    explain(), cascade()  # warm-up (allocator, lazy initialization)
    one, full = [], []
    for _ in range(repeats):
        for fn, times in ((explain, one), (cascade, full), (explain, one)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(one), min(full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16).eval()
    inputs = torch.rand(16, 1, 32, 32)
    targets = torch.arange(16) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmallCNN(width=16), 16 probes of 1x32x32;"
          f" best of {REPEATS} interleaved runs")
    configs = [
        ("gradient", {}, False),
        ("guided_backprop", {}, False),
        ("smoothgrad", {"n_samples": 20}, False),
        ("gradient", {}, True),
    ]
    ratios = []
    for name, kwargs, controls in configs:
        method = get_method(name, model, **kwargs)

        def explain():
            return method.attribute(inputs, target=targets)

        def cascade():
            return cascading_randomization(model, inputs, targets, {name: (name, kwargs)}, controls=controls)

        report = cascade()
        stages = report.num_stages
        one, full = _best_seconds(explain, cascade)
        limit = (stages + 1) * one
        # a stochastic method also re-runs once for its ceiling control: its floor is S + 2 explanations
        if report.results[name].stochastic:
            limit = (stages + 2) * one
        ratio = full / limit
        ratios.append((name + (" +controls" if controls else ""), ratio))
        print(f"{name:<16s} controls={str(controls):<5s} one explanation {one * 1e3:7.2f} ms | {stages} stages:"
              f" cascade {full * 1e3:8.2f} ms, limit {limit * 1e3:8.2f} ms -> ratio {ratio:.2f}x (target <= 1.3x)")
    print("ratios: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios))


if __name__ == "__main__":
    main()
