"""kNN-retrieval classification head: every prediction comes with the training examples that made it.

The head keeps a memory of training embeddings, labels and dataset indices. A query is classified by the
similarity-weighted vote of its k nearest memory entries (cosine similarity, weights ``exp(sim / temperature)``, as in
InstDisc, Wu et al. 2018, and lightly's ``KNNClassifier``). The vote is differentiable with respect to the query, so
an encoder trains through the head; during training each example's own memory entry is left out, or training would
collapse to memorisation. Credibility follows Deep k-Nearest Neighbors (Papernot & McDaniel 2018): a nonconformity
score calibrated on held-out data.

While the memory is empty (before the first refresh, e.g. in Lightning's validation sanity pass) the head predicts
uniform class probabilities and warns once; an empty ``"in_place"`` memory is seeded with the first training batch,
whose examples then vote among each other. Rows with NaN or infinite embeddings are never written (they are counted in
:attr:`KNNHead.nonfinite_skipped`): one such key would turn every later vote into NaN.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.utils.checks import check_choice, check_float, check_int, check_positive_number

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


def _fit_calibration_scores(module: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Resize ``module.calibration_scores`` to the checkpoint's before loading it (before ``_load_from_state_dict``).

    The buffer has one entry per calibration example, so its length is the checkpoint's, not the constructor's.
    """
    scores = state_dict.get(prefix + "calibration_scores")
    if isinstance(scores, torch.Tensor) and scores.shape != module.calibration_scores.shape:
        module.calibration_scores = torch.empty_like(scores, device=module.calibration_scores.device)


def conformal_p_values(nonconformity: torch.Tensor, calibration_scores: torch.Tensor) -> torch.Tensor:
    """DkNN p-values (Papernot & McDaniel 2018): for each query and class, the fraction of calibration scores at least
    as large as the query's nonconformity for that class. ``nonconformity`` is ``(B, C)``; returns ``(B, C)``.

    Example:
        >>> conformal_p_values(torch.tensor([[0.0, 2.0, 3.0]]), torch.tensor([2.0, 0.0, 1.0, 2.0])).tolist()
        [[1.0, 0.5, 0.0]]
    """
    cal = torch.sort(calibration_scores.float().reshape(-1).to(nonconformity.device))[0]
    if cal.numel() == 0:
        raise ValueError("calibration_scores is empty: calibrate on held-out data first")
    below = torch.searchsorted(cal, nonconformity.float().contiguous(), right=False)
    return 1.0 - below.float() / cal.numel()


