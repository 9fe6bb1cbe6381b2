"""How cost grows with the work: time and peak memory, each measurement in a fresh process.

Parts (``--part slices|attribution|all``):

- **slices**: :class:`~lightning_lens.slices.SliceFinder` on 10k, 100k, 1M and 10M rows x 8 categorical attributes
  (cardinalities 2-8, int64 columns as a user would pass them), depth 2 and 3, with a planted slice
  ``a2=1 & a5=3`` (~3% of the rows, ~45% error vs ~8% elsewhere) that must rank first. Each (rows, depth) runs in its
  own process; we report the wall time of ``find`` and the process's peak RSS (``ru_maxrss``), with the RSS before
  the search (libraries and data) beside it. ``sliceline`` (the ``dev`` extra) runs the same search at 1M rows for
  comparison, in its own process with a time limit.
- **attribution**: SmoothGrad and Integrated Gradients (``--attr-methods`` adds ``gradient``) at their default
  chunking (``batch_size=None``: blocks within ``DEFAULT_ELEMENT_BUDGET`` input elements) on
  :class:`~lightning_lens.testing.models.SmallCNN` (3 input channels, width 16, classifier sized for the input), from
  batch 1 to 512 at 3x32x32 and from 32x32 to 224x224 at batch 8, with Captum's defaults beside when it is installed
  (``NoiseTunnel(Saliency)`` with ``nt_samples`` = our ``n_samples``, ``IntegratedGradients`` with ``n_steps`` = ours
  and no ``internal_batch_size``, ``Saliency``). Each (tool, method, batch, side) runs in its own process. **Peak** is
  the process's resident-set high-water mark during the first call on the batch, after a warm-up call on one example (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the input is made; ``ru_maxrss`` growth where that is not available) minus
  the resident set at that moment: it counts the input, the result and every temporary. Workers run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (unless set) so that glibc returns freed tensors to the system and the resident set
  follows the live tensors. The caller's input and the
  returned attributions are necessarily ``O(batch x input)``, so **flat** = peak - (input + result) bytes is what must
  stay bounded (within a small constant) whatever the batch and input size (issue 19). Time is a second call, also
  given per (example x sample). Memory numbers do not depend on the machine's load; times and their ratios do (run
  on a quiet machine to compare tools). ``--attr-samples`` (default 8, below the methods' default of 50 to keep this
  part to a few minutes; the memory at defaults does not depend on it since blocks are bounded) sets both
  ``n_samples`` and ``n_steps``.

Run: ``python benchmarks/scaling.py --part slices`` (about 3-6 minutes on 2 cores; ``--max-rows 1000000`` to skip
10M rows, ``--no-sliceline`` to skip the comparison); ``--part attribution`` (about 2-4 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

CARDINALITIES = (2, 3, 4, 5, 6, 8, 4, 3)
PLANTED = {"a2": 1, "a5": 3}
SLICE_ROWS = (10_000, 100_000, 1_000_000, 10_000_000)
SLICELINE_ROWS = 1_000_000
SLICELINE_TIMEOUT = 240.0  # seconds per sliceline run


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _planted_data(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    meta = {f"a{i}": rng.integers(0, c, n) for i, c in enumerate(CARDINALITIES)}
    planted = np.ones(n, dtype=bool)
    for k, v in PLANTED.items():
        planted &= meta[k] == v
    errors = rng.random(n) < np.where(planted, 0.45, 0.08)
    return meta, errors


def _min_support(n: int) -> int:
    return max(30, int(np.ceil(0.005 * n)))


def _slice_worker(rows: int, depth: int, tool: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    if tool == "lightning_lens":
        from lightning_lens.slices import SliceFinder
    else:
        from sliceline.slicefinder import Slicefinder
    meta, errors = _planted_data(rows)
    data_mib = _peak_mib()  # the libraries and the data, before the search
    planted = " & ".join(f"{k}={v}" for k, v in PLANTED.items())
    start = time.perf_counter()
    if tool == "lightning_lens":
        finder = SliceFinder(max_depth=depth, min_support=_min_support(rows), score_alpha=0.95)
        found = finder.find(errors, meta)
        seconds = time.perf_counter() - start
        top = found[0].name if found else "(none)"
        extra = {"tested": finder.last_report_["n_tested"], "reported": len(found)}
    else:
        names = list(meta)
        X = np.stack([meta[k] for k in names], axis=1)
        sf = Slicefinder(alpha=0.95, k=1, max_l=depth, min_sup=_min_support(rows), verbose=False)
        sf.fit(X, errors.astype(np.int64))
        seconds = time.perf_counter() - start
        top = " & ".join(f"{names[j]}={int(v)}" for j, v in enumerate(sf.top_slices_[0]) if v is not None)
        extra = {}
    found_planted = set(top.split(" & ")) == set(planted.split(" & "))
    return {"tool": tool, "rows": rows, "depth": depth, "seconds": seconds, "peak_mib": _peak_mib(),
            "data_mib": data_mib, "top": top, "planted_found": found_planted, **extra}


def _measure(rows: int, depth: int, tool: str, timeout: Optional[float] = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, "--rows", str(rows), "--depth", str(depth)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "rows": rows, "depth": depth, "error": f"did not finish within {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == -9:
            last = "killed (SIGKILL: out of memory?)"
        return {"tool": tool, "rows": rows, "depth": depth, "error": f"failed (exit {proc.returncode}): {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(r: dict[str, Any]) -> str:
    head = f"{r['tool']:<15} {r['rows']:>10,} rows  depth {r['depth']}  "
    if "error" in r:
        return head + r["error"]
    tested = f"  ({r['tested']} candidates tested)" if "tested" in r else ""
    return (head + f"{r['seconds']:8.2f} s  peak {r['peak_mib']:7.0f} MiB (before the search {r['data_mib']:6.0f} MiB)  "
            f"top: {r['top']}  planted found: {r['planted_found']}{tested}")


def slices_part(max_rows: int, sliceline: bool) -> list[dict[str, Any]]:
    """Slice search time and peak memory against rows and depth, and sliceline at 1M rows."""
    print(f"slice search: {len(CARDINALITIES)} attributes (cardinalities {CARDINALITIES}), planted "
          f"{' & '.join(f'{k}={v}' for k, v in PLANTED.items())}, min_support max(30, 0.5% n), score alpha 0.95; "
          "one process per measurement", flush=True)
    results = []
    for rows in SLICE_ROWS:
        if rows > max_rows:
            continue
        for depth in (2, 3):
            results.append(_measure(rows, depth, "lightning_lens"))
            print(_line(results[-1]), flush=True)
    if sliceline and SLICELINE_ROWS <= max_rows:
        try:
            import sliceline  # noqa: F401
        except ImportError:
            print("sliceline is not installed (pip install -e '.[dev]'): no comparison")
        else:
            for depth in (2, 3):
                results.append(_measure(SLICELINE_ROWS, depth, "sliceline", timeout=SLICELINE_TIMEOUT))
                print(_line(results[-1]), flush=True)
    return results


ATTR_BATCHES = (1, 8, 64, 512)  # at 3x32x32
ATTR_SIDES = (32, 64, 128, 224)  # at batch 8
ATTR_METHODS = ("smoothgrad", "integrated_gradients")


def _resident_mib() -> Optional[float]:
    """The process's resident set now (Linux ``/proc``), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (``VmHWM``) to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _high_water_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _peak_mib()


