"""The cost of attention capture (issue 13): a model's plain forward / forward+backward against the same with
``capture_attention`` active, and one call of ``AttentionRollout`` / ``GradientAttentionRollout``.

Two models: ``TinyViT`` at 32 x 32 (65 tokens; ``nn.TransformerEncoder``, captured through MHA's SDPA call) and a
small HuggingFace BERT at its default SDPA attention (captured through ``F.scaled_dot_product_attention``). Ratios are
times / the plain forward (or forward+backward) of the same model; the contenders alternate within each repeat
(machine load hits them alike) and medians are printed. The plain no-grad forward may take torch's fused fast path,
which capture switches off. Random weights, no download (BERT needs ``transformers``).

Run: ``python benchmarks/attention.py [--threads 2] [--repeats 7] [--batch 16]`` (well under a minute on a quiet
machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from lightning_lens.attribution import AttentionRollout, GradientAttentionRollout
from lightning_lens.attribution._attention import capture_attention
from lightning_lens.testing.models import TinyViT


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_backward(model: torch.nn.Module, call: Callable[[], Any]) -> None:
    out = call()
    logits = out.logits if hasattr(out, "logits") else out
    torch.autograd.grad(logits[:, 0].sum(), [p for p in model.parameters() if p.requires_grad][:1])


def captured(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with capture_attention(requires_grad=True):
            return fn()

    return run


def bench(name: str, model: torch.nn.Module, call: Callable[[], Any], inputs: Any, repeats: int) -> None:
    def no_grad_forward() -> Any:
        with torch.no_grad():
            return call()

    contenders: dict[str, Callable[[], Any]] = {
        "forward (no grad)": no_grad_forward,
        "forward (no grad), capture": captured(no_grad_forward),
        "forward+backward": lambda: forward_backward(model, call),
        "forward+backward, capture": captured(lambda: forward_backward(model, call)),
        "AttentionRollout": lambda: AttentionRollout(model).attribute(inputs),
        "GradientAttentionRollout": lambda: GradientAttentionRollout(model).attribute(inputs, target=0),
    }
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for key, fn in contenders.items():
            times[key].append(timed(fn))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name}")
    print(f"  {'':<28} {'ms':>8} {'x no-grad fwd':>14} {'x fwd+bwd':>10}")
    for key, value in median.items():
        print(f"  {key:<28} {1000 * value:8.2f} {value / median['forward (no grad)']:14.2f}"
              f" {value / median['forward+backward']:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    vit = TinyViT(image_size=32, patch_size=4, num_classes=10, dim=64, heads=4, depth=4).eval()
    images = torch.rand(args.batch, 1, 32, 32)
    bench(f"TinyViT (dim 64, 4 blocks, 65 tokens), batch {args.batch}", vit, lambda: vit(images), images, args.repeats)

    try:
        import transformers
    except ImportError:
        print("\n(transformers not installed: BERT skipped)")
        return
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, num_labels=2)
    bert = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 1000, (args.batch, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 40:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    bench(f"BERT at SDPA (hidden 64, 4 layers, 64 tokens), batch {args.batch}", bert, lambda: bert(**batch), batch,
          args.repeats)


if __name__ == "__main__":
    main()
