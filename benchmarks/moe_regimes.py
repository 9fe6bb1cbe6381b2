"""Does a MixtureOfExperts router find regimes it must infer, on every seed? And does the default balance weight
prevent routing collapse on a task without regimes?

Regimes (default): :class:`lightning_lens.datasets.SignRegimes`: x ~ N(0, I_8), the regime is the sign pattern of
x_0 and x_1 (4 regimes), the target the regime's own affine map (4 outputs). No regime indicator is given. Layer:
E=4 experts, each one ``nn.Linear(8, 4)`` (so an expert can fit exactly one regime); Adam (lr 1e-2), batches of 256
from 4,096 training samples, loss = MSE + ``aux_loss``. Reported per configuration and seed: NMI between each test
sample's top-1 expert (eval mode) and its true regime (``sklearn.metrics.normalized_mutual_info_score``, 2,048 test
samples); mean, minimum, the seeds that recovered the regimes (NMI >= 0.85) and the mean test MSE relative to the
target variance. Configurations: the former default balance weight (0.01) and the new one (0.1), k=1 and k=2, and
for k=1 the options investigated: router initialisation (zeros, N(0, 0.01^2), N(0, 1)), no gating noise, and a
top-2 warm-up (``warmup_k=2`` for part of training).

``--balance``: the collapse sweep behind the default ``balance_loss_weight``: a task without regimes (a smooth
function of 8 features whose mean is 1 or 3, as hidden activations have; E=8 experts with 32 hidden units, k=2, no
gating noise, batches of 128); load CV, largest top-1 share and relative test MSE per weight over 5 seeds.

Run: .venv/bin/python benchmarks/moe_regimes.py [--seeds 10] [--first-seed 0] [--steps 1000] [--balance]
[--only "before|warmup"]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from lightning_lens.datasets import SignRegimes
from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.interpretable_models.moe import routing_statistics

FEATURES, OUTPUTS, EXPERTS = 8, 4, 4
RECOVERED = 0.85


def _zero_router(layer: MixtureOfExperts) -> None:
    nn.init.zeros_(layer.router.weight)


def _normal_router(std: float) -> Callable[[MixtureOfExperts], None]:
    def init(layer: MixtureOfExperts) -> None:
        nn.init.normal_(layer.router.weight, std=std)

    return init


def configurations(steps: int) -> list[tuple[str, dict[str, Any], Optional[Callable[[MixtureOfExperts], None]]]]:
    half, third = steps // 2, steps // 3
    return [
        ("before: k=1, balance 0.01", dict(k=1, balance_loss_weight=0.01), None),
        ("before: k=2, balance 0.01", dict(k=2, balance_loss_weight=0.01), None),
        ("after: k=1 (default balance 0.1)", dict(k=1), None),
        ("after: k=2 (default balance 0.1)", dict(k=2), None),
        ("k=1, router init zeros", dict(k=1), _zero_router),
        ("k=1, router init N(0, 0.01^2)", dict(k=1), _normal_router(0.01)),
        ("k=1, router init N(0, 1)", dict(k=1), _normal_router(1.0)),
        ("k=1, no gating noise", dict(k=1, noisy_gating=False), None),
        (f"k=1, warmup_k=2 for {third} steps", dict(k=1, warmup_k=2, warmup_steps=third), None),
        (f"k=1, warmup_k=2 for {half} steps", dict(k=1, warmup_k=2, warmup_steps=half), None),
        (f"k=1, warmup_k=2 for {half}, no noise", dict(k=1, warmup_k=2, warmup_steps=half, noisy_gating=False), None),
    ]


def _fit(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = F.mse_loss(layer(x[i]), y[i]) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def regime_run(seed: int, steps: int, kwargs: dict[str, Any],
               init: Optional[Callable[[MixtureOfExperts], None]]) -> tuple[float, float]:
    train = SignRegimes("train", n=4096, seed=seed, features=FEATURES, outputs=OUTPUTS)
    test = SignRegimes("test", n=2048, seed=seed, features=FEATURES, outputs=OUTPUTS)
    torch.manual_seed(seed)
    layer = MixtureOfExperts(FEATURES, OUTPUTS, EXPERTS, expert=lambda: nn.Linear(FEATURES, OUTPUTS),
                             noise_seed=seed, dispatch="grouped", **kwargs)
    if init is not None:
        with torch.no_grad():
            init(layer)
    _fit(layer, train.x, train.y, steps, batch=256, seed=seed)
    layer.eval()
    with torch.no_grad(), layer.recording():
        mse = F.mse_loss(layer(test.x), test.y).item()
        top1 = layer.last_routing.top1
    return normalized_mutual_info_score(test.regime.numpy(), top1.numpy()), mse / test.y.var().item()


def regimes_table(seeds: range, steps: int, only: Optional[str] = None) -> None:
    print(f"SignRegimes: {FEATURES} features, {OUTPUTS} outputs, E={EXPERTS} linear experts, {steps} steps; NMI of "
          f"top-1 expert vs true regime on the test split, seeds {seeds.start}-{seeds.stop - 1}")
    width = 5 * len(seeds)
    print(f"{'configuration':<38} {'NMI per seed':<{width}} {'mean':>5} {'min':>5} {'recovered':>9} {'rel MSE':>8}")
    for name, kwargs, init in configurations(steps):
        if only is not None and not any(part in name for part in only.split("|")):
            continue
        t = time.perf_counter()
        runs = [regime_run(seed, steps, kwargs, init) for seed in seeds]
        nmi = [r[0] for r in runs]
        recovered = sum(v >= RECOVERED for v in nmi)
        print(f"{name:<38} {' '.join(f'{v:.2f}' for v in nmi):<{width}} {statistics.mean(nmi):>5.3f} "
              f"{min(nmi):>5.2f} {recovered:>6}/{len(seeds):<2} {statistics.mean(r[1] for r in runs):>8.3f}"
              f"   ({time.perf_counter() - t:.0f} s)", flush=True)


def _offset_task(n: int, gen: torch.Generator, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.randn(n, 8, generator=gen) + offset
    return u, torch.sin(u[:, :2].sum(1, keepdim=True)) + 0.5 * u[:, 2:3]


def balance_run(weight: float, seed: int, steps: int, offset: float) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(seed)
    x, y = _offset_task(2048, gen, offset)
    x_test, y_test = _offset_task(1024, gen, offset)
    torch.manual_seed(seed)
    layer = MixtureOfExperts(8, 1, num_experts=8, k=2, hidden_features=32, noisy_gating=False,
                             balance_loss_weight=weight, dispatch="grouped")
    _fit(layer, x, y, steps, batch=128, seed=seed)
    layer.eval()
    with torch.no_grad(), layer.recording():
        mse = F.mse_loss(layer(x_test), y_test).item()
        stats = routing_statistics(layer.last_routing.experts, 8)
    return stats.load_cv, stats.max_top1_share, mse / y_test.var().item()


def balance_table(seeds: int, steps: int) -> None:
    print(f"\nNo regimes: E=8, k=2, no gating noise, {steps} steps, seeds 0-{seeds - 1}; load CV (0 = balanced, "
          f"sqrt(E-1) = 2.65 = one expert), largest top-1 share (1/E = 0.125 balanced)")
    print(f"{'input mean':>10} {'weight':>7} {'load CV per seed':<{5 * seeds}} {'mean':>5} {'max':>5}  "
          f"{'top-1 share per seed':<{5 * seeds}} {'max':>5} {'rel MSE':>8}")
    for offset in (1.0, 3.0):
        for weight in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
            runs = [balance_run(weight, seed, steps, offset) for seed in range(seeds)]
            cv, share = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{offset:>10.0f} {weight:>7g} {' '.join(f'{v:.2f}' for v in cv):<{5 * seeds}} "
                  f"{statistics.mean(cv):>5.2f} {max(cv):>5.2f}  {' '.join(f'{v:.2f}' for v in share):<{5 * seeds}} "
                  f"{max(share):>5.2f} {statistics.mean(r[2] for r in runs):>8.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--only", help="run the configurations whose name contains one of these '|'-separated parts")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--balance", action="store_true", help="also run the balance-weight collapse sweep")
    parser.add_argument("--balance-only", action="store_true", help="only run the balance-weight collapse sweep")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.balance_only:
        regimes_table(range(args.first_seed, args.first_seed + args.seeds), args.steps, args.only)
    if args.balance or args.balance_only:
        balance_table(min(args.seeds, 5), steps=500)


if __name__ == "__main__":
    main()