def conformal_prediction(p_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, credibility, confidence) from ``(B, C)`` p-values: the class of the largest p-value, that p-value,
    and one minus the second-largest (Papernot & McDaniel 2018).

    Example:
        >>> [t.tolist() for t in conformal_prediction(torch.tensor([[0.1, 0.8, 0.3]]))]
        [[1], [0.800000011920929], [0.699999988079071]]
    """
    top2 = p_values.topk(2, dim=1).values
    return p_values.argmax(1), top2[:, 0], 1.0 - top2[:, 1]  # argmax: ties go to the lowest class, as in NumPy


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
            ``faiss`` extra), rebuilt lazily by the first search after the memory changed in any way (writes,
            ``load_state_dict``, ``.to()``, in-place edits of the buffers). :meth:`faiss_recall` reports FAISS's
            recall@k against exact search.
        chunk_size: memory rows scored at once by the exact search (bounds memory use).
        credibility_k: neighbours counted by the DkNN nonconformity behind credibility (more than ``k`` separates
            out-of-distribution inputs better; the paper used 75). This is DkNN on one layer; counting neighbours in
            several layers (:class:`~lightning_lens.interpretable_models.DeepKNN`) separates them better still
            (benchmarks/knn.py).

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
        check_int(embedding_dim, "embedding_dim", minimum=1)
        check_int(num_classes, "num_classes", minimum=2)
        check_int(k, "k", minimum=1)
        temperature = check_positive_number(temperature, "temperature")
        check_choice(refresh, "refresh", ("reencode", "in_place", "queue"))
        check_choice(backend, "backend", ("torch", "faiss"))
        if memory_size is None or check_int(memory_size, "memory_size") < k:
            raise ValueError(
                f"memory_size must be given and >= k={k} (the training set size for refresh={refresh!r}, "
                f"or the queue length for 'queue'), got {memory_size}"
            )
        check_int(chunk_size, "chunk_size", minimum=1)
        check_int(credibility_k, "credibility_k", minimum=1)
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
        self._faiss_index: Any = None  # built lazily by the first FAISS search after the memory changed
        self._faiss_state: tuple[int, ...] = ()
        self._version = 0  # bumped by every change of the memory (write, enqueue, clear, load, move)
        #: rows :meth:`write` / :meth:`enqueue` refused because their embedding held NaN or inf (not saved)
        self.nonfinite_skipped = 0
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=stacklevel)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool, missing_keys: list,
        unexpected_keys: list, error_msgs: list,
    ) -> None:
        _fit_calibration_scores(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._version += 1  # the memory changed: a FAISS index built before (e.g. before a resume) is stale

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> KNNHead:
        # .to() / .double() / .cuda() replace the buffers: rebuild the FAISS index from the new ones
        out = super()._apply(fn, *args, **kwargs)
        self._version += 1
        return out

    def _memory_state(self) -> tuple[int, ...]:
        """Changes whenever the memory may have: writes, loading and moving (``_version``), and any in-place edit of
        the buffers made elsewhere (their tensors' version counters)."""
        state = [self._version]
        for t in (self.memory_keys, self.memory_labels, self.memory_ids):
            state.append(t.data_ptr())
            try:
                state.append(t._version)
            except RuntimeError:  # inference tensors keep no version counter; _version above still covers our writes
                state.append(-1)
        return tuple(state)

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
        """Store entries at memory rows ``ids`` (dataset indices). Used by ``"reencode"`` and ``"in_place"``.

        Rows whose embedding holds NaN or inf are skipped (their memory rows keep what they held) and counted in
        :attr:`nonfinite_skipped`, with one warning.
        """
        emb, labels, ids = self._check_entries(embeddings, labels, ids)
        if ids.numel() == 0:
            return
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
        if n == 0:
            return
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
        emb = self._check_shape(embeddings, "embeddings").detach()
        labels = torch.as_tensor(labels, device=emb.device).long().reshape(-1)
        ids = torch.as_tensor(ids, device=emb.device).long().reshape(-1)
        if labels.shape[0] != emb.shape[0] or ids.shape[0] != emb.shape[0]:
            raise ValueError(
                f"labels and ids need one entry per embedding ({emb.shape[0]}), got {labels.shape[0]} and"
                f" {ids.shape[0]}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        finite = torch.isfinite(emb).all(dim=1)
        skipped = int((~finite).sum())
        if skipped:
            self.nonfinite_skipped += skipped
            self._warn_once(
                "nonfinite",
                f"KNNHead skipped {skipped} memory entries whose embedding holds NaN or inf (one such key would turn "
                "every later prediction into NaN); later ones are counted in KNNHead.nonfinite_skipped",
                RuntimeWarning,
                stacklevel=5,  # the caller of write / enqueue
            )
            emb, labels, ids = emb[finite], labels[finite], ids[finite]
        return F.normalize(emb, dim=1).to(self.memory_keys.dtype), labels, ids

    def _check_shape(self, x: torch.Tensor, argument: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{argument} must be a tensor of shape (batch, embedding_dim), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{argument} must have shape (batch, embedding_dim={self.embedding_dim}), got {tuple(x.shape)}"
            )
        return x

    def _normalize(self, x: torch.Tensor, argument: str) -> torch.Tensor:
        return F.normalize(self._check_shape(x, argument), dim=1)

    # ------------------------------------------------------------------------------------------------------- search
    def search(
        self, embeddings: torch.Tensor, k: Optional[int] = None, exclude_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest memory rows: (cosine similarities, memory positions), each ``(B, k)``, without gradient.

        Slots without a neighbour (the memory holds fewer than ``k`` entries, or none) have similarity ``-inf`` and
        position ``-1``.
        """
        k = k or self.k
        with torch.no_grad():
            q = self._normalize(embeddings.detach(), "embeddings").to(self.memory_keys.dtype)
            if self.backend == "faiss":
                if not bool(self.filled.any()):
                    sims = torch.full((q.shape[0], k), -math.inf, device=q.device, dtype=q.dtype)
                    return sims, torch.full((q.shape[0], k), -1, device=q.device, dtype=torch.long)
                return self._faiss_search(q, k, exclude_ids)
            return _exact_topk(q, self.memory_keys, k, self.filled, exclude_ids, self.memory_ids, self.chunk_size)

    def _faiss_search(
        self, q: torch.Tensor, k: int, exclude_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        state = self._memory_state()
        if self._faiss_index is None or self._faiss_state != state:
            rows = torch.nonzero(self.filled).squeeze(1)
            index = faiss.IndexFlatIP(self.embedding_dim)
            index.add(self.memory_keys[rows].float().cpu().numpy())
            ids = self.memory_ids[rows].cpu()
            self._faiss_index, self._faiss_rows, self._faiss_ids = index, rows.cpu(), ids
            self._faiss_id_counts = torch.unique(ids, return_counts=True)  # (sorted ids, multiplicity)
            self._faiss_state = state
        n_rows = int(self._faiss_rows.numel())
        extra = 0
        if exclude_ids is not None:
            exclude_ids = exclude_ids.cpu().long().reshape(-1)
            # leave-one-out drops every stored copy of the query's id (a queue can hold several): fetch that many more
            # candidates, so k valid ones remain whenever the memory has them
            unique, counts = self._faiss_id_counts
            at = torch.searchsorted(unique, exclude_ids).clamp_max(max(unique.numel() - 1, 0))
            hit = unique[at] == exclude_ids
            extra = int(torch.where(hit, counts[at], torch.zeros_like(counts[at])).max()) if hit.numel() else 0
        kk = min(k + extra, n_rows)
        sims, found = self._faiss_index.search(q.float().cpu().numpy(), kk)
        sims, found = torch.from_numpy(sims), torch.from_numpy(found).long()
        pos = torch.where(found >= 0, self._faiss_rows[found.clamp_min(0)], torch.full_like(found, -1))
        if exclude_ids is not None:
            same = self._faiss_ids[found.clamp_min(0)] == exclude_ids.unsqueeze(1)
            sims = sims.masked_fill(same | (found < 0), -math.inf)
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
        """Class probabilities ``(B, C)`` from the neighbours at ``positions``; differentiable w.r.t. ``embeddings``.

        A query without any neighbour (``positions`` all ``-1``) gets uniform probabilities.
        """
        q = self._normalize(embeddings, "embeddings")
        found = positions >= 0
        keys = self.memory_keys[positions.clamp_min(0)]  # (B, k, D), no grad (buffer)
        sims = torch.einsum("bd,bkd->bk", q, keys.to(q.dtype))
        weights = torch.exp((sims - 1.0) / self.temperature) * found  # shift by the max cosine (1) for stability
        labels = self.memory_labels[positions.clamp_min(0)].clamp_min(0)  # empty rows hold -1; their weight is 0
        votes = torch.zeros(q.shape[0], self.num_classes, device=q.device, dtype=q.dtype)
        votes = votes.scatter_add(1, labels, weights)
        total = votes.sum(1, keepdim=True)
        probs = votes / total.clamp_min(torch.finfo(q.dtype).tiny)
        return torch.where(total > 0, probs, torch.full_like(probs, 1.0 / self.num_classes))

    def forward(
        self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Log class probabilities ``(B, C)`` (use with ``F.nll_loss`` or ``cross_entropy``).

        In training mode pass the batch's ``ids`` (dataset indices): their own entries are left out of the vote,
        and with ``refresh="in_place"`` the batch's embeddings (and ``labels``) are written to memory afterwards
        (before the vote when the memory is still empty, so the first batch votes among itself). While the memory is
        empty otherwise, the prediction is uniform (a one-time warning says so).
        """
        if self.training and ids is None and self.refresh != "queue":
            raise ValueError(
                "in training mode pass ids= (the batch's dataset indices): each example's own memory entry must be "
                "left out of its vote, or the head learns to look itself up"
            )
        if self.training and self.refresh == "in_place" and labels is None:
            raise ValueError("refresh='in_place' writes the batch to memory: pass labels= in training mode")
        exclude = None if ids is None else torch.as_tensor(ids, device=embeddings.device).long()
        if not bool(self.filled.any()):
            if self.training and self.refresh == "in_place":
                self.write(embeddings, labels, exclude)  # seed the memory: each example votes among the others
            else:
                self._warn_once(
                    "empty",
                    "the kNN memory is empty, so KNNHead predicts uniform class probabilities (e.g. in Lightning's "
                    "validation sanity pass); fill it with the KNNMemoryRefresh callback or build_memory "
                    "('reencode'), training batches ('in_place') or enqueue ('queue')",
                )
        _, positions = self.search(embeddings, exclude_ids=exclude)
        probs = self.vote(embeddings, positions)
        if self.training:
            if self.refresh == "in_place":
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
    def calibration_scores_for(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sorted nonconformity scores of a held-out calibration set (Papernot & McDaniel 2018), without storing
        them: pass them to :meth:`explain` (``calibration_scores=``) or store them with :meth:`calibrate`.

        Example:
            >>> head = KNNHead(2, 2, k=1, memory_size=2, credibility_k=1)
            >>> head.write(torch.eye(2), torch.tensor([0, 1]), torch.arange(2))
            >>> head.calibration_scores_for(torch.eye(2), torch.tensor([0, 0])).tolist()  # the 2nd is mislabelled
            [0.0, 1.0]
        """
        if not bool(self.filled.any()):
            raise RuntimeError(
                "the kNN memory is empty, so there is nothing to calibrate against: fill it first (KNNMemoryRefresh "
                "callback or build_memory for 'reencode', training batches for 'in_place', enqueue for 'queue')"
            )
        labels = torch.as_tensor(labels, device=embeddings.device).long().reshape(-1)
        _, positions = self.search(embeddings, k=self.credibility_k)
        alpha = self.nonconformity(self.memory_labels[positions.clamp_min(0)], positions >= 0)
        scores = alpha.gather(1, labels.unsqueeze(1)).squeeze(1)
        return torch.sort(scores.float())[0]

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the nonconformity of a held-out calibration set in the head (saved in checkpoints), for credibility.
        Monitoring code should use :meth:`calibration_scores_for` instead, which leaves the model's state alone."""
        self.calibration_scores = self.calibration_scores_for(embeddings, labels)

    @torch.no_grad()
    def explain(
        self, embeddings: torch.Tensor, k: Optional[int] = None, calibration_scores: Optional[torch.Tensor] = None
    ) -> Neighbors:
        """The k nearest training entries of each query, with credibility when calibration scores are known
        (``calibration_scores``, else those stored by :meth:`calibrate`).

        Credibility is the empirical p-value of the predicted class's nonconformity among the calibration scores;
        confidence is one minus the second-largest class p-value.
        """
        sims, positions = self.search(embeddings, k=k)
        found = positions >= 0
        labels = torch.where(found, self.memory_labels[positions.clamp_min(0)], torch.full_like(positions, -1))
        ids = torch.where(found, self.memory_ids[positions.clamp_min(0)], torch.full_like(positions, -1))
        out = Neighbors(indices=ids, labels=labels, similarities=sims, positions=positions)
        cal = self.calibration_scores if calibration_scores is None else calibration_scores
        if cal.numel():
            _, cpos = self.search(embeddings, k=self.credibility_k)
            alpha = self.nonconformity(self.memory_labels[cpos.clamp_min(0)], cpos >= 0)  # (B, C)
            out.prediction, out.credibility, out.confidence = conformal_prediction(conformal_p_values(alpha, cal))
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
        self.momentum = check_float(momentum, "momentum", minimum=0.0, maximum=1.0, open_max=True)
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
