"""Cost of a cascading randomization check against its floor: one explanation per stage.

A cascade over ``S`` layers must explain the probes ``S + 1`` times (the original model, then every stage; a
stochastic method once more for its ceiling control). Everything else is overhead: one deep copy, one forward pass
to find the layers in execution order, re-initialization, the normalization and five similarity metrics (the
reference maps prepared once; all stages' maps prepared and compared in one batched call), the floor control, the
report. Target: the whole cascade within 1.3x of the time of those explanations.

Two ratios per configuration:

* ``in-run``: cascade time / time spent inside the method's explanations during that same cascade (timed by
  wrapping ``BoundMethod.explain``). Both are measured in one run, so machine load cancels out.
* ``standalone``: best cascade time / ((S + 1) x best time of one explanation of the original model), interleaved
  runs. Closer to the letter of the target, but on a shared machine the longer cascade rarely gets the quiet windows
  the short explanation gets, which biases it upwards.

Measured for the cheapest method (Gradient: the overhead weighs most), Guided Backprop and SmoothGrad on the demo CNN
with 16 probes of 1x32x32, and for Gradient with the edge/random controls on (controls add no explanation of the
model, only metric work).

Run: ``python benchmarks/sanity.py [--threads N]``. One intra-op thread by default, and times are CPU times of this
process (``time.process_time``): on a shared, oversubscribed machine wall-clock timings of small CPU ops swing by 10x
(OpenMP threads spinning, the process descheduled), which measures the scheduler, not the code.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_lens.attribution import get_method
from lightning_lens.sanity import _common, cascading_randomization
from lightning_lens.testing import SmallCNN

REPEATS = 7
_clock = time.process_time  # CPU time of this process: with one thread, the compute time (see the docstring)


class _ExplainTimer:
    """Accumulates the time spent in ``BoundMethod.explain`` (the explanations of the cascade)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = _common.BoundMethod.explain

    def __enter__(self) -> "_ExplainTimer":
        original, timer = self._original, self

        def timed(bound, inputs, target):
            start = _clock()
            try:
                return original(bound, inputs, target)
            finally:
                timer.seconds += _clock() - start

        _common.BoundMethod.explain = timed
        return self

    def __exit__(self, *exc: object) -> None:
        _common.BoundMethod.explain = self._original


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = _clock()
        fn()
        best = min(best, _clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16).eval()
    inputs = torch.rand(16, 1, 32, 32)
    targets = torch.arange(16) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); SmallCNN(width=16), 16 probes of 1x32x32;"
          f" best of {REPEATS} runs")
    configs = [
        ("gradient", {}, False),
        ("guided_backprop", {}, False),
        ("smoothgrad", {"n_samples": 20}, False),
        ("gradient", {}, True),
    ]
    summary = []
    for name, kwargs, controls in configs:
        method = get_method(name, model, **kwargs)

        def explain():
            return method.attribute(inputs, target=targets)

        def cascade():
            return cascading_randomization(model, inputs, targets, {name: (name, kwargs)}, controls=controls)

        report = cascade()  # warm-up
        explain()
        stages = report.num_stages
        explanations = stages + (2 if report.results[name].stochastic else 1)
        in_run = []
        for _ in range(REPEATS):
            with _ExplainTimer() as timer:
                start = _clock()
                cascade()
                total = _clock() - start
            in_run.append(total / timer.seconds)
        in_run_ratio = min(in_run)
        one = _best(explain, 2 * REPEATS)
        full = _best(cascade, REPEATS)
        standalone = full / (explanations * one)
        label = name + (" +controls" if controls else "")
        summary.append((label, in_run_ratio, standalone))
        print(f"{label:<20s} {stages} stages, {explanations} explanations: one explanation {one * 1e3:7.2f} ms,"
              f" cascade {full * 1e3:8.2f} ms | ratio in-run {in_run_ratio:.2f}x, standalone {standalone:.2f}x"
              " (target <= 1.3x)")
    print("ratios (in-run / standalone): " + ", ".join(f"{n} {a:.2f}x / {b:.2f}x" for n, a, b in summary))


if __name__ == "__main__":
    main()
