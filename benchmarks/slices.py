"""Slice search speed against the ``sliceline`` package, and the bytes SubgroupErrorSlices moves between ranks.

**Speed** (default): 10k rows x 8 categorical attributes (cardinalities 2-8), one planted slice ``a2=1 & a5=3`` (~3%
of the rows) at ~45% error vs ~8% elsewhere. Both searches use SliceLine's score with alpha=0.95 and the same minimum
support; we time depth 2 and 3 (``max_l``) and report the top slice. ``sliceline`` only ranks by score; we also test
and correct, so our top slice must both score best and pass q <= 0.05. (Scaling to 10M rows: benchmarks/scaling.py.)

**Bytes under DDP** (``--ddp-bytes``): ``trainer.validate`` with 2 gloo CPU processes on ``--rows`` validation samples
(dict batches: a 1x4x4 image, the label, the index and 8 metadata attributes; with and without a 16-wide embedding
layer), run twice (the first run fits the binning and the PCA basis, the second reuses them), with the
collectives of ``torch.distributed`` wrapped to count the payload each rank contributes (tensor bytes for
``all_reduce``/``all_gather``/``broadcast`` from the source, pickled bytes for ``*_object`` collectives). With two
processes that is what each rank sends over the wire. Lightning's own collectives (``self.log(sync_dist=True)``) are
counted too and shown apart.

Run: ``python benchmarks/slices.py`` (add ``--repeats 5`` for steadier timings);
``python benchmarks/slices.py --ddp-bytes --rows 100000``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np

from lightning_lens.slices import SliceFinder

CARDINALITIES = (2, 3, 4, 5, 6, 8, 4, 3)
PLANTED = {"a2": 1, "a5": 3}


def make_data(n: int = 10_000, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    meta = {f"a{i}": rng.integers(0, c, n) for i, c in enumerate(CARDINALITIES)}
    planted = np.ones(n, dtype=bool)
    for k, v in PLANTED.items():
        planted &= meta[k] == v
    errors = (rng.random(n) < np.where(planted, 0.45, 0.08)).astype(np.int64)
    return meta, errors


def time_best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def speed(rows: int, repeats: int) -> None:
    meta, errors = make_data(rows)
    min_sup = max(30, int(np.ceil(0.005 * rows)))
    names = list(meta)
    X = np.stack([meta[k] for k in names], axis=1)
    planted = " & ".join(f"{k}={v}" for k, v in PLANTED.items())
    print(f"data: {rows} rows x {len(names)} categorical attributes, planted {planted}, "
          f"error rate {errors.mean():.3f}, min_support {min_sup}")

    try:
        from sliceline.slicefinder import Slicefinder
    except ImportError:
        Slicefinder = None
        print("sliceline is not installed: only our timings are shown (pip install sliceline)")

    for depth in (2, 3):
        finder = SliceFinder(max_depth=depth, min_support=min_sup, score_alpha=0.95)
        ours_t, ours = time_best(lambda: finder.find(errors, meta), repeats)
        top = ours[0].name if ours else "(none)"
        report = finder.last_report_
        line = (f"depth {depth}: lightning_lens {ours_t * 1e3:8.1f} ms  top: {top:<14} "
                f"(tested {report['n_tested']} candidates, {len(ours)} reported)")
        if Slicefinder is not None:
            def run_sliceline():
                sf = Slicefinder(alpha=0.95, k=1, max_l=depth, min_sup=min_sup, verbose=False)
                sf.fit(X, errors)
                return sf

            sl_t, sf = time_best(run_sliceline, repeats if depth == 2 else min(repeats, 2))
            sl_top = " & ".join(f"{names[j]}={int(v)}" for j, v in enumerate(sf.top_slices_[0]) if v is not None)
            ours_set = set(top.split(" & "))
            same = ours_set == set(sl_top.split(" & "))
            line += (f"\n         sliceline      {sl_t * 1e3:8.1f} ms  top: {sl_top:<14}  "
                     f"speed-up x{sl_t / ours_t:5.1f}, same top slice: {same}")
        print(line)


# ---------------------------------------------------------------------------------------------------- DDP bytes
def _count_collectives(counter: dict[str, int]) -> None:
    """Wrap torch.distributed's collectives to add each call's payload (bytes this rank contributes) to counter."""
    import torch.distributed as dist

    def nbytes(t: Any) -> int:
        return int(t.numel() * t.element_size())

    def wrap(name: str, size: Any) -> None:
        original = getattr(dist, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counter[name] += size(*args, **kwargs)
            counter[name + " calls"] += 1
            return original(*args, **kwargs)

        setattr(dist, name, wrapped)

    def is_src(src: int = 0, *_: Any, **__: Any) -> bool:
        return dist.get_rank() == src

    wrap("all_reduce", lambda tensor, *a, **k: nbytes(tensor))
    wrap("all_gather", lambda tensor_list, tensor, *a, **k: nbytes(tensor))
    wrap("all_gather_object", lambda object_list, obj, *a, **k: len(pickle.dumps(obj)))
    wrap("broadcast", lambda tensor, src=0, *a, **k: nbytes(tensor) if is_src(src) else 0)
    wrap("broadcast_object_list",
         lambda object_list, src=0, *a, **k: len(pickle.dumps(object_list)) if is_src(src) else 0)


def _ddp_worker(rows: int, out: str, depth: int, embedding: bool) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from lightning_lens._pl import LightningModule, Trainer
    from lightning_lens.callbacks import SubgroupErrorSlices

    counter: dict[str, int] = defaultdict(int)
    _count_collectives(counter)
    torch.set_num_threads(1)
    meta, errors = make_data(rows)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, rows)
    shown = np.where(errors == 1, (labels + 1) % 4, labels)
    images = rng.uniform(0, 0.2, (rows, 16)).astype(np.float32)
    images[np.arange(rows), shown] = 1.0
    images_t, labels_t = torch.from_numpy(images.reshape(rows, 1, 4, 4)), torch.from_numpy(labels)
    meta_t = {k: torch.from_numpy(v) for k, v in meta.items()}

    class Rows(Dataset):
        def __len__(self) -> int:
            return rows

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": images_t[i], "label": labels_t[i], "index": i, **{k: v[i] for k, v in meta_t.items()}}

    class Reader(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
            with torch.no_grad():
                self.net[1].weight.copy_(torch.eye(16))
                self.net[1].bias.zero_()
                self.net[3].weight.zero_()
                self.net[3].bias.zero_()
                self.net[3].weight[:, :4] = 10 * torch.eye(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            logits = self(batch["image"])
            loss = F.cross_entropy(logits, batch["label"])
            self.log("val/loss", loss, sync_dist=True)
            return {"loss": loss, "logits": logits}

    cb = SubgroupErrorSlices(max_depth=depth, embedding_layer="net.2" if embedding else None, num_images=0,
                             max_seconds=None, metadata_keys=list(meta))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    model, loader = Reader(), DataLoader(Rows(), batch_size=1000)
    runs = []
    for _ in range(2):  # the first run fits the binning and the PCA basis; the second reuses them (frozen)
        counter.clear()
        start = time.perf_counter()
        trainer.validate(model, loader)
        runs.append({"bytes": dict(counter), "seconds": time.perf_counter() - start})
    top = [s.name for s in cb.last_slices[:1]] if trainer.is_global_zero else []
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump({"rank": trainer.global_rank, "runs": runs, "top": top, "n_samples": cb.last_result.get("n_samples")},
                  f)


def ddp_bytes(rows: int, depth: int) -> None:
    for embedding in (True, False):
        _ddp_bytes(rows, depth, embedding)


def _ddp_bytes(rows: int, depth: int, embedding: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bytes")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ddp-worker", "--rows", str(rows),
                               "--depth", str(depth), "--out", out] + ([] if embedding else ["--no-embedding"]),
                              cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        ranks = [json.load(open(f"{out}.rank{r}")) for r in range(2)]
    print(f"SubgroupErrorSlices under DDP (2 gloo processes), trainer.validate on {rows} rows, depth {depth}, "
          f"{'with a 16-wide embedding layer' if embedding else 'metadata only'}: "
          f"n_samples {ranks[0]['n_samples']}, top slice {ranks[0]['top']}")
    for i, what in enumerate(("first validate (fits bins, PCA)", "second validate (frozen)")):
        print(f" {what}:")
        for r in ranks:
            run = r["runs"][i]
            ops = {k: v for k, v in run["bytes"].items() if not k.endswith("calls")}
            calls = {k[:-6]: v for k, v in run["bytes"].items() if k.endswith("calls")}
            detail = ", ".join(f"{k} {v / 1e6:.3f} MB in {calls[k]} calls" for k, v in sorted(ops.items()))
            print(f"  rank {r['rank']}: sends {sum(ops.values()) / 1e6:.3f} MB ({detail}); "
                  f"validate {run['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None, help="rows (default 10k; 100k with --ddp-bytes)")
    parser.add_argument("--ddp-bytes", action="store_true", help="measure the bytes each rank sends under DDP")
    parser.add_argument("--depth", type=int, default=3, help="max_depth of the DDP run")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-embedding", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        _ddp_worker(args.rows, args.out, args.depth, not args.no_embedding)
    elif args.ddp_bytes:
        ddp_bytes(args.rows or 100_000, args.depth)
    else:
        speed(args.rows or 10_000, args.repeats)


if __name__ == "__main__":
    main()
