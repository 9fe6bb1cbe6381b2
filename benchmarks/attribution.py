"""Time every attribution method: its efficiency against the cost it cannot avoid, and its speed against Captum.

* efficiency = t_limit / t_method, where t_limit is the time of the ``n`` model passes the method needs by definition,
  run back to back on inputs drawn like the method's own: ``n_samples`` gradient passes of noisy copies for
  SmoothGrad (a noisy batch costs ~1.3x a clean one on CPU), ``n_steps`` gradient passes of the path points for
  Integrated Gradients, one forward of each occluded copy for Occlusion, one gradient pass of the batch for the
  single-pass methods (two for Guided Grad-CAM). 1.0 means no overhead beyond those passes. Grad-CAM backpropagates
  only to its layer, so it can exceed 1.
* ``vs Captum default`` / ``vs Captum tuned`` = Captum's time / ours (above 1: we are faster). Default is Captum as
  called out of the box (NoiseTunnel and IntegratedGradients then run all ``n x batch`` rows in one pass); tuned is
  Captum at the chunking that is fastest on CPU, as a user would set it by hand: ``NoiseTunnel`` with
  ``nt_samples_batch_size=1``, ``IntegratedGradients`` with ``internal_batch_size`` = batch. Captum's columns are left
  out, with a note, when captum is not installed (``pip install captum``).

Every timing alternates the contenders (limit, ours, Captum default, Captum tuned) within one repeat, so machine load
hits them alike; the medians over the repeats are printed, and the ratios are medians of the per-repeat ratios. The
last rows time SmoothGrad at other chunk sizes (``batch_size``) to show why the default is what it is.

Run: ``python benchmarks/attribution.py [--threads 2] [--repeats 3] [--batch 32] [--clock cpu]`` (about 1-2 minutes on a
quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from lightning_lens.attribution import get_method, input_gradients
from lightning_lens.attribution._batching import resolve_batch_size
from lightning_lens.attribution.base import Attribution
from lightning_lens.attribution.integrated_gradients import integration_points

try:
    import captum.attr as captum_attr
except ImportError:  # the Captum columns are optional
    captum_attr = None

Fn = Callable[[], object]


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    from lightning_lens.testing import SmallCNN

    return SmallCNN(in_channels=in_channels, num_classes=num_classes)


CLOCK = time.perf_counter


def alternated(fns: list[Optional[Fn]], repeats: int) -> list[list[float]]:
    """Seconds per call of each function, the functions alternated within each repeat (after one warm-up call)."""
    for fn in fns:
        if fn is not None:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            start = CLOCK()
            fn()
            times[i].append(CLOCK() - start)
    return times


# ------------------------------------------------------------------------------------------------ the limits
def gradient_passes(model: nn.Module, batches: list[torch.Tensor], target: int) -> Fn:
    """One forward + input-gradient backward per batch, as the methods run them (eval mode, autograd.grad)."""
    probe = get_method("gradient", model)

    def run() -> None:
        with probe.explaining():
            for batch in batches:
                input_gradients(model, batch, target, owned=True)

    return run


def forward_passes(model: nn.Module, batches: list[torch.Tensor]) -> Fn:
    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    return run


def limit(method: Attribution, model: nn.Module, x: torch.Tensor, target: int) -> tuple[int, Fn]:
    """``(n, the n passes the method cannot avoid, on inputs drawn like its own)``."""
    gen = torch.Generator().manual_seed(1)
    if hasattr(method, "n_samples"):  # SmoothGrad family: gradients of noisy copies
        flat = x.flatten(1)
        sigma = method.noise_level * (flat.max(1).values - flat.min(1).values).view(-1, 1, 1, 1)
        noisy = [x + sigma * torch.randn(x.shape, generator=gen) for _ in range(method.n_samples)]
        return method.n_samples, gradient_passes(model, noisy, target)
    if hasattr(method, "n_steps"):  # Integrated Gradients: gradients at the path points (baseline 0)
        alphas, _ = integration_points(method.n_steps, method.method)
        return method.n_steps, gradient_passes(model, [a * x for a in alphas], target)
    if method.name == "occlusion":  # forward passes of the occluded copies
        win, strides, counts = method.geometry(x.shape[1:])
        copies = []
        for i in range(counts[1]):
            for j in range(counts[2]):
                c = x.clone()
                c[:, :, i * strides[1] : i * strides[1] + win[1], j * strides[2] : j * strides[2] + win[2]] = 0
                copies.append(c)
        return len(copies), forward_passes(model, copies)
    n = 2 if method.name == "guided_gradcam" else 1  # a Grad-CAM pass and a guided-backprop pass
    return n, gradient_passes(model, [x] * n, target)


# ----------------------------------------------------------------------------------------- Captum's equivalents
def captum_calls(name: str, kwargs: dict, model: nn.Module, x: torch.Tensor, target: int,
                 method: Attribution) -> tuple[Optional[Fn], Optional[Fn]]:
    """``(Captum default, Captum tuned)`` for one of our methods (None where Captum has no counterpart or no tuning)."""
    if captum_attr is None:
        return None, None
    ca = captum_attr
    batch = x.shape[0]
    if name in ("smoothgrad", "smoothgrad_squared", "vargrad"):
        nt_type = {"smoothgrad": "smoothgrad", "smoothgrad_squared": "smoothgrad_sq", "vargrad": "vargrad"}[name]
        tunnel = ca.NoiseTunnel(ca.Saliency(model))
        stdev = method.noise_level * float(x.max() - x.min())  # Captum's noise is absolute; ours a fraction of range

        def smooth(rows: Optional[int]) -> Fn:
            return lambda: tunnel.attribute(x, nt_type=nt_type, nt_samples=method.n_samples, stdevs=stdev,
                                            nt_samples_batch_size=rows, target=target, abs=False)

        return smooth(None), smooth(1)
    if name == "integrated_gradients":
        ig = ca.IntegratedGradients(model)

        def integrate(rows: Optional[int]) -> Fn:
            return lambda: ig.attribute(x, target=target, n_steps=method.n_steps, method=method.method,
                                        internal_batch_size=rows)

        return integrate(None), integrate(batch)
    layer = getattr(model, "features", None)
    simple = {
        "gradient": lambda: ca.Saliency(model).attribute(x, target=target, abs=False),
        "gradient_x_input": lambda: ca.InputXGradient(model).attribute(x, target=target),
        "guided_backprop": lambda: ca.GuidedBackprop(model).attribute(x, target=target),
        "deconvnet": lambda: ca.Deconvolution(model).attribute(x, target=target),
        "gradcam": lambda: ca.LayerAttribution.interpolate(
            ca.LayerGradCam(model, layer[8]).attribute(x, target=target, relu_attributions=True), x.shape[2:],
            interpolate_mode="bilinear"),
        "guided_gradcam": lambda: ca.GuidedGradCam(model, layer[8]).attribute(x, target=target),
        "occlusion": lambda: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], 8, 8), strides=(x.shape[1], 4, 4), baselines=0.0, target=target),
    }
    return simple.get(name), None


METHODS = [
    ("gradient", {}), ("gradient_x_input", {}), ("smoothgrad", {}), ("smoothgrad_squared", {}), ("vargrad", {}),
    ("integrated_gradients", {}), ("integrated_gradients", {"method": "riemann_trapezoid"}),
    ("guided_backprop", {}), ("deconvnet", {}), ("gradcam", {"layer": "features.8"}),
    ("guided_gradcam", {"layer": "features.8"}), ("occlusion", {}), ("edge", {}), ("random", {}),
]


def run(label: str, model: nn.Module, x: torch.Tensor, repeats: int, with_captum: bool, sweep: bool) -> None:
    model.eval()
    target = 0
    print(f"\n{label}: batch {tuple(x.shape)}")
    header = f"{'method':<48} {'n':>3} {'limit ms':>9} {'ours ms':>8} {'efficiency':>10}"
    if with_captum:
        header += f" {'Captum default ms':>17} {'vs default':>10} {'Captum tuned ms':>15} {'vs tuned':>8}"
    print(header)
    rows = [(name + (f" ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else ""), name, kw)
            for name, kw in METHODS]
    if sweep:
        rows += [(f"smoothgrad (batch_size={b})", "smoothgrad", {"batch_size": b}) for b in (64, 160, 512)]
    for shown, name, kw in rows:
        method = get_method(name, model, **kw)
        n, reference = limit(method, model, x, target)
        default, tuned = captum_calls(name, kw, model, x, target, method) if with_captum else (None, None)
        if "batch_size" in kw:
            default = tuned = None
        ours: Fn = lambda: method.attribute(x, target=target)  # noqa: E731
        t_ref, t_ours, t_default, t_tuned = alternated([reference, ours, default, tuned], repeats)
        efficiency = statistics.median(a / b for a, b in zip(t_ref, t_ours))
        line = f"{shown:<48} {n:>3} {statistics.median(t_ref) * 1e3:>9.1f} {statistics.median(t_ours) * 1e3:>8.1f}"
        line += f" {efficiency:>10.2f}"
        if with_captum:
            for t, widths in ((t_default, (17, 10)), (t_tuned, (15, 8))):
                if t:
                    ratio = statistics.median(a / b for a, b in zip(t, t_ours))
                    line += f" {statistics.median(t) * 1e3:>{widths[0]}.1f} {ratio:>{widths[1]}.2f}"
                else:
                    line += f" {'-':>{widths[0]}} {'-':>{widths[1]}}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); the issue's numbers are for 2")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (steadier on a loaded machine; run with"
                             " OMP_WAIT_POLICY=PASSIVE so that waiting threads do not spin)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore", message=".*did not already require gradients")  # Captum, on every call
    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # Captum's guided backprop
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # model initialisation only
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians),"
          f" {args.clock} clock")
    if captum_attr is None:
        print("captum is not installed: the Captum columns are left out (pip install captum to compare)")
    else:
        import captum

        print(f"captum {captum.__version__}; vs default / vs tuned = Captum's time / ours (> 1: ours is faster)")
    for c in (3, 1):
        rows = resolve_batch_size(None, args.batch, c * 32 * 32)
        print(f"default batch_size for {args.batch} x {c}x32x32: {rows} rows")
    start = time.perf_counter()
    run("4-conv CNN, 3x32x32", small_cnn(3, 10), torch.rand(args.batch, 3, 32, 32, generator=gen), args.repeats,
        with_captum=captum_attr is not None, sweep=True)
    run("demo model (SmallCNN), 1x32x32", small_cnn(1, 10), torch.rand(args.batch, 1, 32, 32, generator=gen),
        args.repeats, with_captum=False, sweep=False)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
