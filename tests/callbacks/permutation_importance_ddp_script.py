"""The text and tabular paths under DDP (gloo, CPU processes): ``python permutation_importance_ddp_script.py --out OUT
--root DIR [--devices N] --task tabular|text``.

``tabular``: an MLP on LeakyTabular with PermutationImportanceMonitor (max_rows below the validation size, so the
fixed subset matters) and SaliencyMapCallback with feature names. ``text``: the tiny transformer on SpuriousText with
SaliencyMapCallback on the token embeddings. Lightning relaunches this file for rank 1; each rank writes
``OUT.rank<r>.json`` with what its callbacks hold (rank zero computes and logs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule, seed_everything
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_lens.callbacks import PermutationImportanceMonitor, SaliencyMapCallback
from lightning_lens.datasets import LeakyTabular, SpuriousText
from lightning_lens.testing import LitClassifier, TabularMLP, TinyTextTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402


class Loaders(LightningDataModule):
    """Unshuffled loaders; under DDP each rank reads every other sample (a DistributedSampler without shuffling, which
    Lightning's own would add to the training data), so 1 and 2 processes take the same steps."""

    def __init__(self, train, val, batch_size: int) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def _loader(self, data, batch_size: int) -> DataLoader:
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, shuffle=False) if ddp else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, 16)


def run(devices: int, root: str, task: str) -> dict:
    seed_everything(0)
    if task == "tabular":
        full = LeakyTabular("train", seed=0)
        train, val = Subset(full, range(320)), LeakyTabular("val", seed=0, eval_leak_mode="consistent")
        module = LitClassifier(TabularMLP(full.num_features, 2), num_classes=2, lr=1e-2)
        callbacks = [
            PermutationImportanceMonitor(feature_names=full.feature_names, max_rows=64, n_repeats=3, top_k=4,
                                         metric="neg_log_loss", max_overhead=None, strict=True),
            SaliencyMapCallback(methods=["gradient"], feature_names=full.feature_names, num_probes=4,
                                max_overhead=None, strict=True),
        ]
    else:
        train, val = SpuriousText("train", seed=0, size=128), SpuriousText("val", seed=0, size=40)
        module = LitClassifier(TinyTextTransformer(len(train.vocabulary), 2, dim=16), num_classes=2, lr=3e-3)
        callbacks = [SaliencyMapCallback(methods=["gradient_x_input"], layer="model.token_embedding", tokenizer=train,
                                         num_probes=4, max_overhead=None, strict=True)]
    trainer = _ddp.trainer(devices, root, callbacks, max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=0,
                           use_distributed_sampler=False)
    # no shuffling and a global batch of 32 (16 per rank under DDP): 1 and 2 processes take the same steps (up to
    # the order of the gradient sum), so the callbacks explain the same model
    trainer.fit(module, datamodule=Loaders(train, val, 32 // devices))
    saliency = next(cb for cb in callbacks if isinstance(cb, SaliencyMapCallback))
    result = {"rank": trainer.global_rank, "probe_indices": saliency.probes.indices.tolist(),
              "maps": {k: v.tolist() for k, v in saliency.last_attributions.items()},
              "state": {k: v.tolist() for k, v in trainer.lightning_module.state_dict().items()}}
    monitor = next((cb for cb in callbacks if isinstance(cb, PermutationImportanceMonitor)), None)
    if monitor is not None:
        res = monitor.last_result
        result.update({"rows": monitor.last_rows, "tracked": monitor.tracked,
                       "importance": None if res is None else res.importances.tolist()})
    return result


def main() -> None:
    parser = _ddp.script_arguments()
    parser.add_argument("--task", choices=("tabular", "text"), required=True)
    args = parser.parse_args()
    _ddp.write_result(args.out, run(args.devices, args.root, args.task))


if __name__ == "__main__":
    main()
