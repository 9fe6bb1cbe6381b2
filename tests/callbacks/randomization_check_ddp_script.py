"""RandomizationSanityCheck under DDP (gloo, CPU processes): ``python randomization_check_ddp_script.py --out OUT
--root DIR [--devices N] [--fail-on-rank-zero]``.

Lightning relaunches this file for rank 1. Each rank writes ``OUT.rank<r>.json`` with its probes, the methods of its
last report, the epochs it finished and the warnings it saw; rank 0's TensorBoard logs go to ``DIR/tb``. With
``--fail-on-rank-zero`` one method raises on rank 0 once the check randomizes the model (after the dry run at setup
passed): a method failing on one rank.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from pytorch_lightning import seed_everything
from torch.utils.data import DataLoader, Subset

from lightning_lens.attribution import Gradient
from lightning_lens.callbacks import RandomizationSanityCheck
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN

# tests/_ddp.py: tests/ is on sys.path under pytest (tests/conftest.py), not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402


class FailsOnRankZero(Gradient):
    """The gradient on every rank but 0, where every call after the first (the dry run) raises."""

    name = "fails_on_rank_zero"
    calls = 0

    def attribute(self, inputs, target=None, **kwargs):
        type(self).calls += 1
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and type(self).calls > 1:
            raise RuntimeError("the method broke on rank 0")
        return super().attribute(inputs, target, **kwargs)


def main() -> None:
    parser = _ddp.script_arguments()
    parser.add_argument("--fail-on-rank-zero", action="store_true")
    args = parser.parse_args()
    seed_everything(0)
    train = Subset(SpuriousDigits("train", seed=0), range(64))
    val = Subset(SpuriousDigits("val", seed=0), range(64))
    module = LitClassifier(model=SmallCNN(width=4))
    methods = ["gradient"] + ([FailsOnRankZero(module)] if args.fail_on_rank_zero else [])
    cb = RandomizationSanityCheck(methods=methods, num_probes=4, every_n_epochs=1, grid_probes=1, max_overhead=None)
    trainer = _ddp.trainer(args.devices, args.root, [cb], max_epochs=2, enable_checkpointing=False,
                           num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    result = {
        "rank": trainer.global_rank,
        "epochs": trainer.current_epoch,
        "probe_indices": cb.probes.indices.tolist(),
        "reported": None if cb.last_report is None else cb.last_report.methods,
        "warnings": [str(w.message) for w in caught if "RandomizationSanityCheck" in str(w.message)],
    }
    _ddp.write_result(args.out, result)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
