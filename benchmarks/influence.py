"""TracIn: lightning_lens.influence against Captum at equal work, and self-influence finding flipped labels.

Setup: SpuriousDigits' 1078 training images with 10 % of the labels flipped (seeded), a small CNN (two convolutions,
two linear layers, 25.8k parameters) trained with SGD for 10 epochs, a checkpoint saved after every second epoch
(5 files, with the learning rate). Both libraries read the same files, cover the same parameters (all of them, or the
final linear layer's weight for the fast path), the same data, batches of 64, one thread.

Each measurement runs in a fresh process: time of the call (median of ``--repeats``; the first call is a warm-up)
and the peak resident memory during the first call above the resident memory before it (Linux: the peak is reset
just before the call; one plain forward and backward pass of the model runs first, so that code pages both libraries
touch are not counted). Then the scores of the two
libraries are compared (largest difference relative to the largest score) and self-influence is evaluated as a
detector of the flipped labels: precision at k = the number flipped (chance: 0.10), next to the last checkpoint's
loss as a baseline. The random projection is compared with the exact scores.

Run: .venv/bin/python benchmarks/influence.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens.datasets import SpuriousDigits
from lightning_lens.influence import TracInCP, TracInCPFast, precision_at_k

EPOCHS, EVERY, LR, BATCH, N_TEST = 10, 2, 0.05, 64, 100
METHODS = (
    "ours_self", "captum_self", "ours_influence", "captum_influence",
    "ours_fast_self", "captum_fast_self", "ours_fast_influence", "captum_fast_influence",
)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 30 -> 15
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),  # 15 -> 13 -> 6
        nn.Flatten(), nn.Linear(16 * 6 * 6, 40), nn.ReLU(), nn.Linear(40, 10),
    )


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train, val = SpuriousDigits("train", seed=0), SpuriousDigits("val", seed=0)
    x, y = train.images, train.labels.clone()
    gen = torch.Generator().manual_seed(0)
    flip = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    y[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[flip] = True
    return x, y, flipped, val.images[:N_TEST], val.labels[:N_TEST]


def train_checkpoints(root: str) -> list[str]:
    x, y, _, _, _ = data()
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    paths = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 32):
            batch = order[i : i + 32]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % EVERY == 0:
            paths.append(os.path.join(root, f"epoch_{epoch}.pt"))
            torch.save({"state_dict": model.state_dict(), "learning_rate": LR}, paths[-1])
    return paths


def load_into(model: nn.Module, path: str) -> float:
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["state_dict"])
    return saved["learning_rate"]


def reset_peak_rss() -> None:
    """Linux: restart the peak resident set size (VmHWM) from the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, paths: list[str], repeats: int, out: str) -> None:
    """One method in this process: times, peak memory, scores (saved for the comparison)."""
    from captum.influence import TracInCP as CaptumTracInCP
    from captum.influence import TracInCPFast as CaptumTracInCPFast

    warnings.filterwarnings("ignore")
    x, y, _, x_test, y_test = data()
    model = make_model()
    fast = "fast" in method
    if method.startswith("ours"):
        engine = (TracInCPFast(model, "9", paths, None, batch_size=BATCH) if fast
                  else TracInCP(model, paths, None, batch_size=BATCH))
        run = (lambda: engine.self_influence(x, y)) if method.endswith("self") else (
            lambda: engine.influence(x_test, y_test, x, y))
    else:
        loss = nn.CrossEntropyLoss(reduction="sum")
        dataset = TensorDataset(x, y)
        if fast:
            captum = CaptumTracInCPFast(model, model[9], dataset, paths, checkpoints_load_func=load_into,
                                        loss_fn=loss, batch_size=BATCH)
        else:
            captum = CaptumTracInCP(model, dataset, paths, checkpoints_load_func=load_into, loss_fn=loss,
                                    batch_size=BATCH, sample_wise_grads_per_batch=True)
        run = (lambda: captum.self_influence(DataLoader(dataset, batch_size=BATCH))) if method.endswith("self") else (
            lambda: captum.influence((x_test, y_test)))
    # one plain forward and backward first: the library code pages and allocator arenas it touches are resident
    # for both libraries alike and are not part of either's cost
    F.cross_entropy(model(x[:BATCH]), y[:BATCH]).backward()
    model.zero_grad(set_to_none=True)
    reset_peak_rss()  # the set-up's own peak (building the data, importing) must not hide the call's
    before = rss_bytes()
    scores = run()  # warm-up; its peak is the one reported
    peak = peak_rss_bytes() - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    torch.save(scores, out + ".pt")
    with open(out + ".json", "w") as f:
        json.dump({"seconds": statistics.median(times), "peak_mb": max(0, peak) / 2**20}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--paths", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.paths.split(","), args.repeats, args.out)
        return
    try:
        import captum  # noqa: F401  (only: is it installed)
    except ImportError:
        sys.exit("this benchmark compares with Captum: pip install captum")
    with tempfile.TemporaryDirectory(prefix="tracin_bench_") as root:
        compare(root, args)


def compare(root: str, args: argparse.Namespace) -> None:
    import captum

    paths = train_checkpoints(root)
    x, y, flipped, x_test, y_test = data()
    n_params = sum(p.numel() for p in make_model().parameters())
    print(f"captum {captum.__version__}, torch {torch.__version__}, threads {args.threads}; {len(y)} training and"
          f" {len(y_test)} test examples, {len(paths)} checkpoints, {n_params} parameters, batch {BATCH}")
    results = {}
    for method in METHODS:
        out = os.path.join(root, method)
        done = subprocess.run([sys.executable, __file__, "--worker", method, "--paths", ",".join(paths), "--out", out,
                               "--repeats", str(args.repeats), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        with open(out + ".json") as f:
            results[method] = {**json.load(f), "scores": torch.load(out + ".pt")}

    print(f"\n{'work':<34} {'ours s':>8} {'captum s':>9} {'speed-up':>9} {'ours MB':>8} {'captum MB':>10}"
          f" {'max rel diff':>13}")
    for label, key in (("self-influence, all layers", "self"), ("influence 100 x 1078, all layers", "influence"),
                       ("self-influence, last layer", "fast_self"), ("influence, last layer", "fast_influence")):
        ours, ref = results[f"ours_{key}"], results[f"captum_{key}"]
        diff = float((ours["scores"] - ref["scores"]).abs().max() / ref["scores"].abs().max())
        print(f"{label:<34} {ours['seconds']:>8.3f} {ref['seconds']:>9.3f} {ref['seconds'] / ours['seconds']:>8.1f}x"
              f" {ours['peak_mb']:>8.1f} {ref['peak_mb']:>10.1f} {diff:>13.1e}")

    last = make_model()
    load_into(last, paths[-1])
    with torch.no_grad():
        loss = F.cross_entropy(last(x), y, reduction="none")
    print(f"\nflipped labels: {int(flipped.sum())} of {len(y)}; precision at k={int(flipped.sum())} (chance 0.10)")
    rows = [("TracInCP (ours), all layers", results["ours_self"]["scores"]),
            ("TracInCP (Captum), all layers", results["captum_self"]["scores"]),
            ("TracInCPFast (ours), last layer", results["ours_fast_self"]["scores"]),
            ("TracInCPFast (Captum), last layer", results["captum_fast_self"]["scores"]),
            ("loss at the last checkpoint", loss)]
    for name, scores in rows:
        print(f"  {name:<36} {precision_at_k(scores, flipped):.3f}")

    exact_self, exact_influence = results["ours_self"]["scores"], results["ours_influence"]["scores"]
    print("\nrandom projection (sparse JL) against the exact scores, all layers:")
    print(f"  {'dim':>6} {'self-inf median rel err':>24} {'influence rel Frobenius err':>28} {'precision@k':>12}"
          f" {'self-inf s':>11}")
    model = make_model()
    for dim in (256, 1024, 4096):
        engine = TracInCP(model, paths, None, projection_dim=dim, batch_size=BATCH)
        start = time.perf_counter()
        projected = engine.self_influence(x, y)
        seconds = time.perf_counter() - start
        influence = engine.influence(x_test, y_test, x, y)
        self_err = float(((projected - exact_self).abs() / exact_self).median())
        frobenius = float((influence - exact_influence).norm() / exact_influence.norm())
        print(f"  {dim:>6} {self_err:>24.4f} {frobenius:>28.4f} {precision_at_k(projected, flipped):>12.3f}"
              f" {seconds:>11.3f}")


if __name__ == "__main__":
    main()
