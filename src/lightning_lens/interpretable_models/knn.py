"""kNN-retrieval classification head: every prediction comes with the training examples that made it.

The head keeps a memory of training embeddings, labels and dataset indices. A query is classified by the
similarity-weighted vote of its k nearest memory entries (cosine similarity, weights ``exp(sim / temperature)``, as in
InstDisc, Wu et al. 2018, and lightly's ``KNNClassifier``). The vote is differentiable with respect to the query, so
an encoder trains through the head; during training each example's own memory entry is left out, or training would
collapse to memorisation. Credibility follows Deep k-Nearest Neighbors (Papernot & McDaniel 2018): a nonconformity
score calibrated on held-out data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

RefreshPolicy = Literal["reencode", "in_place", "queue"]
_FAISS_HINT = "FAISS search needs the faiss extra: pip install 'lightning-lens[faiss]'"


@dataclass
class Neighbors:
    """The k nearest memory entries of each query (all tensors ``(B, k)``; ``-1`` where the memory had fewer)."""

    indices: torch.Tensor  # dataset indices of the neighbours
    labels: torch.Tensor
    similarities: torch.Tensor
    positions: torch.Tensor  # rows of the memory
    credibility: Optional[torch.Tensor] = None  # (B,), when the head is calibrated
    confidence: Optional[torch.Tensor] = None  # (B,)
    prediction: Optional[torch.Tensor] = None  # (B,)


def _exact_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid: torch.Tensor,
    query_ids: Optional[torch.Tensor] = None,
    key_ids: Optional[torch.Tensor] = None,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of ``queries`` (B, D) against ``keys`` (M, D), scanning memory in chunks.

    Entries where ``valid`` is False, and entries whose id equals the query's id (leave-one-out), never match.
    Returns (similarities, positions), each (B, k), sorted descending; missing slots have -inf and -1.
    """
    b = queries.shape[0]
    best_sim = torch.full((b, k), -math.inf, device=queries.device, dtype=queries.dtype)
    best_pos = torch.full((b, k), -1, device=queries.device, dtype=torch.long)
    for start in range(0, keys.shape[0], chunk_size):
        stop = min(start + chunk_size, keys.shape[0])
        sims = queries @ keys[start:stop].T
        mask = ~valid[start:stop].unsqueeze(0)
        if query_ids is not None and key_ids is not None:
            mask = mask | (query_ids.unsqueeze(1) == key_ids[start:stop].unsqueeze(0))
        sims = sims.masked_fill(mask, -math.inf)
        kk = min(k, stop - start)
        s, p = sims.topk(kk, dim=1)
        merged_sim = torch.cat([best_sim, s], dim=1)
        merged_pos = torch.cat([best_pos, p + start], dim=1)
        best_sim, order = merged_sim.topk(k, dim=1)
        best_pos = merged_pos.gather(1, order)
    best_pos = best_pos.masked_fill(torch.isinf(best_sim), -1)
    return best_sim, best_pos


