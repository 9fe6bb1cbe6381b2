"""Sorted and grouped dispatch vs the dense reference path of MixtureOfExperts (k=2).

All three paths compute the same outputs and gradients (tests/interpretable_models/test_moe_layer.py). Sorted
dispatch runs each expert on its own tokens only (k/E of the expert FLOPs) in a Python loop over experts; grouped
dispatch pads each expert's tokens to the largest group and runs all experts in one ``torch.bmm`` per layer; the
dense path runs every expert on every token and masks. Expert: the default two-layer MLP size -> size -> GELU ->
size; train mode with noisy gating. Configurations: E=8 with size 256 and 2048 tokens, E=8 with size 512 and 4096
tokens (E/k = 4 is the ceiling set by the expert FLOPs), and E=32 small experts (size 64, 2048 tokens), where the
per-expert loop of sorted dispatch costs most. Reported: median seconds over repeats (the paths interleaved so that
load on a shared machine hits them alike) and the ratios; ``pad`` is grouped dispatch's padded rows / assignments.

``--profile`` also prints where the time of one forward+backward goes (torch.profiler, one thread, self CPU time by
operator family): the expert matmuls, the gathers/scatters that sort tokens to experts and back, the elementwise
work, the rest; and the time of the routing alone (router and noise logits, top-k, auxiliary losses, forward and
backward), which every path pays in full. Measured with torch's default intra-op threads and with one thread. On a
machine whose cores are busy with other work, multi-threaded timings of small ops are dominated by OpenMP threads
waiting for each other; the one-thread rows then show the algorithmic ratios.

Run: .venv/bin/python benchmarks/moe.py [--repeats 5] [--profile]
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

from lightning_lens.interpretable_models import MixtureOfExperts

K = 2
CONFIGS = ((8, 256, 2048), (8, 512, 4096), (32, 64, 2048))  # (experts, in = out = hidden size, tokens)
PATHS = ("sorted", "grouped", "dense")
FAMILIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "gather/scatter": ("aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_copy",
                       "aten::index_copy_", "aten::cat", "aten::split_with_sizes", "aten::copy_", "aten::stack",
                       "aten::sort", "aten::bincount", "aten::repeat_interleave", "aten::index_select",
                       "aten::scatter", "aten::gather"),
    "elementwise": ("aten::gelu", "aten::gelu_backward", "aten::mul", "aten::sum", "aten::add_", "aten::add",
                    "aten::fill_", "aten::zero_", "aten::div", "aten::softmax", "aten::_softmax"),
}


def _forward_backward(layer: MixtureOfExperts, x: torch.Tensor, path: str) -> None:
    layer.zero_grad(set_to_none=True)
    out = layer(x, dispatch=path)
    (out.square().mean() + layer.aux_loss).backward()


def measure(layer: MixtureOfExperts, x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    x_grad = x.clone().requires_grad_(True)

    def forward(path: str) -> None:
        with torch.no_grad():
            layer(x, dispatch=path)

    def forward_backward(path: str) -> None:
        _forward_backward(layer, x_grad, path)

    results = {}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        for path in PATHS:  # warm-up
            fn(path)
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(repeats):
            for path in PATHS:
                t = time.perf_counter()
                fn(path)
                times[path].append(time.perf_counter() - t)
        results[name] = {path: statistics.median(ts) for path, ts in times.items()}
    return results


def _routing_only(layer: MixtureOfExperts, x: torch.Tensor) -> None:
    # what every path pays before and after its experts run (private methods: this measures the layer's internals)
    layer.zero_grad(set_to_none=True)
    routing = layer._route(x)
    layer._set_outputs(routing, x.shape[:-1])
    (routing.gates.sum() + layer.aux_loss).backward()


def profile(layer: MixtureOfExperts, x: torch.Tensor, repeats: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x_grad = x.clone().requires_grad_(True)
    family_of = {op: family for family, ops in FAMILIES.items() for op in ops}
    print(f"{'path':<8} {'ms/call':>8}  " + "  ".join(f"{f:>14}" for f in (*FAMILIES, "other")) + "   top operators")
    for path in PATHS:
        _forward_backward(layer, x_grad, path)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                _forward_backward(layer, x_grad, path)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        share: dict[str, float] = defaultdict(float)
        for e in events:
            share[family_of.get(e.key, "other")] += e.self_cpu_time_total / total
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]
        print(f"{path:<8} {total / repeats / 1e3:>8.1f}  "
              + "  ".join(f"{share[f]:>14.0%}" for f in (*FAMILIES, "other"))
              + "   " + ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}" for e in top))
    _routing_only(layer, x_grad)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _routing_only(layer, x_grad)
        times.append(time.perf_counter() - t)
    print(f"routing alone (every path): {statistics.median(times) * 1e3:.1f} ms per forward+backward")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="show where the time of each path goes")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"MixtureOfExperts k={K}, default expert (Linear-GELU-Linear), train mode, torch {torch.__version__}; "
          f"median seconds of {args.repeats} repeats")
    for experts, hidden, tokens in CONFIGS:
        torch.manual_seed(0)
        layer = MixtureOfExperts(hidden, hidden, experts, k=K, hidden_features=hidden, noise_seed=0).train()
        x = torch.randn(tokens, hidden)
        with torch.no_grad():
            layer(x)
        pad = experts * int(layer.tokens_per_expert.max()) / (tokens * K)
        print(f"\nE={experts}, size {hidden}, {tokens} tokens (E/k = {experts / K:.0f}x; pad {pad:.2f})")
        print(f"{'threads':>7} {'pass':<17} {'sorted s':>9} {'grouped s':>10} {'dense s':>9} {'dense/sorted':>13} "
              f"{'dense/grouped':>14} {'sorted/grouped':>15}")
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            for name, t in measure(layer, x, args.repeats).items():
                print(f"{threads:>7} {name:<17} {t['sorted']:>9.4f} {t['grouped']:>10.4f} {t['dense']:>9.4f} "
                      f"{t['dense'] / t['sorted']:>12.2f}x {t['dense'] / t['grouped']:>13.2f}x "
                      f"{t['sorted'] / t['grouped']:>14.2f}x")
        if args.profile:
            torch.set_num_threads(1)
            print(f"where one forward+backward's self CPU time goes (1 thread, {args.repeats} calls):")
            profile(layer, x, args.repeats)
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
