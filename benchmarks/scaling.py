"""How cost grows with the work: time and peak memory, each measurement in a fresh process.

Parts (``--part slices|attribution|all``):

- **slices**: :class:`~lightning_lens.slices.SliceFinder` on 10k, 100k, 1M and 10M rows x 8 categorical attributes
  (cardinalities 2-8, int64 columns as a user would pass them), depth 2 and 3, with a planted slice
  ``a2=1 & a5=3`` (~3% of the rows, ~45% error vs ~8% elsewhere) that must rank first. Each (rows, depth) runs in its
  own process; we report the wall time of ``find`` and the process's peak RSS (``ru_maxrss``), with the RSS before
  the search (libraries and data) beside it. ``sliceline`` (the ``dev`` extra) runs the same search at 1M rows for
  comparison, in its own process with a time limit.
- **attribution**: not in this file yet (another part of issue 19 adds it).

Run: ``python benchmarks/scaling.py --part slices`` (about 3-6 minutes on 2 cores; ``--max-rows 1000000`` to skip
10M rows, ``--no-sliceline`` to skip the comparison).
"""

from __future__ import annotations

import argparse
import json
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


def attribution_part() -> None:
    """Attribution time and peak memory against batch and input size (added by the attribution work of issue 19)."""
    print("attribution: not in this file yet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["slices", "attribution", "all"], default="all")
    parser.add_argument("--max-rows", type=int, default=max(SLICE_ROWS), help="largest slice-search size")
    parser.add_argument("--no-sliceline", action="store_true", help="skip the sliceline comparison")
    parser.add_argument("--worker", choices=["lightning_lens", "sliceline"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_slice_worker(args.rows, args.depth, args.worker)))
        return
    start = time.perf_counter()
    if args.part in ("slices", "all"):
        slices_part(args.max_rows, not args.no_sliceline)
    if args.part in ("attribution", "all"):
        attribution_part()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
