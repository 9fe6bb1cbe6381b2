"""KNNHead: search latency (exact torch vs FAISS), FAISS index freshness, and DkNN credibility as an out-of-distribution
detector on scikit-learn digits (one layer vs several layers, Papernot & McDaniel 2018).

1. Query latency on a 100k x 128 memory: exact chunked torch search vs FAISS flat search, with FAISS's recall@k.
2. FAISS after ``load_state_dict`` (a checkpoint resume) and leave-one-out with an id stored three times in a queue:
   FAISS against exact search.
3. Credibility AUROC, digits (in) against uniform noise and shuffled-pixel digits (out): an MLP encoder
   (64 -> 256 -> 64) trained through a KNNHead (k=10, temperature 0.1, in-place memory, leave-one-out, 12 epochs) on
   70% of digits, calibrated on 15%, tested on 15% (270 digits, 270 noise images, 270 shuffled digits; 5 seeds).
   Credibility from the embedding only (what ``KNNHead.explain`` gives) and from DkNN over several layers
   (``DeepKNN``: neighbours counted in pixels, the hidden ReLU layer and the embedding, nonconformity summed).
   AUROC by ``sklearn.metrics.roc_auc_score`` (digits = positive class, scored by credibility).

Run: .venv/bin/python benchmarks/knn.py
"""

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_lens.interpretable_models import DeepKNN, KNNClassifier, KNNHead
from lightning_lens.interpretable_models.dknn import layer_outputs

MEMORY, DIM, K = 100_000, 128, 10
SEEDS = (0, 1, 2, 3, 4)
CREDIBILITY_KS = (10, 30, 75)
# layer sets of the DkNN: names of layer_outputs' modules, "pixels" is the input itself
LAYER_SETS = {
    "embedding (KNNHead)": ("embedding",),
    "hidden + embedding": ("hidden", "embedding"),
    "pixels + hidden + embedding": ("pixels", "hidden", "embedding"),
    "pixels + embedding": ("pixels", "embedding"),
}


