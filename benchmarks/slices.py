"""Slice search speed: lightning_lens.slices vs the ``sliceline`` package on planted data.

10k rows x 8 categorical attributes (cardinalities 2-8), one planted slice ``a2=1 & a5=3`` (~3% of the rows) at ~45%
error vs ~8% elsewhere. Both searches use SliceLine's score with alpha=0.95 and the same minimum support; we time
depth 2 and 3 (``max_l``) and report the top slice. ``sliceline`` only ranks by score; we also test and correct,
so our top slice must both score best and pass q <= 0.05.

Run: ``python benchmarks/slices.py`` (add ``--repeats 5`` for steadier timings).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lightning_lens.slices import SliceFinder

CARDINALITIES = (2, 3, 4, 5, 6, 8, 4, 3)
PLANTED = {"a2": 1, "a5": 3}


def make_data(n: int = 10_000, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    meta = {f"a{i}": rng.integers(0, c, n) for i, c in enumerate(CARDINALITIES)}
    planted = np.ones(n, dtype=bool)
    for k, v in PLANTED.items():
        planted &= meta[k] == v
    errors = (rng.random(n) < np.where(planted, 0.45, 0.08)).astype(np.int64)
    return meta, errors


def time_best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()

    meta, errors = make_data(args.rows)
    min_sup = max(30, int(np.ceil(0.005 * args.rows)))
    names = list(meta)
    X = np.stack([meta[k] for k in names], axis=1)
    planted = " & ".join(f"{k}={v}" for k, v in PLANTED.items())
    print(f"data: {args.rows} rows x {len(names)} categorical attributes, planted {planted}, "
          f"error rate {errors.mean():.3f}, min_support {min_sup}")

    try:
        from sliceline.slicefinder import Slicefinder
    except ImportError:
        Slicefinder = None
        print("sliceline is not installed: only our timings are shown (pip install sliceline)")

    for depth in (2, 3):
        finder = SliceFinder(max_depth=depth, min_support=min_sup, score_alpha=0.95)
        ours_t, ours = time_best(lambda: finder.find(errors, meta), args.repeats)
        top = ours[0].name if ours else "(none)"
        report = finder.last_report_
        line = (f"depth {depth}: lightning_lens {ours_t * 1e3:8.1f} ms  top: {top:<14} "
                f"(tested {report['n_tested']} candidates, {len(ours)} reported)")
        if Slicefinder is not None:
            def run_sliceline():
                sf = Slicefinder(alpha=0.95, k=1, max_l=depth, min_sup=min_sup, verbose=False)
                sf.fit(X, errors)
                return sf

            sl_t, sf = time_best(run_sliceline, args.repeats if depth == 2 else min(args.repeats, 2))
            sl_top = " & ".join(f"{names[j]}={int(v)}" for j, v in enumerate(sf.top_slices_[0]) if v is not None)
            ours_set = set(top.split(" & "))
            same = ours_set == set(sl_top.split(" & "))
            line += (f"\n         sliceline      {sl_t * 1e3:8.1f} ms  top: {sl_top:<14}  "
                     f"speed-up x{sl_t / ours_t:5.1f}, same top slice: {same}")
        print(line)


if __name__ == "__main__":
    main()
