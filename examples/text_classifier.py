"""Text: a tiny transformer on SpuriousText, with token attribution maps in TensorBoard.

SpuriousText holds short generated reviews whose label is their sentiment. In 90% of the training sentences a
shortcut token (``zorp`` for negative, ``blick`` for positive) gives the label away; at validation it is placed at
random, so a model that learned it is misled there. SaliencyMapCallback explains the token embeddings (layer
Integrated Gradients, one score per token) of a fixed set of validation sentences every epoch: as training goes on the
shortcut token lights up.

Run:
    python examples/text_classifier.py            # about a minute on two CPU cores
    python examples/text_classifier.py --fast     # seconds (CI)
    tensorboard --logdir lens_logs

In TensorBoard: Images -> ``saliency/integrated_gradients`` (one row per probe: label, prediction and its tokens on a
red (for the class) / blue (against) background); the file loggers get the same maps as HTML.
"""

from __future__ import annotations

import argparse
import os

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousText
from lightning_lens.testing import LitClassifier, TinyTextTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--log-dir", default="lens_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few seconds: small data, one epoch (for CI)")
    args = parser.parse_args()

    seed_everything(args.seed)
    size = 200 if args.fast else 2000
    train = SpuriousText("train", seed=args.seed, size=size)
    val = SpuriousText("val", seed=args.seed, size=size // 4)
    saliency = SaliencyMapCallback(
        methods=["gradient_x_input", ("integrated_gradients", {"n_steps": 16}), "attention_rollout"],
        layer="model.token_embedding",  # token ids have no gradient: explain their embeddings
        tokenizer=train,  # decodes ids; [CLS] and padding are hidden
        num_probes=4 if args.fast else 8,
        target="prediction",
        max_overhead=None if args.fast else 0.05,
    )
    loggers = [TensorBoardLogger(args.log_dir, name="text_classifier", default_hp_metric=False),
               CSVLogger(args.log_dir, name="text_classifier_files")]
    trainer = Trainer(max_epochs=1 if args.fast else args.epochs, accelerator="cpu", devices=1, logger=loggers,
                      callbacks=[saliency], log_every_n_steps=5, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=not args.fast)
    model = TinyTextTransformer(len(train.vocabulary), train.num_classes, dim=32, heads=2, layers=1)
    trainer.fit(LitClassifier(model, num_classes=2, lr=3e-3),
                DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(args.seed)),
                DataLoader(val, batch_size=100))

    # how often the shortcut token carries the largest |score| among the probes that hold one
    probes, scores = saliency.probes, saliency.last_attributions["integrated_gradients"].abs()
    ids = probes.inputs["input_ids"]
    scores[(ids == train.pad_id) | (ids == train.cls_id)] = -1
    position = torch.as_tensor(val.metadata["shortcut_position"])[probes.indices]
    carries = position >= 0
    top = int((scores.argmax(dim=1)[carries] == position[carries]).sum())
    print(f"val/acc = {float(trainer.callback_metrics['val/acc']):.3f}; the shortcut token has the largest attribution"
          f" in {top} of the {int(carries.sum())} probes that carry one")
    print(f"Logs: {os.path.abspath(loggers[0].log_dir)} (TensorBoard), {os.path.abspath(loggers[1].log_dir)} (HTML)")


if __name__ == "__main__":
    main()
