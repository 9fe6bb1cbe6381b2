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
  the short explanation gets, which biases it upwards. On CPU the cascade explains a channels-last copy, faster than
  the given model the one explanation is timed on, so this ratio can fall below 1.

Measured for the cheapest method (Gradient: the overhead weighs most), Guided Backprop and SmoothGrad on the demo CNN
with 16 probes of 1x32x32, and for Gradient with the edge/random controls on (controls add no explanation of the
model, only metric work).

``--quantus``: the same test against Quantus' MPRT (``quantus.MPRT``, v0.6.0) on the same work: the same model
and probes, the same method, the same layer order (top-down; both find the same 6 layers, checked), the same
similarity (Quantus' default: Spearman of ``|a|``, which ours computes as ``MapSimilarity(["spearman_abs"],
clip_percentile=None)``; the agreement of the two on the same maps is printed) and one score per layer and probe.
Quantus is timed two ways:

* ``native``: as a Quantus user runs it, ``a_batch=None`` and ``explain_func=quantus.explain`` (Captum's Saliency for
  ``"Gradient"``; Captum's IG with Quantus' fixed 10 ``riemann_trapezoid`` steps for ``"IntegratedGradients"``,
  matched on our side by ``integrated_gradients(n_steps=10, method="riemann_trapezoid")``). Quantus then explains
  the probes S + 2 times (once more for its ``a_batch``); needs ``captum``.
* ``same explainer``: our method as Quantus' ``explain_func`` and ``a_batch`` precomputed outside the timing, so both
  sides run the same explanation code S + 1 times and only the harness differs.

Most of our lead comes from running the private copy channels-last on CPU (``sanity.layers.to_fast_layout_``), which
Quantus, explaining its deep copy in the layout it is given, does not do. For that reason the benchmark also prints
``native, channels-last model``: Quantus given a model already converted with
``model.to(memory_format=torch.channels_last)``. That is our lead on equal kernels.

Ours runs without the controls and ``keep_maps=False`` (Quantus computes neither). Skipped with a note when quantus
is not installed (``pip install quantus``).

Run: ``python benchmarks/sanity.py [--threads N] [--quantus] [--no-floor]``. One intra-op thread by default (BLAS
pools limited too), and times are CPU times of this process (``time.process_time``): on a shared, oversubscribed
machine wall-clock timings of small CPU ops swing by 10x (OpenMP threads spinning, the process descheduled), which
measures the scheduler, not the code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import time
import warnings

import numpy as np
import torch

from lightning_lens.attribution import get_method
from lightning_lens.sanity import MapSimilarity, VerdictRule, _common, cascading_randomization
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


