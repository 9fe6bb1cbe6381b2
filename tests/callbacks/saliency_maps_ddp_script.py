"""SaliencyMapCallback under DDP (gloo, CPU processes): ``python saliency_maps_ddp_script.py --out OUT --root DIR
[--devices N] [--fail-denormalize]``.

Lightning relaunches this file for rank 1. Each rank writes ``OUT.rank<r>.json`` with its probes, the methods it
computed, the epochs it finished and the warnings it saw; rank 0's TensorBoard logs go to ``DIR/tb``. With
``--fail-denormalize`` the callback's ``denormalize`` raises on rank 0 only (a user callable failing on one rank).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from pytorch_lightning import seed_everything
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN

# tests/_ddp.py: tests/ is on sys.path under pytest (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402


def failing_on_rank_zero(x: torch.Tensor) -> torch.Tensor:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        raise RuntimeError("denormalize broke on rank 0")
    return x


def main() -> None:
    parser = _ddp.script_arguments()
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
    trainer = _ddp.trainer(args.devices, args.root, [cb], max_epochs=2, enable_checkpointing=False,
                           num_sanity_val_steps=0)
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
    _ddp.write_result(args.out, result)


if __name__ == "__main__":
    main()
