"""A concept bottleneck model (Koh et al. 2020) on handwritten digits, with interventions and a leakage check.

SevenSegmentDigits: scikit-learn's bundled 8x8 digits (nothing downloads) whose concepts are the seven segments
a-g lit when the digit is drawn on a seven-segment display. The model predicts the seven segments from the pixels and
then the digit from the segments only. ``ConceptMonitor`` logs every validation epoch, to TensorBoard:

- Scalars ``concepts/<segment>/acc`` and ``.../auroc``, ``concepts/task_acc``;
- ``concepts/intervention/{random,uncertainty}/<k>``: task accuracy after replacing k predicted segments by the true
  ones (random order vs. the segments the model is least sure about first), and the figure
  ``concepts/intervention_curve`` (Images tab);
- ``concepts/leakage``: how much better a probe predicts the digit from the soft segment probabilities than from the
  thresholded 0/1 segments (positive = the probabilities carry information the concepts do not name);
- the table ``concepts/per_concept`` (Text tab).

Run:  python examples/concept_bottleneck.py        (well under a minute on a laptop CPU)
      python examples/concept_bottleneck.py --training sequential --bottleneck logit
Then: tensorboard --logdir lens_logs
"""

from __future__ import annotations

import argparse
import os

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_lens._pl import Trainer, pl
from lightning_lens.callbacks import ConceptMonitor
from lightning_lens.datasets import SevenSegmentDigits
from lightning_lens.interpretable_models import ConceptBottleneckModule


def encoder(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--training", choices=["joint", "sequential", "independent"], default="joint")
    parser.add_argument("--bottleneck", choices=["soft", "logit", "hard"], default="soft")
    parser.add_argument("--concept-loss-weight", type=float, default=1.0)
    parser.add_argument("--logdir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    torch.set_num_threads(1)  # a model this small runs fastest on one intra-op thread
    train_ds, val_ds, test_ds = (SevenSegmentDigits(s, seed=args.seed) for s in ("train", "val", "test"))
    train = DataLoader(train_ds, batch_size=64, shuffle=True)
    val = DataLoader(val_ds, batch_size=256)

    module = ConceptBottleneckModule(
        concept_encoder=encoder(), num_concepts=7, num_classes=10, bottleneck=args.bottleneck,
        concept_names=train_ds.concept_names, training=args.training, concept_loss_weight=args.concept_loss_weight,
        concept_epochs=args.epochs // 2 if args.training == "sequential" else None,
        lr=3e-3,  # the linear segments -> digit head needs large weights; 1e-3 takes about twice the epochs
    )
    monitor = ConceptMonitor(num_random_orders=5)
    logger = TensorBoardLogger(args.logdir, name=f"concept_bottleneck_{args.training}_{args.bottleneck}")
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=10, default_root_dir=args.logdir)
    trainer.fit(module, train, val)

    model = module.model.eval()
    if args.bottleneck == "logit":  # exact 5th/95th percentiles of the training logits for interventions
        model.calibrate_intervention_values(DataLoader(train_ds, batch_size=256))
    with torch.no_grad():
        out = model(test_ds.images)
        fixed = model(test_ds.images, intervene="all", concept_values=test_ds.concepts)
    concept_acc = ((out.concept_logits >= 0) == (test_ds.concepts > 0.5)).float().mean(0)
    print("\ntest set")
    print("  segment accuracy:", "  ".join(f"{n}={a:.3f}" for n, a in zip(test_ds.concept_names, concept_acc.tolist())))
    task_acc = (out.task_logits.argmax(1) == test_ds.labels).float().mean()
    print(f"  digit accuracy from predicted segments: {task_acc:.3f}")
    print(f"  digit accuracy after intervening on all 7 segments: "
          f"{(fixed.task_logits.argmax(1) == test_ds.labels).float().mean():.3f}")

    m = monitor.last_metrics
    print("validation intervention curve (task accuracy vs. segments corrected):")
    for policy in ("random", "uncertainty"):
        print(f"  {policy:11s}", " ".join(f"{m[f'concepts/intervention/{policy}/{k}']:.3f}" for k in range(8)))
    if "concepts/leakage" in m:
        print(f"leakage: probe accuracy from soft segments {m['concepts/leakage/soft_acc']:.3f} vs. hard "
              f"{m['concepts/leakage/hard_acc']:.3f} (gap {m['concepts/leakage']:+.3f})")

    # one mistake, explained and corrected: show the segments, then fix the one the model is least sure about
    wrong = (out.task_logits.argmax(1) != test_ds.labels).nonzero().flatten()
    if len(wrong):
        i = int(wrong[0])
        probs = out.concept_probs[i]
        print(f"\ntest image {i}: true digit {int(test_ds.labels[i])}, predicted {int(out.task_logits[i].argmax())}")
        print("  P(segment lit):", "  ".join(f"{n}={p:.2f}" for n, p in zip(test_ds.concept_names, probs.tolist())),
              "\n  true segments: ", "  ".join(f"{n}={int(c)}   " for n, c in
                                              zip(test_ds.concept_names, test_ds.concepts[i].tolist())))
        j = int((probs - 0.5).abs().argmin())
        with torch.no_grad():
            corrected = model(test_ds.images[i:i + 1], intervene=[j], concept_values=test_ds.concepts[i:i + 1])
        print(f"  setting segment {test_ds.concept_names[j]} to its true value "
              f"{int(test_ds.concepts[i, j])} -> predicted {int(corrected.task_logits.argmax())}")

    print(f"\nlogs: {os.path.abspath(logger.log_dir)}\nview: tensorboard --logdir {os.path.abspath(args.logdir)}")


if __name__ == "__main__":
    main()
