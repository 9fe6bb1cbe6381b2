"""Sorted dispatch vs the dense reference path of MixtureOfExperts (E=8, k=2, hidden size 512, 4096 tokens).

Both paths compute the same outputs and gradients (tests/moe); sorted dispatch runs each expert on its own tokens
only (k/E of the expert FLOPs), the dense path runs every expert on every token and masks. Expert: the default
two-layer MLP 512 -> 512 -> GELU -> 512; train mode with noisy gating. Reported: median seconds over repeats (the two
paths interleaved so that load on a shared machine hits both alike) and the dense/sorted ratio; the target is >= 2x.

Measured with torch's default intra-op threads and with one thread. On a machine whose cores are busy with other
work, multi-threaded timings of small ops are dominated by OpenMP threads waiting for each other; the one-thread
row then shows the algorithmic ratio.

Run: .venv/bin/python benchmarks/moe.py [--repeats 5]
"""

import argparse
import statistics
import time

import torch

from lightning_lens.interpretable_models import MixtureOfExperts

EXPERTS, K, HIDDEN, TOKENS = 8, 2, 512, 4096


def measure(layer: MixtureOfExperts, x: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    x_grad = x.clone().requires_grad_(True)

    def forward(dense: bool) -> None:
        with torch.no_grad():
            layer(x, dense=dense)

    def forward_backward(dense: bool) -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x_grad, dense=dense)
        (out.square().mean() + layer.aux_loss).backward()

    results = {}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        fn(False), fn(True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for dense in (False, True):
                t = time.perf_counter()
                fn(dense)
                times[dense].append(time.perf_counter() - t)
        results[name] = (statistics.median(times[False]), statistics.median(times[True]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = MixtureOfExperts(HIDDEN, HIDDEN, EXPERTS, k=K, hidden_features=HIDDEN, noise_seed=0).train()
    x = torch.randn(TOKENS, HIDDEN)
    default_threads = torch.get_num_threads()
    print(f"MixtureOfExperts E={EXPERTS} k={K} in=out=hidden={HIDDEN}, {TOKENS} tokens, torch {torch.__version__}")
    print(f"{'threads':>7} {'pass':<18} {'sorted s':>9} {'dense s':>9} {'dense/sorted':>13}")
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for name, (sorted_s, dense_s) in measure(layer, x, args.repeats).items():
            print(f"{threads:>7} {name:<18} {sorted_s:>9.3f} {dense_s:>9.3f} {dense_s / sorted_s:>12.2f}x")
    torch.set_num_threads(default_threads)
    print(f"(ratio from expert FLOPs alone: E/k = {EXPERTS / K:.0f}x; target >= 2x)")


if __name__ == "__main__":
    main()