def _attr_worker(tool: str, method: str, batch: int, side: int, samples: int) -> dict[str, Any]:
    """One attribution measurement, in this (fresh) process."""
    import torch

    from lightning_lens.testing.models import SmallCNN

    # one thread: on 2 cores shared with other jobs, 2 OpenMP threads made small blocks up to 25x slower (spinning)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=10, input_size=side).eval()
    if tool == "lightning_lens":
        from lightning_lens.attribution import Gradient, IntegratedGradients, SmoothGrad

        if method == "smoothgrad":
            explainer: Any = SmoothGrad(model, n_samples=samples)
        elif method == "integrated_gradients":
            explainer = IntegratedGradients(model, n_steps=samples)
        else:
            explainer = Gradient(model)

        def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return explainer.attribute(x, target=target)
    else:
        from captum.attr import IntegratedGradients as CaptumIG
        from captum.attr import NoiseTunnel, Saliency

        if method == "smoothgrad":
            tunnel = NoiseTunnel(Saliency(model))

            def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=samples, stdevs=0.15, target=target)
        elif method == "integrated_gradients":
            ig = CaptumIG(model)

            def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return ig.attribute(x, target=target, n_steps=samples)
        else:
            saliency = Saliency(model)

            def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return saliency.attribute(x, target=target, abs=False)
    # a first call on one example pays the one-time costs (lazy imports, kernel selection); the next call is measured
    run(torch.randn(1, 3, side, side), torch.zeros(1, dtype=torch.long))
    reset = _reset_peak()
    before = _resident_mib() if reset else None
    before = before if before is not None else _peak_mib()
    x = torch.randn(batch, 3, side, side)
    target = torch.arange(batch) % 10
    result = run(x, target)
    peak = _high_water_mib() - before
    io_mib = (x.numel() * x.element_size() + result.numel() * result.element_size()) / 2**20
    del result
    start = time.perf_counter()
    run(x, target)
    seconds = time.perf_counter() - start
    return {"tool": tool, "method": method, "batch": batch, "side": side, "samples": samples, "seconds": seconds,
            "peak_mib": peak, "io_mib": io_mib, "flat_mib": peak - io_mib, "base_mib": before,
            "measure": "VmHWM" if reset else "ru_maxrss"}


