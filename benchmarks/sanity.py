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

Ratios: per interleaved round (ours, quantus same explainer, quantus native, ... in turn) the time of each Quantus
run over ours in that round; the median over ``--repeats`` rounds is printed first (robust under load), then the
ratio of the best times (the number for a quiet machine). ``--profile`` prints a cProfile of the gradient cascade and
the share of it spent in the explanations (the rest is the cascade's own overhead).

Where the rest of our time went and what was removed (issue 11, section 6): the discovery forward pass is folded into
the first explanation (``sanity.layers.ExecutionRecorder``) for gradient-type methods with a given target, the
similarity skips the signed maps nobody reads (``keep_maps=False``) and reuses the sorted order for the ranks. What
is left: the explanations themselves (~80 % of ours for Gradient, ~97 % for IG), the deep copy, the
re-initializations and one batched similarity pass. The line ``ceiling with zero overhead`` divides Quantus' time by
our explanations alone: no harness work can lift a ratio above it, only faster explanations can. (Reusing the
unchanged input-side layers' forward across top-down stages, through a retained graph, gives bitwise the same maps
but measured slower on this CNN: the recording pass and the nested backward cost more than the forwards saved.)

Stage batching with ``torch.func`` (tried for issue 11's ">= 3x", not kept): the ``S + 1`` explanations run on models
that differ only in parameters, so one ``vmap`` over the stages' stacked parameters (``functional_call``; a parameter
equal in every stage of a group is passed once, unbatched, so vmap computes what depends only on such parameters once:
the unchanged input-side prefix of top-down stages) could replace the per-stage loop. ``--stage-batching`` times it
against the loop (the cascade's channels-last copy and its seed-0 stages, the method's own ``attribute`` per stage).
Measured 2026-12-07 on the shared 2-core machine under load (1 thread, median of 5 interleaved rounds; the vmapped
maps equal the loop's within 5e-7 relative), time / loop time, Gradient / IG (10 trapezoid steps):

* all 7 stages in one call: ``vmap(grad)`` 1.76x / 1.82x (slower); vmapped forward then ``autograd.grad(...,
  is_grads_batched=True)`` 9.2x / 9.6x (the batched backward runs the already stage-batched suffix once per stage);
* pairs of stages: 1.44x / 1.38x, and 1.49x / 1.49x;
* the 3 stages that differ only in ``Linear`` weights (the original and the two classifier stages: no convolution
  weight batched) in one call, the rest looped: 1.08x / 1.03x, and 0.96x / 0.98x: at most 4 % faster, before the
  discovery forward of its own the cascade would then need again (it rides on the original's explanation today).

Why it does not pay on CPU: the time is in the convolution kernels (~4.5 ms of forward and backward per stage for 16
probes), not in per-op overhead; a stage-batched convolution weight becomes a grouped convolution, and a stage dim in
front of the batch forces copies out of channels-last into the default layout, which costs more than the shared
prefix saves. The prefix saves forwards only (every stage still needs its own backward through it): for this CNN
about a fifth of the explanations' multiply-adds even with perfect reuse, which would lift Gradient to ~3x (3.2x
native) but IG only to ~2.4x Quantus native. Integrated Gradients' block size is not a lever either: 32-80
rows per block within 5 % of the default 64 (16 rows 8 % slower, all 160 rows 35 % slower). With the ceilings measured
(Gradient 2.96x same explainer / 3.16x native, IG 1.61x / 2.02x, same load), >= 3x needs cheaper kernels than
channels-last oneDNN on this CPU, not a different harness.

Run: ``python benchmarks/sanity.py [--threads N] [--quantus] [--no-floor] [--repeats N] [--profile]
[--stage-batching]``.
One intra-op thread by default (BLAS pools limited too), and times are CPU times of this process
(``time.process_time``): on a shared, oversubscribed machine wall-clock timings of small CPU ops swing by 10x (OpenMP
threads spinning, the process descheduled), which measures the scheduler, not the code.
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
from lightning_lens.sanity.layers import find_layers, reinitialize_, to_fast_layout_
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


def _interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """``({key: best CPU time}, {key: median over rounds of time / ours' time in the same round})``: the functions
    run interleaved (ours, quantus, ours, quantus ...), so machine load hits both alike; the per-round ratios'
    median is the robust number on a loaded machine, the ratio of bests the one for a quiet machine."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = _clock()
            fn()
            times[key].append(_clock() - start)
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: float(np.median(np.array(v) / np.array(times["ours"]))) for k, v in times.items() if k != "ours"}
    return best, ratios


def _profile(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, repeats: int) -> None:
    """cProfile of the Quantus-comparison cascade (gradient): where the time goes besides the explanations."""
    import cProfile
    import pstats

    similarity = MapSimilarity(metrics=["spearman_abs"], clip_percentile=None)

    def ours():
        return cascading_randomization(model, inputs, targets, {"gradient": "gradient"}, similarity=similarity,
                                       rule=VerdictRule(metric="spearman_abs"), controls=False, keep_maps=False)

    ours()
    with _ExplainTimer() as timer:
        start = _clock()
        for _ in range(repeats):
            ours()
        total = _clock() - start
    print(f"gradient cascade: {total / repeats * 1e3:.1f} ms per run, of which explanations"
          f" {timer.seconds / repeats * 1e3:.1f} ms ({timer.seconds / total:.0%}); the rest is overhead")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        ours()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _quantus_section(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, repeats: int
                     ) -> None:
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
        best, ratios = _interleaved(fns, repeats)
        best_ratios = {k: best[k] / best["ours"] for k in fns if k != "ours"}
        summary.append((name, ratios))
        shares = []
        for _ in range(3):
            with _ExplainTimer() as timer:  # the share of ours spent in the explanations themselves
                start = _clock()
                ours()
                shares.append(timer.seconds / (_clock() - start))
        share = float(np.median(shares))
        # the most any harness work could give: Quantus' time over our explanations alone (zero overhead)
        ceilings = {k: best[k] / (best["ours"] * share) for k in fns if k != "ours"}
        line = (f"{name:<21s} {len(layers)} stages, 16 probes: ours {best['ours'] * 1e3:7.1f} ms"
                f" ({share:.0%} in explanations) | quantus same explainer {best['same'] * 1e3:7.1f} ms"
                f" (median {ratios['same']:.2f}x, bests {best_ratios['same']:.2f}x)")
        if native_ok:
            line += (f" | quantus native {best['native'] * 1e3:7.1f} ms (median {ratios['native']:.2f}x, bests"
                     f" {best_ratios['native']:.2f}x)")
            key = "native, channels-last model"
            line += (f" | quantus native, channels-last model {best[key] * 1e3:7.1f} ms (median {ratios[key]:.2f}x,"
                     f" bests {best_ratios[key]:.2f}x)")
        print(line + f" | max |spearman ours - quantus| on the same maps {np.abs(mine - theirs).max():.1e}")
        print(f"{'':<21s} ceiling with zero overhead on our side (quantus best / our explanations): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ceilings.items()))
    print(f"speed-up over quantus MPRT, median of {repeats} interleaved rounds (target >= 3x): " + ", ".join(
        f"{n} " + " / ".join(f"{k} {v:.2f}x" for k, v in r.items()) for n, r in summary))


# ------------------------------------------------------------------------------------------ stage batching (vmap)
def _stage_parameters(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.nn.Module, list[dict]]:
    """The cascade's private copy (channels-last, as the cascade runs it) and the parameters of its ``S + 1`` stage
    models (original first, then top-down, seed 0, as ``cascading_randomization`` draws them)."""
    clone, _ = _common.private_copy(model)
    to_fast_layout_(clone, inputs)
    found, _ = find_layers(clone, inputs)
    generator = torch.Generator().manual_seed(0)
    snapshot = lambda: {n: p.detach().clone() for n, p in clone.named_parameters()}  # noqa: E731
    stages = [snapshot()]
    for layer in reversed(found):
        reinitialize_(layer, generator)
        stages.append(snapshot())
    return clone, stages


def _split_stages(group: list[dict]) -> tuple[dict, dict]:
    """``(shared, stacked)``: parameters equal in every stage of ``group`` (passed once, unbatched: vmap then
    computes everything that depends on them alone once for the group) and the others stacked along a stage dim."""
    shared, stacked = {}, {}
    for name, value in group[0].items():
        if all(torch.equal(g[name], value) for g in group[1:]):
            shared[name] = value
        else:
            stacked[name] = torch.stack([g[name] for g in group])
    return shared, stacked


def _vmapped_gradients(clone: torch.nn.Module, group: list[dict], x: torch.Tensor, target: torch.Tensor,
                       batched_backward: bool) -> torch.Tensor:
    """``(len(group), B, ...)`` input gradients of the target logits of every stage model in ``group``, in one
    vmapped call over the stacked stage parameters (``torch.func.functional_call``).

    ``batched_backward=False``: ``vmap(torch.func.grad(score))``; ``True``: the vmapped forward on one input leaf,
    then ``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot cotangents over the stages."""
    from torch.func import functional_call, grad, vmap

    shared, stacked = _split_stages(group)
    k, index = len(group), target.view(-1, 1)
    if not stacked:  # identical stages: one explanation
        x = x.detach().clone().requires_grad_(True)
        score = functional_call(clone, shared, (x,)).gather(1, index).sum()
        return torch.autograd.grad(score, x)[0].expand(k, *x.shape)
    if not batched_backward:
        def score(xi: torch.Tensor, params: dict) -> torch.Tensor:
            return functional_call(clone, {**shared, **params}, (xi,)).gather(1, index).sum()

        return vmap(grad(score), in_dims=(None, 0))(x, stacked)
    leaf = x.detach().clone().requires_grad_(True)
    logits = vmap(lambda params: functional_call(clone, {**shared, **params}, (leaf,)))(stacked)  # (k, B, C)
    scores = logits.gather(2, index.expand(k, -1, -1)).sum(dim=(1, 2))
    return torch.autograd.grad(scores, leaf, torch.eye(k, dtype=scores.dtype), is_grads_batched=True)[0]


def _head_chunk(stages: list[dict], clone: torch.nn.Module) -> int:
    """The number of leading stages whose parameters differ only in modules that are not convolutions (top-down:
    the original and the classifier-head stages), so that vmap batches no convolution weight for them."""
    conv_params = {f"{n}.{p}" for n, m in clone.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
                   for p, _ in m.named_parameters(recurse=False)}
    count = 1
    while count < len(stages) and all(torch.equal(stages[count][n], stages[0][n]) for n in conv_params):
        count += 1
    return count


def _stage_batching_section(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                            repeats: int) -> None:
    """The S + 1 explanations of a top-down cascade (original + 6 stages) run one stage after another through the
    method (as the cascade does) against vmapped stage-batched calls (``_vmapped_gradients``), for Gradient and
    IG (10 ``riemann_trapezoid`` steps, zero baseline, path rows in blocks of the element budget)."""
    from lightning_lens.attribution._batching import resolve_batch_size
    from lightning_lens.attribution.integrated_gradients import integration_points

    clone, stages = _stage_parameters(model, inputs)
    stage_models = []
    for params in stages:  # one channels-last module per stage for the loop (the cascade re-initializes in place)
        stage_model = copy.deepcopy(clone)
        with torch.no_grad():
            for name, p in stage_model.named_parameters():
                p.copy_(params[name])
        stage_models.append(stage_model)
    head = _head_chunk(stages, clone)
    alphas, weights = integration_points(10, "riemann_trapezoid")
    rows = resolve_batch_size(None, len(inputs), inputs[0].numel())
    points_per_block = max(1, rows // len(inputs))

    def ig_from(grads_of, group):  # grads_of(group, path rows, targets) -> (k, rows, ...)
        total = 0
        for s0 in range(0, len(alphas), points_per_block):
            a = torch.tensor(alphas[s0 : s0 + points_per_block]).view(-1, 1, 1, 1, 1)
            w = torch.tensor(weights[s0 : s0 + points_per_block])
            path = (a * inputs).flatten(0, 1)
            g = grads_of(group, path, targets.repeat(len(a)))
            g = g.view(len(group), len(a), *inputs.shape)
            total = total + torch.einsum("s,ks...->k...", w, g)
        return total * inputs

    def vm(batched_backward):
        return lambda group, x, t: _vmapped_gradients(clone, group, x, t, batched_backward)

    def chunked(explain_group, chunk):
        return lambda: torch.cat([explain_group(stages[i : i + chunk]) for i in range(0, len(stages), chunk)])

    def head_then_loop(explain_group, loop_one):
        return lambda: torch.cat([explain_group(stages[:head])] + [loop_one(m)[None] for m in stage_models[head:]])

    for name, kwargs in [("gradient", {}), ("integrated_gradients", {"n_steps": 10, "method": "riemann_trapezoid"})]:
        methods = [get_method(name, m, **kwargs) for m in stage_models]

        def loop_one(m, methods=methods):
            return methods[stage_models.index(m)].attribute(inputs, target=targets)

        def loop():
            return torch.stack([m.attribute(inputs, target=targets) for m in methods])

        if name == "gradient":
            def group_fn(batched_backward):
                return lambda group: vm(batched_backward)(group, inputs, targets)
        else:
            def group_fn(batched_backward):
                return lambda group: ig_from(vm(batched_backward), group)
        fns = {"ours": loop}
        for label, bb in [("vmap(grad)", False), ("vmap fwd + batched backward", True)]:
            fns[f"{label}, all {len(stages)} stages in one call"] = chunked(group_fn(bb), len(stages))
            fns[f"{label}, pairs of stages"] = chunked(group_fn(bb), 2)
            fns[f"{label}, the {head} head-only stages in one call, the rest looped"] = head_then_loop(
                group_fn(bb), loop_one)
        reference = loop()
        errors = {k: float((fn() - reference).abs().max() / reference.abs().max()) for k, fn in fns.items()
                  if k != "ours"}
        best, ratios = _interleaved(fns, repeats)
        print(f"{name}: the {len(stages)} explanations one stage after another (the cascade): {best['ours'] * 1e3:.1f}"
              " ms; stage-batched (time / loop time, median of rounds; best; max relative difference to the loop):")
        for k in fns:
            if k != "ours":
                print(f"    {k:<80s} {ratios[k]:.2f}x  {best[k] * 1e3:7.1f} ms  {errors[k]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quantus", action="store_true", help="also compare with Quantus' MPRT")
    parser.add_argument("--no-floor", action="store_true", help="skip the cascade-vs-explanations section")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"interleaved rounds of the quantus comparison (default {REPEATS}; more when loaded)")
    parser.add_argument("--stage-batching", action="store_true",
                        help="time vmapped stage-batched explanations against the per-stage loop (torch.func)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the gradient cascade of the quantus comparison (where the overhead goes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16).eval()
    inputs = torch.rand(16, 1, 32, 32)
    targets = torch.arange(16) % 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); SmallCNN(width=16), 16 probes of 1x32x32;"
          f" best of {REPEATS} runs ({args.repeats} interleaved rounds against quantus)")
    limits = contextlib.nullcontext()
    if importlib.util.find_spec("threadpoolctl") is not None:  # numpy/scipy BLAS pools: the same thread count
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=args.threads)
    with limits, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Quantus' and Captum's advisory warnings
        if not args.no_floor:
            _floor_section(model, inputs, targets)
        if args.profile:
            _profile(model, inputs, targets, args.repeats)
        if args.stage_batching:
            _stage_batching_section(model, inputs, targets, args.repeats)
        if args.quantus:
            _quantus_section(model, inputs, targets, args.repeats)


if __name__ == "__main__":
    main()
