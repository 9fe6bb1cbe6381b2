"""Cost of the explanation-quality metrics, as ratios to the forward/explanation passes they cannot avoid.

* Deletion/insertion with K steps needs (K + 1) forwards of every example (twice with the random control). Printed:
  time per curve vs (K + 1) x the time of one plain forward of the batch. Efficiency near 1 means building the
  perturbed inputs costs little next to the model.
* Max-sensitivity with n samples needs n explanations. Printed: time vs n x the time of one Gradient call.
* Localization metrics need no model call: printed in milliseconds for the batch.

Run: python benchmarks/evaluation.py  (CPU; numbers vary with load, ratios are measured within one run)
"""

from __future__ import annotations

import time

import torch

from lightning_lens.attribution import Gradient
from lightning_lens.evaluation import (
    deletion_curve,
    insertion_curve,
    max_sensitivity,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from lightning_lens.testing import SmallCNN


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16).eval()
    batch = 32
    x = torch.rand(batch, 1, 32, 32, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    maps = Gradient(model).attribute(x, target=target)
    masks = torch.zeros(batch, 1, 32, 32)
    masks[:, :, 4:12, 4:12] = 1

    with torch.no_grad():
        model(x)  # warm-up
        forward = best_of(lambda: model(x), repeats=10)
    print(f"SmallCNN(width=16), batch {batch} of 1x32x32, 1 thread; one forward of the batch: {forward * 1e3:.2f} ms\n")

    print("deletion / insertion (no random control), default batch_size (element budget: 64 rows of 1x32x32)")
    print(f"{'mode':<10} {'n_steps':>7} {'time [s]':>9} {'(K+1) forwards [s]':>19} {'efficiency':>10}")
    for mode, fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
        for n_steps in (8, 16, 32, 64):
            t = best_of(lambda: fn(model, x, maps, target, n_steps=n_steps, random_control=False), repeats=2)
            ideal = (n_steps + 1) * forward
            print(f"{mode:<10} {n_steps:>7} {t:>9.3f} {ideal:>19.3f} {ideal / t:>10.2f}")
    t_rc = best_of(lambda: deletion_curve(model, x, maps, target, n_steps=32), repeats=2)
    t_no = best_of(lambda: deletion_curve(model, x, maps, target, n_steps=32, random_control=False), repeats=2)
    print(f"random control at 32 steps: {t_rc / t_no:.2f}x the time without it (expected ~2)\n")

    print("chunking: deletion, 32 steps, rows per forward")
    for bs in (32, 64, 128, 512, 2048):
        t = best_of(lambda: deletion_curve(model, x, maps, target, n_steps=32, random_control=False, batch_size=bs),
                    repeats=2)
        print(f"  batch_size={bs:<5} {t:.3f} s")

    gradient = Gradient(model)
    one = best_of(lambda: gradient.attribute(x, target=target), repeats=5)
    print(f"\nmax-sensitivity of Gradient (one Gradient call of the batch: {one * 1e3:.1f} ms)")
    for n in (5, 10, 20):
        t = best_of(lambda: max_sensitivity(gradient, x, target, attributions=maps, n_samples=n, batch_size=256),
                    repeats=2)
        print(f"  n_samples={n:<3} {t:.3f} s   efficiency vs n Gradient calls: {n * one / t:.2f}")

    print("\nlocalization (no model calls)")
    metrics = (
        ("pointing_game", pointing_game),
        ("pointing_game tol=3", lambda a, m: pointing_game(a, m, tolerance=3)),
        ("relevance_mass", relevance_mass_accuracy),
        ("relevance_rank", relevance_rank_accuracy),
    )
    for name, fn in metrics:
        t = best_of(lambda: fn(maps, masks), repeats=5)
        print(f"  {name:<20} {t * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
