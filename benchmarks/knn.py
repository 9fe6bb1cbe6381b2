"""Query latency of KNNHead's search on a 100k x 128 memory: exact chunked torch search vs FAISS flat search.

Run: .venv/bin/python benchmarks/knn.py
"""

import statistics
import time

import torch

from lightning_lens.interpretable_models import KNNHead

MEMORY, DIM, K = 100_000, 128, 10


def timed(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    head = KNNHead(DIM, 10, k=K, memory_size=MEMORY, refresh="reencode").eval()
    head.write(torch.randn(MEMORY, DIM, generator=gen), torch.randint(0, 10, (MEMORY,), generator=gen),
               torch.arange(MEMORY))
    print(f"memory {MEMORY} x {DIM}, k={K}, torch threads={torch.get_num_threads()}")
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


if __name__ == "__main__":
    main()
