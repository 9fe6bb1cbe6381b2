"""SaliencyMapCallback under DDP (gloo, 2 CPU processes): ``python saliency_ddp_script.py --out DIR``.

Lightning relaunches this file for rank 1. Each rank writes ``DIR/rank<r>.json`` with its probes and the methods it
computed; rank 0's TensorBoard logs go to ``DIR/tb``.
"""

from __future__ import annotations

import argparse
import json
import os

from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    seed_everything(0)
    train = Subset(SpuriousDigits("train", seed=0), range(64))
    val = Subset(SpuriousDigits("val", seed=0), range(64))
    cb = SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=6)
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(LitClassifier(model=SmallCNN(width=8)), DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    result = {
        "rank": trainer.global_rank,
        "probe_indices": cb.probes.indices.tolist(),
        "computed": sorted(cb.last_attributions),
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