def _floor_section(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
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


def _interleaved_best(fns: dict, repeats: int) -> dict:
    """Best CPU time of each function over ``repeats`` rounds, the functions interleaved within a round."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = _clock()
            fn()
            best[key] = min(best[key], _clock() - start)
    return best


def _quantus_section(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if importlib.util.find_spec("quantus") is None:
        print("quantus comparison skipped: quantus is not installed (pip install quantus)")
        return
    import quantus
    from quantus.functions.normalise_func import normalise_by_max
    from quantus.functions.similarity_func import correlation_spearman

    native_ok = importlib.util.find_spec("captum") is not None
    if not native_ok:
        print("note: captum is not installed, so the 'native' Quantus runs (quantus.explain) are skipped")
    x_np, y_np = inputs.numpy(), targets.numpy()
    similarity = MapSimilarity(metrics=["spearman_abs"], clip_percentile=None)  # Quantus' default similarity
    rule = VerdictRule(metric="spearman_abs")
    configs = [
        ("gradient", {}, {"method": "Gradient"}),
        ("integrated_gradients", {"n_steps": 10, "method": "riemann_trapezoid"}, {"method": "IntegratedGradients"}),
    ]
    print(f"quantus {quantus.__version__}: MPRT(layer_order='top_down', similarity_func=correlation_spearman, abs=True,"
          " normalise=True), batch_size=64; ours: cascading_randomization(order='top_down', controls=False,"
          " keep_maps=False, similarity=MapSimilarity(['spearman_abs'], clip_percentile=None))")
    summary = []
    for name, kwargs, quantus_kwargs in configs:
        method = get_method(name, model, **kwargs)

        def our_explain_func(model, inputs, targets, **_):  # Quantus' explain_func signature, numpy in and out
            bound = get_method(name, model, **kwargs)
            return bound.attribute(torch.as_tensor(inputs), target=torch.as_tensor(targets)).numpy()

        a_batch = method.attribute(inputs, target=targets).numpy()

        def ours():
            return cascading_randomization(model, inputs, targets, {name: (name, kwargs)}, similarity=similarity,
                                           rule=rule, controls=False, keep_maps=False)

        def quantus_native():
            return quantus.MPRT(disable_warnings=True)(
                model=model, x_batch=x_np, y_batch=y_np, a_batch=None, explain_func=quantus.explain,
                explain_func_kwargs=quantus_kwargs, device="cpu")

        def quantus_same_explainer():
            return quantus.MPRT(disable_warnings=True)(
                model=model, x_batch=x_np, y_batch=y_np, a_batch=a_batch, explain_func=our_explain_func,
                device="cpu")

        report = ours()
        scores = quantus_same_explainer()
        layers = [k for k in scores if k != "original"]
        if layers != report.stages:
            raise RuntimeError(f"the two tests walk different layers: quantus {layers}, ours {report.stages}")
        # the same similarity function: Quantus' Spearman of |normalise_by_max(a)| against ours, on the same maps
        other = method.attribute(inputs + 0.1 * torch.rand_like(inputs), target=targets)
        mine = similarity(torch.as_tensor(a_batch), other)["spearman_abs"].numpy()
        theirs = correlation_spearman(np.abs(normalise_by_max(a_batch)).reshape(len(a_batch), -1),
                                      np.abs(normalise_by_max(other.numpy())).reshape(len(a_batch), -1),
                                      batched=True)
        channels_last_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def quantus_native_channels_last():
            return quantus.MPRT(disable_warnings=True)(
                model=channels_last_model, x_batch=x_np, y_batch=y_np, a_batch=None, explain_func=quantus.explain,
                explain_func_kwargs=quantus_kwargs, device="cpu")

        fns = {"ours": ours, "same": quantus_same_explainer}
        if native_ok:
            quantus_native()
            fns["native"] = quantus_native
            fns["native, channels-last model"] = quantus_native_channels_last
        best = _interleaved_best(fns, REPEATS)
        ratios = {k: best[k] / best["ours"] for k in fns if k != "ours"}
        summary.append((name, ratios))
        line = (f"{name:<21s} {len(layers)} stages, 16 probes: ours {best['ours'] * 1e3:7.1f} ms | quantus same"
                f" explainer {best['same'] * 1e3:7.1f} ms ({ratios['same']:.2f}x)")
        if native_ok:
            line += f" | quantus native {best['native'] * 1e3:7.1f} ms ({ratios['native']:.2f}x)"
            key = "native, channels-last model"
            line += f" | quantus native, channels-last model {best[key] * 1e3:7.1f} ms ({ratios[key]:.2f}x)"
        print(line + f" | max |spearman ours - quantus| on the same maps {np.abs(mine - theirs).max():.1e}")
    print("speed-up over quantus MPRT (target >= 3x): " + ", ".join(
        f"{n} " + " / ".join(f"{k} {v:.2f}x" for k, v in r.items()) for n, r in summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quantus", action="store_true", help="also compare with Quantus' MPRT")
    parser.add_argument("--no-floor", action="store_true", help="skip the cascade-vs-explanations section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16).eval()
    inputs = torch.rand(16, 1, 32, 32)
    targets = torch.arange(16) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); SmallCNN(width=16), 16 probes of 1x32x32;"
          f" best of {REPEATS} runs")
    limits = contextlib.nullcontext()
    if importlib.util.find_spec("threadpoolctl") is not None:  # numpy/scipy BLAS pools: the same thread count
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=args.threads)
    with limits, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Quantus' and Captum's advisory warnings
        if not args.no_floor:
            _floor_section(model, inputs, targets)
        if args.quantus:
            _quantus_section(model, inputs, targets)


if __name__ == "__main__":
    main()