def timed(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency() -> bool:
    gen = torch.Generator().manual_seed(0)
    head = KNNHead(DIM, 10, k=K, memory_size=MEMORY, refresh="reencode").eval()
    head.write(torch.randn(MEMORY, DIM, generator=gen), torch.randint(0, 10, (MEMORY,), generator=gen),
               torch.arange(MEMORY))
    print(f"## 1. search latency: memory {MEMORY} x {DIM}, k={K}, torch threads={torch.get_num_threads()}")
    print(f"{'batch':>6} {'torch exact ms':>15} {'ms/query':>9} {'faiss flat ms':>14} {'ms/query':>9} "
          f"{'torch/faiss':>11} {'recall@k':>9}")
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
    for batch in (1, 32, 256, 1024):
        q = torch.randn(batch, DIM, generator=gen)
        head.backend = "torch"
        t_torch = timed(lambda: head.search(q))
        row = f"{batch:>6} {t_torch * 1e3:>15.2f} {t_torch * 1e3 / batch:>9.3f}"
        if has_faiss:
            head.backend = "faiss"
            head.search(q)  # builds the index once
            t_faiss = timed(lambda: head.search(q))
            head.backend = "torch"
            recall = head.faiss_recall(q)
            row += f" {t_faiss * 1e3:>14.2f} {t_faiss * 1e3 / batch:>9.3f} {t_torch / t_faiss:>11.2f} {recall:>9.3f}"
        else:
            row += "  (faiss not installed: pip install 'lightning-lens[faiss]')"
        print(row)
    head.backend = "torch"
    head.chunk_size = 8192
    q = torch.randn(256, DIM, generator=gen)
    print(f"torch exact, batch 256, chunk_size 8192 (bounded memory): {timed(lambda: head.search(q)) * 1e3:.2f} ms")
    return has_faiss


def faiss_freshness() -> None:
    print("\n## 2. FAISS index freshness")
    gen = torch.Generator().manual_seed(0)
    resumed = KNNHead(16, 10, k=10, memory_size=2000, refresh="reencode", backend="faiss").eval()
    resumed.write(torch.randn(2000, 16, generator=gen), torch.randint(0, 10, (2000,), generator=gen),
                  torch.arange(2000))
    checkpoint = KNNHead(16, 10, k=10, memory_size=2000, refresh="reencode").eval()
    checkpoint.write(torch.randn(2000, 16, generator=gen), torch.randint(0, 10, (2000,), generator=gen),
                     torch.arange(2000))
    q = torch.randn(256, 16, generator=gen)
    resumed.search(q)  # the index is built on the old memory
    resumed.load_state_dict(checkpoint.state_dict())
    print(f"faiss_recall after load_state_dict of another memory (2000 x 16, k=10): {resumed.faiss_recall(q):.3f}")
    queue = KNNHead(4, 2, k=3, memory_size=6, refresh="queue", backend="faiss").eval()
    keys = torch.eye(4)[[0, 0, 0, 1, 2, 3]] + 0.1 * torch.arange(6.0)[:, None]
    queue.enqueue(keys, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([7, 7, 7, 3, 4, 5]))
    query, exclude = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([7])
    _, faiss_pos = queue.search(query, exclude_ids=exclude)
    queue.backend = "torch"
    _, exact_pos = queue.search(query, exclude_ids=exclude)
    print(f"leave-one-out, id 7 stored 3 times in a queue of 6, k=3: faiss ids "
          f"{queue.memory_ids[faiss_pos[0]].tolist()}, exact ids {queue.memory_ids[exact_pos[0]].tolist()}")


def train_knn(x, y, seed):
    """The encoder of tests/interpretable_models (trained_knn fixture), seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    n = len(y)
    model = KNNClassifier(enc, KNNHead(64, 10, k=10, temperature=0.1, memory_size=n))
    ids = torch.arange(n)
    opt = torch.optim.Adam(enc.parameters(), 1e-3)
    with torch.no_grad():
        model.head.write(enc(x), y, ids)
    for _ in range(12):
        model.train()
        for b in torch.randperm(n, generator=gen).split(64):
            loss = F.nll_loss(model(x[b], labels=y[b], ids=ids[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model.head.write(enc(x), y, ids)
    return model


def representations(model, x):
    hidden, embedding = layer_outputs(model.encoder, x, ["1", "2"])
    return {"pixels": x, "hidden": hidden, "embedding": embedding}


def ood_auroc() -> None:
    print("\n## 3. credibility AUROC, digits against out-of-distribution inputs (mean ± sd over seeds "
          f"{', '.join(map(str, SEEDS))})")
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    results = {}  # (layer set, credibility k, ood set) -> [auroc per seed]
    accuracy, single_equal = [], True
    for seed in SEEDS:
        tr, rest = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=d.target)
        cal, te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=d.target[rest])
        model = train_knn(x[tr], y[tr], seed)
        gen = torch.Generator().manual_seed(1000 + seed)
        noise = torch.rand(len(te), 64, generator=gen)
        shuffled = torch.stack([row[torch.randperm(64, generator=gen)] for row in x[te]])
        with torch.no_grad():
            accuracy.append(float((model(x[te]).argmax(1) == y[te]).float().mean()))
        train_r, cal_r = representations(model, x[tr]), representations(model, x[cal])
        sets = {"digits": representations(model, x[te]), "uniform noise": representations(model, noise),
                "shuffled pixels": representations(model, shuffled)}
        for ck in CREDIBILITY_KS:
            for name, layers in LAYER_SETS.items():
                dknn = DeepKNN.from_layers([train_r[lay] for lay in layers], y[tr], num_classes=10, k=ck)
                scores = dknn.calibration_scores_for([cal_r[lay] for lay in layers], y[cal])
                cred = {s: dknn.explain([r[lay] for lay in layers], calibration_scores=scores).credibility
                        for s, r in sets.items()}
                if layers == ("embedding",):  # one layer: exactly the head's own DkNN credibility
                    model.head.credibility_k = ck
                    head_scores = model.head.calibration_scores_for(cal_r["embedding"], y[cal])
                    head_cred = model.head.explain(sets["digits"]["embedding"], calibration_scores=head_scores)
                    single_equal &= bool(torch.equal(head_cred.credibility, cred["digits"]))
                for ood in ("uniform noise", "shuffled pixels"):
                    score = torch.cat([cred["digits"], cred[ood]]).numpy()
                    truth = np.r_[np.ones(len(cred["digits"])), np.zeros(len(cred[ood]))]
                    results.setdefault((name, ck, ood), []).append(roc_auc_score(truth, score))
    print(f"kNN test accuracy per seed: {', '.join(f'{a:.3f}' for a in accuracy)}; one-layer DeepKNN credibility "
          f"equals KNNHead.explain's: {single_equal}")
    print(f"{'layers':<28} {'cred. k':>7} {'uniform noise':>15} {'shuffled pixels':>17}   per seed (noise | shuffled)")
    for ck in CREDIBILITY_KS:
        for name in LAYER_SETS:
            noise_a, shuf_a = results[(name, ck, "uniform noise")], results[(name, ck, "shuffled pixels")]
            print(f"{name:<28} {ck:>7} {statistics.mean(noise_a):>8.3f} ±{statistics.stdev(noise_a):.3f} "
                  f"{statistics.mean(shuf_a):>10.3f} ±{statistics.stdev(shuf_a):.3f}   "
                  f"{' '.join(f'{a:.2f}' for a in noise_a)} | {' '.join(f'{a:.2f}' for a in shuf_a)}")


def main() -> None:
    has_faiss = latency()
    if has_faiss:
        faiss_freshness()
    ood_auroc()


if __name__ == "__main__":
    main()
