"""NeighborGallery under DDP (2 CPU processes, gloo) vs one process: run by tests/callbacks/test_neighbor_gallery.py.

Validates a fixed kNN model (untrained encoder, memory holding the training set) on 269 digits (odd, so the
DistributedSampler repeats one sample) in ``(image, label)`` batches without dataset indices, and writes rank zero's
metrics and the probes' neighbours to ``--out`` as JSON (rank one writes what it holds: nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_lens.callbacks import NeighborGallery
from lightning_lens.utils import ProbeSet

# the data sets and the DDP scaffolding live in tests/_data.py, tests/_knn.py and tests/_ddp.py; tests/ is on
# sys.path under pytest, not in this subprocess
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _ddp  # noqa: E402
from _data import DigitsSplit  # noqa: E402
from _knn import IndexedDigits, LitKNN  # noqa: E402

NUM_VAL = 269


def run_validate(devices: int, root: str) -> dict:
    torch.set_num_threads(1)
    digits = DigitsSplit()
    train = IndexedDigits(digits.x[digits.train], digits.y[digits.train])
    val_x, val_y = digits.x[digits.cal][:NUM_VAL], digits.y[digits.cal][:NUM_VAL]  # 270 calibration digits
    val = IndexedDigits(val_x, val_y, with_index=False)
    model = LitKNN(len(train), seed=0).eval()
    with torch.no_grad():
        model.net.head.write(model.net.encoder(train.x.view(-1, 1, 8, 8)), train.y, torch.arange(len(train)))
    probes = ProbeSet(inputs=val_x[:4].view(-1, 1, 8, 8), targets=val_y[:4], indices=torch.arange(4))
    gallery = NeighborGallery(k=3, train_dataset=train, probes=probes, max_overhead=None, strict=True)
    trainer = _ddp.trainer(devices, root, [gallery])
    trainer.validate(model, DataLoader(val, batch_size=32), verbose=False)
    return {
        "rank": trainer.global_rank,
        "metrics": {k: round(v, 6) for k, v in gallery.last_metrics.items()},
        "neighbors": None if gallery.last_neighbors is None else gallery.last_neighbors.indices.tolist(),
    }


def main() -> None:
    args = _ddp.script_arguments().parse_args()
    _ddp.write_result(args.out, run_validate(args.devices, args.root))


if __name__ == "__main__":
    main()