class KNNHead(nn.Module):
    """Classify embeddings by a similarity-weighted vote of their k nearest training embeddings.

    Args:
        embedding_dim: size ``D`` of the embeddings.
        num_classes: number of classes.
        k: neighbours that vote.
        temperature: vote weights are ``exp(cosine / temperature)``.
        memory_size: rows of the memory. For ``"reencode"`` and ``"in_place"`` the training set size (entries are
            addressed by dataset index); for ``"queue"`` the queue length (keep it below the dataset size minus a
            batch, MoCo's rule).
        refresh: how the memory follows the changing encoder: ``"reencode"`` (re-encode the training set every N
            epochs with :class:`~lightning_lens.callbacks.KNNMemoryRefresh` or :meth:`build_memory`),
            ``"in_place"`` (each training batch overwrites its own entries after the forward pass) or ``"queue"``
            (a FIFO of keys from a momentum encoder, :class:`MomentumEncoder`; call :meth:`enqueue`).
        backend: ``"torch"`` (exact, chunked; default) or ``"faiss"`` (exact flat inner-product index; the
            ``faiss`` extra). :meth:`faiss_recall` reports FAISS's recall@k against exact search.
        chunk_size: memory rows scored at once by the exact search (bounds memory use).
        credibility_k: neighbours counted by the DkNN nonconformity behind credibility (more than ``k`` separates
            out-of-distribution inputs better; the paper used 75).

    Example:
        >>> head = KNNHead(embedding_dim=4, num_classes=2, k=2, memory_size=4).eval()
        >>> head.write(torch.eye(4), torch.tensor([0, 0, 1, 1]), torch.arange(4))
        >>> head(torch.tensor([[1.0, 0.1, 0.0, 0.0]])).argmax(1).tolist()
        [0]

    The memory's state is visible: :attr:`memory_age` (optimizer steps since each entry was written),
    :meth:`memory_summary`. Memory is stored in buffers, so it is saved in checkpoints.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        k: int = 10,
        temperature: float = 0.07,
        memory_size: Optional[int] = None,
        refresh: RefreshPolicy = "in_place",
        backend: Literal["torch", "faiss"] = "torch",
        chunk_size: int = 65536,
        credibility_k: int = 30,
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise ValueError(f"embedding_dim must be >= 1 and num_classes >= 2, got {embedding_dim}, {num_classes}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if refresh not in ("reencode", "in_place", "queue"):
            raise ValueError(f"refresh must be 'reencode', 'in_place' or 'queue', got {refresh!r}")
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        if memory_size is None or memory_size < k:
            raise ValueError(
                f"memory_size must be given and >= k={k} (the training set size for refresh={refresh!r}, "
                f"or the queue length for 'queue'), got {memory_size}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if credibility_k < 1:
            raise ValueError(f"credibility_k must be >= 1, got {credibility_k}")
        if backend == "faiss":
            _import_faiss()
        self.embedding_dim, self.num_classes, self.k = embedding_dim, num_classes, k
        self.temperature, self.refresh, self.backend, self.chunk_size = temperature, refresh, backend, chunk_size
        self.credibility_k = credibility_k
        self.register_buffer("memory_keys", torch.zeros(memory_size, embedding_dim))
        self.register_buffer("memory_labels", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("memory_ids", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("memory_written_at", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("calibration_scores", torch.zeros(0))
        self._faiss_index: Any = None
        self._faiss_version = -1
        self._version = 0

    # ------------------------------------------------------------------------------------------------------- memory
    @property
    def memory_size(self) -> int:
        return int(self.memory_keys.shape[0])

    @property
    def filled(self) -> torch.Tensor:
        """Boolean mask of memory rows holding an entry."""
        return self.memory_labels >= 0

    @property
    def memory_age(self) -> torch.Tensor:
        """Per row, training steps since it was written (-1 for empty rows)."""
        return torch.where(self.filled, self.step - self.memory_written_at, torch.full_like(self.memory_written_at, -1))

    def memory_summary(self) -> dict[str, float]:
        """Refresh policy, fill rate and age of the memory, for logging."""
        age = self.memory_age[self.filled].float()
        return {
            "filled_fraction": float(self.filled.float().mean()),
            "mean_age_steps": float(age.mean()) if age.numel() else float("nan"),
            "max_age_steps": float(age.max()) if age.numel() else float("nan"),
        }

    @torch.no_grad()
    def write(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Store entries at memory rows ``ids`` (dataset indices). Used by ``"reencode"`` and ``"in_place"``."""
        emb, labels, ids = self._check_entries(embeddings, labels, ids)
        if int(ids.min()) < 0 or int(ids.max()) >= self.memory_size:
            raise ValueError(
                f"ids must be dataset indices in [0, memory_size={self.memory_size}); got range "
                f"[{int(ids.min())}, {int(ids.max())}]: set memory_size to the training set size"
            )
        self.memory_keys[ids] = emb
        self.memory_labels[ids] = labels
        self.memory_ids[ids] = ids
        self.memory_written_at[ids] = self.step
        self._version += 1

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Push keys (from a momentum encoder) into the FIFO queue, overwriting the oldest (``"queue"`` policy)."""
        if self.refresh != "queue":
            raise RuntimeError(f"enqueue is for refresh='queue'; this head uses refresh={self.refresh!r} (use write)")
        emb, labels, ids = self._check_entries(embeddings, labels, ids)
        n = emb.shape[0]
        if n > self.memory_size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of memory_size={self.memory_size}")
        rows = (int(self.queue_pointer) + torch.arange(n, device=emb.device)) % self.memory_size
        self.memory_keys[rows] = emb
        self.memory_labels[rows] = labels
        self.memory_ids[rows] = ids
        self.memory_written_at[rows] = self.step
        self.queue_pointer.fill_((int(self.queue_pointer) + n) % self.memory_size)
        self._version += 1

    def clear(self) -> None:
        """Empty the memory."""
        self.memory_labels.fill_(-1)
        self.memory_ids.fill_(-1)
        self.memory_written_at.fill_(-1)
        self.queue_pointer.zero_()
        self._version += 1

    @torch.no_grad()
    def build_memory(
        self,
        encode: Callable[[Any], torch.Tensor],
        batches: Iterable[tuple[Any, torch.Tensor, torch.Tensor]],
    ) -> None:
        """Re-encode a training set: ``batches`` yields ``(inputs, labels, ids)`` and ``encode(inputs)`` embeds."""
        if self.refresh == "queue":
            raise RuntimeError("build_memory re-encodes by dataset index; refresh='queue' fills with enqueue")
        for inputs, labels, ids in batches:
            self.write(encode(inputs), labels, ids)

    def _check_entries(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = self._normalize(embeddings, "embeddings").detach()
        labels = torch.as_tensor(labels, device=emb.device).long().reshape(-1)
        ids = torch.as_tensor(ids, device=emb.device).long().reshape(-1)
        if labels.shape[0] != emb.shape[0] or ids.shape[0] != emb.shape[0]:
            raise ValueError(
                f"labels and ids need one entry per embedding ({emb.shape[0]}), got {labels.shape[0]} and {ids.shape[0]}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return emb.to(self.memory_keys.dtype), labels, ids

    def _normalize(self, x: torch.Tensor, argument: str) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{argument} must have shape (batch, embedding_dim={self.embedding_dim}), got {tuple(x.shape)}"
            )
        return F.normalize(x, dim=1)

    # ------------------------------------------------------------------------------------------------------- search
    def search(
        self, embeddings: torch.Tensor, k: Optional[int] = None, exclude_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest memory rows: (cosine similarities, memory positions), each ``(B, k)``, without gradient."""
        k = k or self.k
        with torch.no_grad():
            q = self._normalize(embeddings.detach(), "embeddings").to(self.memory_keys.dtype)
            if int(self.filled.sum()) == 0:
                raise RuntimeError(
                    "the kNN memory is empty: fill it first (KNNMemoryRefresh callback or build_memory for "
                    "'reencode', training batches for 'in_place', enqueue for 'queue')"
                )
            if self.backend == "faiss":
                return self._faiss_search(q, k, exclude_ids)
            return _exact_topk(q, self.memory_keys, k, self.filled, exclude_ids, self.memory_ids, self.chunk_size)

    def _faiss_search(
        self, q: torch.Tensor, k: int, exclude_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        if self._faiss_index is None or self._faiss_version != self._version:
            rows = torch.nonzero(self.filled).squeeze(1)
            index = faiss.IndexFlatIP(self.embedding_dim)
            index.add(self.memory_keys[rows].float().cpu().numpy())
            self._faiss_index, self._faiss_rows, self._faiss_version = index, rows.cpu(), self._version
        extra = 1 if exclude_ids is not None else 0
        kk = min(k + extra, int(self._faiss_rows.numel()))
        sims, found = self._faiss_index.search(q.float().cpu().numpy(), kk)
        sims, found = torch.from_numpy(sims), torch.from_numpy(found).long()
        pos = torch.where(found >= 0, self._faiss_rows[found.clamp_min(0)], torch.full_like(found, -1))
        if exclude_ids is not None:
            same = self.memory_ids.cpu()[pos.clamp_min(0)] == exclude_ids.cpu().unsqueeze(1)
            sims = sims.masked_fill(same | (pos < 0), -math.inf)
            sims, order = sims.topk(min(k, kk), dim=1)
            pos = pos.gather(1, order)
        if sims.shape[1] < k:
            pad = k - sims.shape[1]
            sims = torch.cat([sims, torch.full((sims.shape[0], pad), -math.inf)], 1)
            pos = torch.cat([pos, torch.full((pos.shape[0], pad), -1, dtype=torch.long)], 1)
        pos = pos.masked_fill(torch.isinf(sims), -1)
        return sims.to(q.device, q.dtype), pos.to(q.device)

    def faiss_recall(self, embeddings: torch.Tensor, k: Optional[int] = None) -> float:
        """Recall@k of the FAISS backend against exact torch search on these queries (1.0 = identical sets)."""
        k = k or self.k
        original = self.backend
        try:
            self.backend = "torch"
            _, exact = self.search(embeddings, k)
            self.backend = "faiss"
            _, approx = self.search(embeddings, k)
        finally:
            self.backend = original
        hits = [len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approx, exact)]
        total = int((exact >= 0).sum())
        return sum(hits) / max(total, 1)

    # ------------------------------------------------------------------------------------------------------ predict
    def vote(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C)`` from the neighbours at ``positions``; differentiable w.r.t. ``embeddings``."""
        q = self._normalize(embeddings, "embeddings")
        found = positions >= 0
        keys = self.memory_keys[positions.clamp_min(0)]  # (B, k, D), no grad (buffer)
        sims = torch.einsum("bd,bkd->bk", q, keys.to(q.dtype))
        weights = torch.exp((sims - 1.0) / self.temperature) * found  # shift by the max cosine (1) for stability
        labels = self.memory_labels[positions.clamp_min(0)]
        votes = torch.zeros(q.shape[0], self.num_classes, device=q.device, dtype=q.dtype)
        votes = votes.scatter_add(1, labels, weights)
        return votes / votes.sum(1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)

    def forward(
        self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Log class probabilities ``(B, C)`` (use with ``F.nll_loss`` or ``cross_entropy``).

        In training mode pass the batch's ``ids`` (dataset indices): their own entries are left out of the vote,
        and with ``refresh="in_place"`` the batch's embeddings (and ``labels``) are written to memory afterwards.
        """
        if self.training and ids is None and self.refresh != "queue":
            raise ValueError(
                "in training mode pass ids= (the batch's dataset indices): each example's own memory entry must be "
                "left out of its vote, or the head learns to look itself up"
            )
        exclude = None if ids is None else torch.as_tensor(ids, device=embeddings.device).long()
        _, positions = self.search(embeddings, exclude_ids=exclude)
        probs = self.vote(embeddings, positions)
        if self.training:
            if self.refresh == "in_place":
                if labels is None:
                    raise ValueError("refresh='in_place' writes the batch to memory: pass labels= in training mode")
                self.write(embeddings, labels, exclude)
            self.step += 1
        return torch.log(probs.clamp_min(1e-12))

    # ---------------------------------------------------------------------------------------------------- explain
    def nonconformity(self, neighbor_labels: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        """DkNN nonconformity for every class: neighbours whose label differs, ``(B, C)``."""
        counts = torch.zeros(neighbor_labels.shape[0], self.num_classes, device=neighbor_labels.device)
        counts.scatter_add_(1, neighbor_labels.clamp_min(0), found.float())
        return found.float().sum(1, keepdim=True) - counts

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the nonconformity of a held-out calibration set (Papernot & McDaniel 2018) for credibility."""
        labels = torch.as_tensor(labels, device=embeddings.device).long()
        _, positions = self.search(embeddings, k=self.credibility_k)
        alpha = self.nonconformity(self.memory_labels[positions.clamp_min(0)], positions >= 0)
        scores = alpha.gather(1, labels.unsqueeze(1)).squeeze(1)
        self.calibration_scores = torch.sort(scores.float())[0]

    @torch.no_grad()
    def explain(self, embeddings: torch.Tensor, k: Optional[int] = None) -> Neighbors:
        """The k nearest training entries of each query, with credibility when :meth:`calibrate` was called.

        Credibility is the empirical p-value of the predicted class's nonconformity among the calibration scores;
        confidence is one minus the second-largest class p-value.
        """
        sims, positions = self.search(embeddings, k=k)
        found = positions >= 0
        labels = torch.where(found, self.memory_labels[positions.clamp_min(0)], torch.full_like(positions, -1))
        ids = torch.where(found, self.memory_ids[positions.clamp_min(0)], torch.full_like(positions, -1))
        out = Neighbors(indices=ids, labels=labels, similarities=sims, positions=positions)
        if self.calibration_scores.numel():
            _, cpos = self.search(embeddings, k=self.credibility_k)
            alpha = self.nonconformity(self.memory_labels[cpos.clamp_min(0)], cpos >= 0)  # (B, C)
            cal = self.calibration_scores.to(alpha.device)
            # p_j = fraction of calibration scores >= alpha_j
            p = 1.0 - torch.searchsorted(cal, alpha.contiguous(), right=False).float() / cal.numel()
            top2 = p.topk(2, dim=1).values
            out.prediction = p.argmax(1)
            out.credibility = top2[:, 0]
            out.confidence = 1.0 - top2[:, 1]
        return out


class KNNClassifier(nn.Module):
    """An encoder followed by a :class:`KNNHead`: ``forward(x)`` gives log-probabilities, ``explain(x)`` neighbours.

    Example:
        >>> model = KNNClassifier(nn.Flatten(), KNNHead(4, 2, k=1, memory_size=2))
        >>> model.head.write(torch.eye(4)[:2], torch.tensor([0, 1]), torch.arange(2))
        >>> model.explain(torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])).labels.tolist()
        [[1]]
    """

    def __init__(self, encoder: nn.Module, head: KNNHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.head(self.encoder(x), labels=labels, ids=ids)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, k: Optional[int] = None) -> Neighbors:
        return self.head.explain(self.encoder(x), k=k)


class MomentumEncoder(nn.Module):
    """A slowly moving copy of an encoder for the ``"queue"`` policy (MoCo, He et al. 2020).

    After each optimizer step call :meth:`update`; its outputs are keys for :meth:`KNNHead.enqueue`.
    """

    def __init__(self, encoder: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        for p_k, p_q in zip(self.encoder.parameters(), encoder.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)
        for b_k, b_q in zip(self.encoder.buffers(), encoder.buffers()):
            b_k.copy_(b_q)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ModuleNotFoundError(_FAISS_HINT) from err
    return faiss