def _attr_measure(tool: str, method: str, batch: int, side: int, samples: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--attr-worker", tool, "--method", method, "--batch", str(batch),
           "--side", str(side), "--attr-samples", str(samples)]
    head = {"tool": tool, "method": method, "batch": batch, "side": side, "samples": samples}
    # glibc raises its mmap threshold to the largest block freed so far, so freed blocks then stay resident and the
    # resident set drifts above the live tensors by up to ~15 MiB (measured); a fixed threshold makes it follow them
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return {**head, "error": "did not finish within 600 s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == -9:
            last = "killed (SIGKILL: out of memory?)"
        return {**head, "error": f"failed (exit {proc.returncode}): {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _attr_line(r: dict[str, Any]) -> str:
    head = f"{r['tool']:<15} {r['method']:<20} batch {r['batch']:>4}  {r['side']:>3}x{r['side']:<3}  "
    if "error" in r:
        return head + r["error"]
    samples = r["samples"] if r["method"] != "gradient" else 1
    per = r["seconds"] / (r["batch"] * samples) * 1e3
    return (head + f"peak {r['peak_mib']:7.1f} MiB  input+result {r['io_mib']:6.1f} MiB  flat {r['flat_mib']:7.1f} MiB"
            f"  {r['seconds']:7.3f} s  {per:7.3f} ms per (example x sample)")


def attribution_part(samples: int, methods: tuple[str, ...] = ATTR_METHODS) -> list[dict[str, Any]]:
    """Attribution time and peak memory against batch and input size, with Captum's defaults beside."""
    try:
        import captum  # noqa: F401

        tools = ["lightning_lens", "captum"]
    except ImportError:
        tools = ["lightning_lens"]
        print("captum is not installed: no comparison")
    print(f"attribution: SmallCNN(3 channels, width 16), n_samples = n_steps = {samples} (the methods' default is 50;"
          " fewer here to keep this part short), default batch_size, 1 thread; one process per measurement.\n"
          "peak = resident-set high-water mark during the first call on the batch (after a warm-up on one example) minus the resident set just before the input was"
          " made (input, result and temporaries);\nflat = peak - (input + result) bytes: the part that must not grow"
          " with the batch or the input size. Memory does not depend on the machine's load; times do (other jobs"
          " share the cores): compare times on a quiet machine.", flush=True)
    configs = [(b, 32) for b in ATTR_BATCHES] + [(8, s) for s in ATTR_SIDES if s != 32]
    results = []
    for method in methods:
        for batch, side in configs:
            for tool in tools:
                results.append(_attr_measure(tool, method, batch, side, samples))
                print(_attr_line(results[-1]), flush=True)
        ours = [r for r in results if r["method"] == method and r["tool"] == "lightning_lens" and "error" not in r]
        if ours:
            flats = [r["flat_mib"] for r in ours]
            print(f"  {method}: flat measure from {min(flats):.1f} to {max(flats):.1f} MiB over batch"
                  f" {min(ATTR_BATCHES)}..{max(ATTR_BATCHES)} and sides {min(ATTR_SIDES)}..{max(ATTR_SIDES)}",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["slices", "attribution", "all"], default="all")
    parser.add_argument("--max-rows", type=int, default=max(SLICE_ROWS), help="largest slice-search size")
    parser.add_argument("--no-sliceline", action="store_true", help="skip the sliceline comparison")
    parser.add_argument("--worker", choices=["lightning_lens", "sliceline"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attr-samples", type=int, default=8, help="n_samples / n_steps of the attribution part")
    parser.add_argument("--attr-methods", default=",".join(ATTR_METHODS),
                        help="comma-separated: smoothgrad, integrated_gradients, gradient")
    parser.add_argument("--attr-worker", choices=["lightning_lens", "captum"], help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["smoothgrad", "integrated_gradients", "gradient"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attr_worker:
        print(json.dumps(_attr_worker(args.attr_worker, args.method, args.batch, args.side, args.attr_samples)))
        return
    if args.worker:
        print(json.dumps(_slice_worker(args.rows, args.depth, args.worker)))
        return
    start = time.perf_counter()
    if args.part in ("slices", "all"):
        slices_part(args.max_rows, not args.no_sliceline)
    if args.part in ("attribution", "all"):
        attribution_part(args.attr_samples, tuple(m for m in args.attr_methods.split(",") if m))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
