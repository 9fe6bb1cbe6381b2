"""Sorted dispatch vs the dense reference path of MixtureOfExperts (E=8, k=2, hidden size 512, 4096 tokens).

Both paths compute the same outputs and gradients (tests/moe); sorted dispatch runs each expert on its own tokens
only (k/E of the expert FLOPs), the dense path runs every expert on every token and masks. Expert: the default
two-layer MLP 512 -> 512 -> GELU -> 512. Reported: median seconds over repeats (paths interleaved so that load on a
shared machine hits both alike) and the dense/sorted ratio; the target is >= 2x.

Run: .venv/bin/python benchmarks/moe.py [--threads N]
"""

import argparse
import statistics
import time

import torch

from lightning_lens.interpretable_models import MixtureOfExperts

EXPERTS, K, HIDDEN, TOKENS = 8, 2, 512, 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = MixtureOfExperts(HIDDEN, HIDDEN, EXPERTS, k=K, hidden_features=HIDDEN, noise_seed=0).train()
    x = torch.randn(TOKENS, HIDDEN)
    x_grad = x.clone().requires_grad_(True)

    def forward(dense: bool) -> None:
        with torch.no_grad():
            layer(x, dense=dense)

    def forward_backward(dense: bool) -> None:
        layer.zero_grad(set_to_none=True)
        out = layer(x_grad, dense=dense)
        (out.square().mean() + layer.aux_loss).backward()

    print(f"MixtureOfExperts E={EXPERTS} k={K} in=out=hidden={HIDDEN}, {TOKENS} tokens, train mode (noisy gating), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(f"{'pass':<18} {'sorted s':>9} {'dense s':>9} {'dense/sorted':>13}")
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        fn(False), fn(True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for dense in (False, True):
                t = time.perf_counter()
                fn(dense)
                times[dense].append(time.perf_counter() - t)
        sorted_s, dense_s = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<18} {sorted_s:>9.3f} {dense_s:>9.3f} {dense_s / sorted_s:>12.2f}x")
    print(f"(ideal ratio from FLOPs alone: E/k = {EXPERTS / K:.0f}x)")


if __name__ == "__main__":
    main()
