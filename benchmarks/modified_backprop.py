"""Cost of LRP, Excitation Backprop, CGI and RISE against the gradient limit, and their cascade verdicts.

The gradient limit is one plain input-gradient pass of the batch (forward + backward, ``input_gradients``), the least
any backpropagation method can cost. Printed per method: the median time, ``x gradient`` = method time / gradient
time (1.0 = no overhead), and the peak extra memory of one call (``--memory``: the resident size sampled while the
method runs in a fresh subprocess, minus the resident size before; an estimate, Linux only). Expected costs:
LRP-epsilon ~1 pass plus hook work (no extra forward: the epsilon rule reuses the layer output); gamma, zplus and
alpha-beta layers run 1-4 extra convolutions each (2 for signed inputs are skipped after ReLUs); canonization adds a
deep copy and one forward of one example when the model has BatchNorm (the demo CNN has none); contrastive
Excitation Backprop is two passes; CGI is one gradient pass per class (10); RISE is ``n_masks`` forward passes of the
batch (its own limit, ``n_masks x forward``, is printed too). Captum's LRP with the epsilon rule on every layer
(``Flatten`` given an epsilon rule too, so that Captum accepts the demo CNN) is timed beside ours; the composite
has no Captum counterpart (Captum has no z^B rule).

``--cascade``: trains the demo CNN (``SmallCNN``) briefly on SpuriousDigits (plain PyTorch, Adam, a few epochs) and
runs ``lightning_lens.sanity.cascading_randomization`` with Gradient, Guided Backprop, LRP (epsilon and the
epsilon-gamma-box composite), Excitation Backprop (plain and contrastive) and CGI on validation probes, printing the
verdicts and the similarity curves.

Timings on a shared machine are not meaningful: rerun on a quiet one. Run:
``python benchmarks/modified_backprop.py [--threads 2] [--repeats 5] [--batch 16] [--memory] [--cascade]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_lens.attribution import get_method, input_gradients

try:
    import captum.attr as captum_attr
    from captum.attr._utils import lrp_rules as captum_rules
except ImportError:  # the Captum row is optional
    captum_attr = captum_rules = None

METHODS: list[tuple[str, str, dict]] = [
    ("lrp (epsilon)", "lrp", {}),
    ("lrp (zplus)", "lrp", {"rule": "zplus"}),
    ("lrp (epsilon_gamma_box)", "lrp", {"composite": "epsilon_gamma_box"}),
    ("excitation_backprop", "excitation_backprop", {}),
    ("contrastive_excitation_backprop", "contrastive_excitation_backprop", {}),
    ("cgi", "cgi", {}),
    ("rise (n_masks=500)", "rise", {"n_masks": 500}),
]


def demo_cnn() -> nn.Module:
    from lightning_lens.testing import SmallCNN

    torch.manual_seed(0)  # model initialisation only (benchmark script, not library code)
    return SmallCNN(in_channels=1, num_classes=10).eval()


def timed(fns: list[Optional[Callable[[], Any]]], repeats: int) -> list[list[float]]:
    """Seconds per call, the functions alternated within each repeat after one warm-up call each."""
    for fn in fns:
        if fn is not None:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if fn is not None:
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
    return times


def gradient_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    probe = get_method("gradient", model)

    def run() -> None:
        with probe.explaining():
            input_gradients(model, x, 0)

    return run


def captum_lrp(model: nn.Module, x: torch.Tensor) -> Optional[Callable[[], Any]]:
    if captum_attr is None:
        return None

    def run() -> None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten)):
                m.rule = captum_rules.EpsilonRule(1e-6)
        captum_attr.LRP(model).attribute(x.clone().requires_grad_(True), target=0)

    return run


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(name: str, kwargs: dict, batch: int, queue: Any) -> None:
    """In a fresh process: resident memory sampled every 0.2 ms while the method runs, minus the resident memory
    before (large tensors are mmap-ed by the allocator and returned on free, so the resident size follows them)."""
    torch.set_num_threads(1)
    model = demo_cnn()
    x = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    if name == "gradient":
        run = gradient_pass(model, x)
    else:
        method = get_method(name, model, **kwargs)
        run = lambda: method.attribute(x, target=0)  # noqa: E731
    run()  # warm-up: lazy initialisation is not the method's memory
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_mb())
            time.sleep(0.0002)

    before = _resident_mb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    queue.put(max(0.0, peak[0] - before))


def peak_mb(name: str, kwargs: dict, batch: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, kwargs, batch, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return float(value)


def benchmark(batch: int, repeats: int, memory: bool) -> None:
    model = demo_cnn()
    x = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"\ndemo CNN (SmallCNN, 1x32x32, 10 classes), batch {batch}, {repeats} repeats (medians)")
    print(f"{'method':<34} {'ms':>9} {'x gradient':>10} {'limit':>22}" + (f" {'peak MB':>8}" if memory else ""))
    gradient = gradient_pass(model, x)
    forward = lambda: model(x)  # noqa: E731
    (t_grad, t_fwd) = timed([gradient, lambda: torch.no_grad()(forward)()], repeats)
    g = statistics.median(t_grad)
    line = f"{'gradient (the limit)':<34} {g * 1e3:>9.2f} {1.0:>10.2f} {'1 gradient pass':>22}"
    print(line + (f" {peak_mb('gradient', {}, batch):>8.1f}" if memory else ""), flush=True)
    for shown, name, kwargs in METHODS:
        method = get_method(name, model, **kwargs)
        (t_method, t_ref) = timed([lambda: method.attribute(x, target=0), gradient], repeats)
        ratio = statistics.median(a / b for a, b in zip(t_method, t_ref))
        limit = ""
        if name == "rise":
            n = kwargs["n_masks"]
            limit = f"{statistics.median(t_method) / (n * statistics.median(t_fwd)):.2f}x of {n} fwd"
        elif name == "cgi":
            limit = f"{ratio / 10:.2f}x of 10 grad passes"
        line = f"{shown:<34} {statistics.median(t_method) * 1e3:>9.2f} {ratio:>10.2f} {limit:>22}"
        print(line + (f" {peak_mb(name, kwargs, batch):>8.1f}" if memory else ""), flush=True)
    captum = captum_lrp(model, x)
    if captum is None:
        print("captum is not installed: no Captum row (pip install captum)")
    else:
        warnings.filterwarnings("ignore", message=".*did not already require gradients")
        ours = get_method("lrp", model)
        (t_captum, t_ours) = timed([captum, lambda: ours.attribute(x, target=0)], repeats)
        print(f"{'captum LRP (epsilon)':<34} {statistics.median(t_captum) * 1e3:>9.2f}"
              f" {statistics.median(t_captum) / g:>10.2f}   captum / ours = "
              f"{statistics.median(a / b for a, b in zip(t_captum, t_ours)):.2f}")


def cascade(epochs: int) -> None:
    from torch.utils.data import DataLoader

    from lightning_lens.datasets import SpuriousDigits
    from lightning_lens.sanity import cascading_randomization

    train, val = SpuriousDigits("train", seed=0), SpuriousDigits("val", seed=0)
    model = demo_cnn().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(batch["image"]), batch["label"]).backward()
            optimizer.step()
    model.eval()
    val_batch = next(iter(DataLoader(val, batch_size=len(val))))
    with torch.no_grad():
        accuracy = (model(val_batch["image"]).argmax(1) == val_batch["label"]).float().mean()
    print(f"\ntrained SmallCNN on SpuriousDigits for {epochs} epochs in {time.perf_counter() - start:.0f} s;"
          f" val accuracy {float(accuracy):.3f}")
    probes = val_batch["image"][:16]
    methods = {
        "gradient": "gradient",
        "guided_backprop": "guided_backprop",
        "lrp_epsilon": ("lrp", {}),
        "lrp_epsilon_gamma_box": ("lrp", {"composite": "epsilon_gamma_box"}),
        "excitation_backprop": "excitation_backprop",
        "contrastive_excitation_backprop": "contrastive_excitation_backprop",
        "cgi": "cgi",
    }
    report = cascading_randomization(model, probes, None, methods, seed=0)
    print(report.summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="peak memory per method (one subprocess each)")
    parser.add_argument("--cascade", action="store_true", help="train the demo CNN and print the cascade verdicts")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_timing:
        benchmark(args.batch, args.repeats, args.memory)
    if args.cascade:
        cascade(args.epochs)


if __name__ == "__main__":
    main()
