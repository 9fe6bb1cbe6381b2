"""SaliencyMapCallback under DDP (gloo, CPU processes): ``python saliency_maps_ddp_script.py --out DIR [--devices N]
[--fail-denormalize]``.

Lightning relaunches this file for rank 1. Each rank writes ``DIR/rank<r>.json`` with its probes, the methods it
computed, the epochs it finished and the warnings it saw; rank 0's TensorBoard logs go to ``DIR/tb``. With
``--fail-denormalize`` the callback's ``denormalize`` raises on rank 0 only (a user callable failing on one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


def failing_on_rank_zero(x: torch.Tensor) -> torch.Tensor:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        raise RuntimeError("denormalize broke on rank 0")
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--fail-denormalize", action="store_true")
    args = parser.parse_args()
    seed_everything(0)
    train = Subset(SpuriousDigits("train", seed=0), range(64))
    val = Subset(SpuriousDigits("val", seed=0), range(64))
    cb = SaliencyMapCallback(
        methods=["gradient", "gradcam"],
        num_probes=6,
        max_overhead=None,
        denormalize=failing_on_rank_zero if args.fail_denormalize else None,
    )
    trainer = Trainer(
        strategy="ddp" if args.devices > 1 else "auto",
        accelerator="cpu",
        devices=args.devices,
        max_epochs=2,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitClassifier(model=SmallCNN(width=8)), DataLoader(train, batch_size=16),
                    DataLoader(val, batch_size=16))
    result = {
        "rank": trainer.global_rank,
        "epochs": trainer.current_epoch,
        "probe_indices": cb.probes.indices.tolist(),
        "computed": sorted(cb.last_attributions),
        "warnings": [str(w.message) for w in caught if "SaliencyMapCallback" in str(w.message)],
        "disabled": sorted(cb.disabled),
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
