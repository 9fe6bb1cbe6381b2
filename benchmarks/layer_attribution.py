"""Layer Integrated Gradients on a small HuggingFace BERT (dict inputs): our time against Captum's
``LayerIntegratedGradients`` at the same ``n_steps`` and rule, and the largest relative difference of the answers.

``vs Captum default`` = Captum's time / ours with Captum as called out of the box (all ``n_steps x batch`` rows in one
pass); ``vs Captum tuned`` = the same with ``internal_batch_size`` = batch (one step of the batch per pass). Above 1: we
are faster. Timings alternate the contenders within each repeat (machine load hits them alike); medians are printed.
Needs ``transformers`` and ``captum`` (the ``dev`` extra). Random weights, no download.

Run: ``python benchmarks/layer_attribution.py [--threads 2] [--repeats 5] [--batch 8] [--tokens 32] [--steps 32]``
(well under a minute on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_lens.attribution import IntegratedGradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, num_labels=2, attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (args.batch, args.tokens), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, args.tokens // 2 :] = 0
    target = torch.zeros(args.batch, dtype=torch.long)
    layer = model.bert.embeddings.word_embeddings

    ours_method = IntegratedGradients(model, layer=layer, n_steps=args.steps)
    lig = LayerIntegratedGradients(lambda i, m: model(input_ids=i, attention_mask=m).logits, layer)

    def ours() -> torch.Tensor:
        return ours_method.attribute({"input_ids": ids, "attention_mask": mask}, target=target)

    def captum(internal: int | None) -> torch.Tensor:
        return lig.attribute(ids, baselines=torch.zeros_like(ids), additional_forward_args=(mask,), target=target,
                             n_steps=args.steps, method="gausslegendre", internal_batch_size=internal)

    contenders = {"ours": ours, "captum default": lambda: captum(None), "captum tuned": lambda: captum(args.batch)}
    results = {name: fn() for name, fn in contenders.items()}  # warm-up, and the answers
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = results["captum default"]
    print(f"layer IG, BERT hidden 64 x 2 layers, batch {args.batch} x {args.tokens} tokens, n_steps {args.steps}")
    for name in contenders:
        print(f"  {name:15s} {med[name] * 1e3:8.1f} ms")
    print(f"  vs Captum default {med['captum default'] / med['ours']:.2f}x, vs Captum tuned"
          f" {med['captum tuned'] / med['ours']:.2f}x")
    print(f"  max relative difference to Captum: {float((results['ours'] - ref).abs().max() / ref.abs().max()):.2e}")


if __name__ == "__main__":
    main()
