"""``find_slices`` / :class:`SliceFinder`: search, test, correct, prune and rank error slices."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
from scipy import stats as sps

from lightning_lens.slices.binning import Binning, as_column
from lightning_lens.slices.embedding import PCABasis, cluster_embeddings, describe_clusters
from lightning_lens.slices.search import Candidates, enumerate_slices
from lightning_lens.slices.slice import Predicate, Slice
from lightning_lens.slices.stats import (
    adjust_pvalues,
    fisher_greater,
    g_test_greater,
    hypergeom_sf,
    welch_greater,
    wilson_interval,
)
from lightning_lens.utils.checks import check_choice

__all__ = ["SliceFinder", "default_min_support", "find_slices"]

_TESTS = ("auto", "fisher", "g", "welch")


def default_min_support(n: int) -> int:
    """``max(30, ceil(0.5% of n))``: the smallest slice worth reporting."""
    return max(30, int(math.ceil(0.005 * n)))


def _check_fraction(value: float, name: str, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0 if open_low
                                                                              else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")
    return float(value)


class SliceFinder:
    """Finds subgroups where a model errs significantly more than on the rest of the data.

    Keeps the metadata :class:`Binning` and the embedding :class:`PCABasis` fitted on its first call (``freeze=True``)
    so that later calls (later epochs) name the same groups; :meth:`state_dict` stores both.

    **Metadata slices** are conjunctions of ``attribute == level`` predicates, up to ``max_depth`` of them, enumerated
    level-wise with sparse matrix products and SliceLine's pruning (see :mod:`lightning_lens.slices.search`).
    **Embedding slices** are clusters (k-means or a diagonal Gaussian mixture) of PCA-reduced embeddings, described by
    the metadata values over-represented in them.

    Every candidate (each conjunction with at least ``min_support`` members, each cluster) gets a one-sided test
    against the rest of the data; Benjamini-Yekutieli (or -Hochberg) runs over all of them together. A slice is
    reported when ``q <= alpha`` and its error rate exceeds the rest's by at least ``min_gap``; then

    - a child is dropped unless it is significantly worse, by at least ``min_gap``, than the rest of each of its
      parents,
    - if ``drop_explained``: a parent is dropped when a reported child explains it (the parent minus the child is no
      longer significantly worse, by ``min_gap``, than the data outside the parent), and a slice partly overlapping
      better-ranked ones is dropped when its part outside them no longer is (against the data outside all of them),
    - a slice whose members overlap a better-ranked one with Jaccard > ``max_jaccard`` is dropped (a cluster that
      near-duplicates a metadata slice always gives way to the named slice).

    These follow-up tests are held to the bar of the slice's own test (its p-value times the factor the step-up
    correction applied to it), so they do not escape the multiplicity correction. The overlap rules apply across kinds,
    strongest SliceLine score first (a tight cluster can explain away the diluted metadata slices it straddles, and
    vice versa), and treat a slice with 90% of its members inside a kept one as its child. In the result metadata
    slices come first, ranked by SliceLine's score; embedding slices follow, ranked by number of errors x
    error rate (as PlaneSpot ranks clusters).

    Args:
        max_depth: most predicates in a metadata slice (1 to 4; 3 costs roughly ten times 2).
        min_support: smallest slice: a count, a fraction of n, or None for ``max(30, 0.5% of n)``.
        alpha: FDR level for the q-values, and level of the parent/child tests.
        min_gap: smallest ``error_rate - rest_rate`` reported (in loss units for loss-based slices).
        test: ``"fisher"`` (one-sided Fisher exact, default for 0/1 errors), ``"g"`` (G-test) or ``"welch"``
            (one-sided Welch t, the only choice for loss-based slices); ``"auto"`` picks.
        correction: ``"by"`` (Benjamini-Yekutieli, the default: valid under any dependence, and overlapping slices'
            tests are dependent) or ``"bh"`` (Benjamini-Hochberg: more power, proven under positive dependence only).
        score_alpha: SliceLine's weight between error ratio and size in the ranking score.
        max_slices: report at most this many (None: all).
        max_jaccard: overlap above which a lower-ranked slice is a near-duplicate.
        drop_explained: drop parents explained by a reported child and slices explained by overlapping better ones.
        n_bins, max_categories: binning of metadata (see :class:`Binning`), used when no ``binning`` is given.
        binning: a fitted binning to use (and keep).
        n_components: PCA dimensions for embeddings.
        pca: a fitted basis to use (and keep).
        n_clusters: clusters of embeddings (None: ``min(20, max(2, n // (4 * min_support)))``).
        cluster_method: ``"kmeans"`` or ``"gmm"``.
        seed: seed of the clustering.
        time_budget: seconds; once spent, no deeper metadata level starts and the embedding branch is skipped.
        freeze: keep the binning and PCA basis fitted on the first call for later calls.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> meta = {"digit": rng.integers(0, 10, 5000), "thick": rng.integers(0, 3, 5000)}
        >>> planted = (meta["digit"] == 7) & (meta["thick"] == 2)
        >>> errors = rng.random(5000) < np.where(planted, 0.6, 0.1)
        >>> [s.name for s in SliceFinder().find(errors, meta)][:1]
        ['digit=7 & thick=2']
    """

    def __init__(
        self,
        max_depth: int = 2,
        min_support: Union[int, float, None] = None,
        alpha: float = 0.05,
        min_gap: float = 0.05,
        test: str = "auto",
        correction: str = "by",
        score_alpha: float = 0.95,
        max_slices: Optional[int] = None,
        max_jaccard: float = 0.8,
        drop_explained: bool = True,
        n_bins: int = 4,
        max_categories: int = 20,
        binning: Optional[Binning] = None,
        n_components: int = 32,
        pca: Optional[PCABasis] = None,
        n_clusters: Optional[int] = None,
        cluster_method: str = "kmeans",
        seed: int = 0,
        time_budget: Optional[float] = None,
        freeze: bool = True,
    ) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 1 <= max_depth <= 4:
            raise ValueError(f"max_depth must be an int in [1, 4], got {max_depth!r}")
        if min_support is not None:
            if isinstance(min_support, bool) or not isinstance(min_support, (int, float)) or min_support <= 0:
                raise ValueError(f"min_support must be a count >= 1, a fraction in (0, 1) or None, got {min_support!r}")
            if isinstance(min_support, float) and min_support >= 1 and not float(min_support).is_integer():
                raise ValueError(f"min_support must be a count >= 1 or a fraction in (0, 1), got {min_support!r}")
        _check_fraction(alpha, "alpha")
        if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or min_gap < 0:
            raise ValueError(f"min_gap must be a number >= 0, got {min_gap!r}")
        check_choice(test, "test", _TESTS)
        if correction not in ("bh", "by"):
            raise ValueError(f"correction must be 'bh' or 'by', got {correction!r}")
        _check_fraction(score_alpha, "score_alpha")
        if max_slices is not None and (isinstance(max_slices, bool) or not isinstance(max_slices, int)
                                       or max_slices < 1):
            raise ValueError(f"max_slices must be a positive int or None, got {max_slices!r}")
        _check_fraction(max_jaccard, "max_jaccard")
        if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int)
                                       or n_clusters < 2):
            raise ValueError(f"n_clusters must be an int >= 2 or None, got {n_clusters!r}")
        if cluster_method not in ("kmeans", "gmm"):
            raise ValueError(f"cluster_method must be 'kmeans' or 'gmm', got {cluster_method!r}")
        if time_budget is not None and (not isinstance(time_budget, (int, float)) or time_budget <= 0):
            raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget!r}")
        if binning is not None and not isinstance(binning, Binning):
            raise TypeError(f"binning must be a Binning (see fit_bins), got {type(binning).__name__}")
        if pca is not None and not isinstance(pca, PCABasis):
            raise TypeError(f"pca must be a PCABasis, got {type(pca).__name__}")
        self.max_depth = max_depth
        self.min_support = min_support
        self.alpha = float(alpha)
        self.min_gap = float(min_gap)
        self.test = test
        self.correction = correction
        self.score_alpha = float(score_alpha)
        self.max_slices = max_slices
        self.max_jaccard = float(max_jaccard)
        self.drop_explained = drop_explained
        self.n_bins = n_bins
        self.max_categories = max_categories
        self.n_components = n_components
        self.n_clusters = n_clusters
        self.cluster_method = cluster_method
        self.seed = seed
        self.time_budget = time_budget
        self.freeze = freeze
        self.binning_: Optional[Binning] = binning
        self.pca_: Optional[PCABasis] = pca
        self.last_report_: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The frozen binning and PCA basis (JSON-friendly)."""
        return {"binning": None if self.binning_ is None else self.binning_.to_dict(),
                "pca": None if self.pca_ is None else self.pca_.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.binning_ = Binning.from_dict(state["binning"]) if state.get("binning") else None
        self.pca_ = PCABasis.from_dict(state["pca"]) if state.get("pca") else None

    def resolve_min_support(self, n: int) -> int:
        if self.min_support is None:
            return default_min_support(n)
        if isinstance(self.min_support, float) and self.min_support < 1:
            return max(1, int(math.ceil(self.min_support * n)))
        return int(self.min_support)

    # ------------------------------------------------------------------------------------------------ main
    def find(
        self,
        errors: Any,
        metadata: Optional[Mapping[str, Any]] = None,
        losses: Any = None,
        embeddings: Any = None,
        ids: Any = None,
    ) -> list[Slice]:
        """Slices of the data where ``errors`` (0/1 per sample) or, without errors, ``losses`` are high.

        Args:
            errors: per-sample 0/1 (bool) errors, or None to find slices of high mean loss.
            metadata: attribute name -> per-sample values (categorical or numeric; None/NaN = missing).
            losses: per-sample losses (mean loss is reported; the searched measure when ``errors`` is None).
            embeddings: ``(n, d)`` per-sample embeddings for cluster slices.
            ids: per-sample ids to report as ``Slice.indices`` instead of positions.

        Returns:
            The reported slices, best first (see the class docstring).
        """
        start = time.perf_counter()
        deadline = None if self.time_budget is None else start + float(self.time_budget)
        measure, loss_arr, mode = self._check_outcomes(errors, losses)
        n = measure.size
        metadata = dict(metadata or {})
        columns = {str(k): as_column(v, str(k)) for k, v in metadata.items()}
        for k, v in columns.items():
            if v.size != n:
                raise ValueError(f"metadata[{k!r}] has {v.size} values but errors/losses have {n}")
        emb = None
        if embeddings is not None:
            from lightning_lens.slices.embedding import _as_matrix

            emb = _as_matrix(embeddings)
            if emb.shape[0] != n:
                raise ValueError(f"embeddings have {emb.shape[0]} rows but errors/losses have {n}")
        if not columns and emb is None:
            raise ValueError("nothing to slice on: pass metadata (a dict of per-sample attributes) and/or embeddings")
        id_arr = None
        if ids is not None:
            id_arr = np.asarray(as_column(ids, "ids"))
            if id_arr.size != n:
                raise ValueError(f"ids has {id_arr.size} values but errors/losses have {n}")
        test = self.test
        if test == "auto":
            test = "fisher" if mode == "error" else "welch"
        if mode == "loss" and test != "welch":
            raise ValueError(f"test={test!r} needs 0/1 errors; slices found on losses use test='welch'")
        if mode == "error" and test == "welch":
            raise ValueError("test='welch' compares mean losses: pass errors=None and losses=...")

        sigma = self.resolve_min_support(n)
        report: dict[str, Any] = {"n": n, "min_support": sigma, "measure": mode, "test": test,
                                  "correction": self.correction, "depth_requested": self.max_depth,
                                  "depth_reached": 0, "n_tested": 0, "n_tested_by_level": {}, "n_clusters_tested": 0,
                                  "embedding_skipped": False, "n_reported": 0}
        self.last_report_ = report
        total = float(measure.sum())
        mean_rate = total / n if n else 0.0
        report["overall_rate"] = mean_rate
        degenerate = n < 2 or np.all(measure == measure[0])
        if mode == "error":
            degenerate = degenerate or total == 0 or total == n

        codes: dict[str, np.ndarray] = {}
        binning = None
        if columns:
            binning = self.binning_
            if binning is None:
                binning = Binning.fit(columns, n_bins=self.n_bins, max_categories=self.max_categories)
                if self.freeze:
                    self.binning_ = binning
            codes = binning.transform(columns)

        if degenerate:
            report["elapsed_s"] = time.perf_counter() - start
            return []

        # ---- candidates: metadata conjunctions, then clusters
        cands = None
        if codes:
            cands = enumerate_slices(
                codes, {a: binning.attributes[a].n_levels for a in codes}, measure, sigma, self.min_gap,
                max_depth=self.max_depth, losses=loss_arr if mode == "error" else None,
                need_squares=mode == "loss", deadline=deadline,
            )
            report["depth_reached"] = cands.depth_reached
            report["n_tested_by_level"] = {int(l): int((cands.level == l).sum()) for l in np.unique(cands.level)}
        cluster_labels = None
        cluster_ids = np.zeros(0, dtype=np.int64)
        if emb is not None:
            if deadline is not None and time.perf_counter() > deadline:
                report["embedding_skipped"] = True
            else:
                pca = self.pca_
                if pca is None or pca.mean.shape[0] != emb.shape[1]:
                    pca = PCABasis.fit(emb, n_components=self.n_components, seed=self.seed)
                    if self.freeze:
                        self.pca_ = pca
                z = pca.transform(emb)
                k = self.n_clusters or min(20, max(2, n // (4 * sigma)))
                cluster_labels = cluster_embeddings(z, k, self.cluster_method, self.seed)
                sizes = np.bincount(cluster_labels)
                cluster_ids = np.flatnonzero((sizes >= sigma) & (sizes < n))
        c_size, c_err, c_loss, c_sq = self._cluster_sums(cluster_labels, cluster_ids, measure, loss_arr, mode)

        m_meta = 0 if cands is None else len(cands)
        size = np.concatenate([np.zeros(0) if cands is None else cands.size, c_size])
        err = np.concatenate([np.zeros(0) if cands is None else cands.err_sum, c_err])
        loss_sum = None
        if loss_arr is not None:
            meta_loss = (cands.loss_sum if mode == "error" else cands.err_sum) if cands is not None else np.zeros(0)
            loss_sum = np.concatenate([meta_loss, c_loss])
        sq = None
        if mode == "loss":
            sq = np.concatenate([np.zeros(0) if cands is None else cands.sq_sum, c_sq])
        report["n_clusters_tested"] = int(cluster_ids.size)
        report["n_tested"] = int(size.size)
        if size.size == 0:
            report["elapsed_s"] = time.perf_counter() - start
            return []

        st = self._statistics(size, err, sq, total, n, mode, test, measure)
        st["q"] = adjust_pvalues(st["p"], self.correction)
        st["factor"] = _step_up_factor(st["p"], self.correction)
        st["mean_loss"] = None if loss_sum is None else loss_sum / size
        ok = (st["q"] <= self.alpha) & (st["diff"] >= self.min_gap)

        # ---- pruning among metadata slices
        meta_ok = np.flatnonzero(ok[:m_meta])
        if meta_ok.size and cands is not None:
            meta_ok = self._keep_children_worse_than_parents(cands, meta_ok, st, measure, mode)
            if self.drop_explained:
                meta_ok = self._drop_explained_parents(cands, meta_ok, total, n, mode, float((measure**2).sum()),
                                                       st["factor"])
        emb_ok = m_meta + np.flatnonzero(ok[m_meta:])

        # ---- near-duplicates: named slices first (a cluster that repeats a metadata slice adds nothing readable)
        meta_ok = meta_ok[np.argsort(-st["score"][meta_ok], kind="stable")]
        emb_ok = emb_ok[np.argsort(-st["score"][emb_ok], kind="stable")]
        distinct: list[tuple[int, np.ndarray]] = []
        for idx in np.concatenate([meta_ok, emb_ok]).astype(np.int64):
            if idx < m_meta:
                feats = cands.features[idx][cands.features[idx] >= 0]
                mask = np.ones(n, dtype=bool)
                for f in feats:
                    mask &= codes[cands.attributes[cands.feature_attr[f]]] == cands.feature_code[f]
            else:
                mask = cluster_labels == cluster_ids[idx - m_meta]
            if not any(_jaccard(mask, other) > self.max_jaccard for _, other in distinct):
                distinct.append((int(idx), mask))
        # ---- overlaps, strongest SliceLine score first whatever the kind (a tight cluster can explain away the
        # diluted metadata slices it straddles, and vice versa)
        distinct.sort(key=lambda item: -st["score"][item[0]])
        kept: list[tuple[int, np.ndarray]] = []
        for idx, mask in distinct:
            if self.drop_explained and not self._survives_overlaps(mask, [m for _, m in kept], measure, mode,
                                                                   float(st["factor"][idx])):
                continue
            kept.append((idx, mask))

        # ---- order: metadata slices by score, then clusters by errors x error rate
        kept_meta = [k for k in kept if k[0] < m_meta]
        kept_emb = sorted((k for k in kept if k[0] >= m_meta), key=lambda k: -err[k[0]] * st["rate"][k[0]])
        kept = (kept_meta + kept_emb)[: self.max_slices]
        level_text = {a: [binning.predicate_text(a, c) for c in range(binning.attributes[a].n_levels)]
                      for a in codes} if codes else {}
        descriptions = {}
        if kept_emb and codes:
            clusters = np.array([cluster_ids[k[0] - m_meta] for k in kept_emb])
            descriptions = describe_clusters(cluster_labels, codes, level_text, clusters=clusters)
        out = []
        for idx, mask in kept:
            positions = np.flatnonzero(mask)
            members = positions if id_arr is None else id_arr[positions]
            if idx < m_meta:
                feats = cands.features[idx][cands.features[idx] >= 0]
                preds = []
                for f in feats:
                    attr = cands.attributes[cands.feature_attr[f]]
                    code = int(cands.feature_code[f])
                    bins = binning.attributes[attr]
                    preds.append(Predicate(attr, code, bins.predicate_text(code), bins.level_value(code)))
                out.append(self._make_slice(" & ".join(p.text for p in preds), "metadata", tuple(preds), members,
                                            idx, st, n, err, mode))
            else:
                c = int(cluster_ids[idx - m_meta])
                terms = tuple(descriptions.get(c, ()))
                label = f"cluster {c}"
                if terms:
                    label += " (" + ", ".join(f"{t['text']} {t['share']:.0%}" for t in terms) + ")"
                out.append(self._make_slice(label, "embedding", (), members, idx, st, n, err, mode,
                                            description=terms, cluster=c))
        report["n_reported"] = len(out)
        report["elapsed_s"] = time.perf_counter() - start
        return out

    __call__ = find

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _check_outcomes(errors: Any, losses: Any) -> tuple[np.ndarray, Optional[np.ndarray], str]:
        loss_arr = None
        if losses is not None:
            loss_arr = np.asarray(as_column(losses, "losses"), dtype=np.float64)
            if not np.all(np.isfinite(loss_arr)):
                raise ValueError("losses contain NaN or inf")
        if errors is None:
            if loss_arr is None:
                raise ValueError("pass errors (per-sample 0/1) or losses (per-sample floats)")
            return loss_arr, loss_arr, "loss"
        e = as_column(errors, "errors")
        if e.dtype.kind == "O":
            raise TypeError("errors must be numeric or bool (per-sample 0/1)")
        e = e.astype(np.float64)
        if not np.all((e == 0) | (e == 1)):
            raise ValueError(
                "errors must be 0/1 per sample (e.g. prediction != label); for per-sample losses pass errors=None, "
                "losses=..."
            )
        if loss_arr is not None and loss_arr.size != e.size:
            raise ValueError(f"losses has {loss_arr.size} values but errors has {e.size}")
        return e, loss_arr, "error"

    @staticmethod
    def _cluster_sums(labels, cluster_ids, measure, loss_arr, mode):
        if labels is None or cluster_ids.size == 0:
            z = np.zeros(0)
            return z, z, z, z
        k = int(labels.max()) + 1
        size = np.bincount(labels, minlength=k).astype(np.float64)[cluster_ids]
        err = np.bincount(labels, weights=measure, minlength=k)[cluster_ids]
        loss = np.bincount(labels, weights=loss_arr, minlength=k)[cluster_ids] if loss_arr is not None else np.zeros(0)
        sq = np.bincount(labels, weights=measure * measure, minlength=k)[cluster_ids] if mode == "loss" else np.zeros(0)
        return size, err, loss, sq

    def _statistics(self, size, err, sq, total, n, mode, test, measure) -> dict[str, np.ndarray]:
        rest_n = n - size
        rate = err / size
        rest = (total - err) / rest_n
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(rest > 0, rate / rest, np.where(rate > 0, np.inf, 1.0))
        mean_rate = total / n
        score = self.score_alpha * (rate / mean_rate - 1.0) - (1.0 - self.score_alpha) * (n / size - 1.0)
        if mode == "error":
            if test == "fisher":
                # p-values above 2 alpha cannot change any decision or reported q-value: not summed to the end.
                p = fisher_greater(err, size, total, n, stop_above=min(1.0, 2.0 * self.alpha))
            else:
                p = g_test_greater(err, size, total, n)
            low, high = wilson_interval(err, size)
        else:
            total_sq = float((measure * measure).sum())
            var_in = np.maximum(sq - err * err / size, 0.0) / np.maximum(size - 1, 1)
            rest_sq = total_sq - sq
            var_out = np.maximum(rest_sq - (total - err) ** 2 / rest_n, 0.0) / np.maximum(rest_n - 1, 1)
            p = welch_greater(rate, var_in, size, rest, var_out, rest_n)
            half = sps.t.ppf(0.975, np.maximum(size - 1, 1)) * np.sqrt(var_in / size)
            low, high = rate - half, rate + half
        return {"rate": rate, "rest": rest, "diff": rate - rest, "ratio": ratio, "score": score, "p": p,
                "low": low, "high": high}

    def _keep_children_worse_than_parents(self, cands: Candidates, idx, st, measure, mode) -> np.ndarray:
        """Keep a slice of 2+ predicates only if it errs significantly more than the rest of each parent."""
        keys = cands.keys()
        order = np.argsort(keys)
        sorted_keys = keys[order]
        base = cands.feature_attr.size + 1
        width = cands.features.shape[1]
        keep = np.ones(idx.size, dtype=bool)
        for li in np.unique(cands.level[idx]):
            if li < 2:
                continue
            sel = np.flatnonzero(cands.level[idx] == li)
            child = idx[sel]
            feats = cands.features[child, :li]
            for drop in range(li):
                sub = np.delete(feats, drop, axis=1)
                key = np.zeros(sub.shape[0], dtype=np.int64)
                for j in range(width):
                    key = key * base + (sub[:, j] + 1 if j < sub.shape[1] else 0)
                pos = np.clip(np.searchsorted(sorted_keys, key), 0, sorted_keys.size - 1)
                found = sorted_keys[pos] == key
                parent = order[pos]
                s_c, e_c = cands.size[child], cands.err_sum[child]
                s_p, e_p = cands.size[parent], cands.err_sum[parent]
                if mode == "error":
                    p = hypergeom_sf(e_c, s_p, e_p, s_c, stop_above=min(1.0, 2.0 * self.alpha))
                else:
                    q_c, q_p = cands.sq_sum[child], cands.sq_sum[parent]
                    r_n = np.maximum(s_p - s_c, 1)
                    m_r = (e_p - e_c) / r_n
                    v_c = np.maximum(q_c - e_c**2 / s_c, 0) / np.maximum(s_c - 1, 1)
                    v_r = np.maximum((q_p - q_c) - (e_p - e_c) ** 2 / r_n, 0) / np.maximum(r_n - 1, 1)
                    p = np.where(s_p > s_c, welch_greater(e_c / s_c, v_c, s_c, m_r, v_r, r_n), 1.0)
                rest_rate = (e_p - e_c) / np.maximum(s_p - s_c, 1)
                worse = (p * st["factor"][child] <= self.alpha) & (e_c / s_c - rest_rate >= self.min_gap) & (s_p > s_c)
                keep[sel] &= np.where(found, worse, True)
        return idx[keep]

    def _drop_explained_parents(self, cands: Candidates, idx, total, n, mode, total_sq, factor) -> np.ndarray:
        """Drop a reported slice whose excess error disappears once a reported sub-slice is removed from it."""
        if idx.size < 2:
            return idx
        sets = {int(i): frozenset(cands.features[i][cands.features[i] >= 0].tolist()) for i in idx}
        drop = set()
        for parent, pf in sets.items():
            for child, cf in sets.items():
                if child == parent or not pf < cf:
                    continue
                s_p, e_p = cands.size[parent], cands.err_sum[parent]
                s_c, e_c = cands.size[child], cands.err_sum[child]
                rest_size = s_p - s_c
                if rest_size <= 0:
                    drop.add(parent)
                    break
                gap = (e_p - e_c) / rest_size - (total - e_p) / max(n - s_p, 1)
                if gap < self.min_gap:
                    drop.add(parent)
                    break
                if mode == "error":
                    p = float(hypergeom_sf(e_p - e_c, n - s_c, total - e_c, rest_size))
                else:  # Welch: mean loss of (parent - child) vs outside the parent
                    q_p, q_c = cands.sq_sum[parent], cands.sq_sum[child]
                    out_n = max(n - s_p, 1)
                    m_in, m_out = (e_p - e_c) / rest_size, (total - e_p) / out_n
                    v_in = max((q_p - q_c) - (e_p - e_c) ** 2 / rest_size, 0.0) / max(rest_size - 1, 1)
                    v_out = max((total_sq - q_p) - (total - e_p) ** 2 / out_n, 0.0) / max(out_n - 1, 1)
                    p = float(welch_greater(m_in, v_in, rest_size, m_out, v_out, out_n))
                if p * factor[parent] > self.alpha:
                    drop.add(parent)
                    break
        return np.array([i for i in idx if int(i) not in drop], dtype=np.int64)

    def _survives_overlaps(
        self, mask: np.ndarray, better: list[np.ndarray], measure: np.ndarray, mode: str, factor: float
    ) -> bool:
        """Whether a slice still stands next to the slices already kept (all follow-up tests at ``p * factor``).

        - Inside a kept slice T (at least 90% of its members in T): it must be worse, by ``min_gap`` and
          significantly, than the rest of T (the "children no worse than their parent" rule, by membership).
        - Overlapping kept slices otherwise (including ones it contains): its members outside them must still be
          worse, by ``min_gap`` and significantly, than the data outside all of them.
        """
        size = int(mask.sum())
        cover = np.zeros_like(mask)
        for other in better:
            inter = mask & other
            n_inter = int(inter.sum())
            if n_inter == 0:
                continue
            if n_inter >= 0.9 * size:
                rest_of_other = other & ~mask
                if not rest_of_other.any():
                    return False
                if not self._worse(measure, inter, rest_of_other, mode, factor):
                    return False
            else:
                cover |= other
        if not cover.any():
            return True
        residual = mask & ~cover
        if not residual.any():
            return False
        population = ~cover
        outside = population & ~mask
        if not outside.any():
            return True
        return self._worse(measure, residual, outside, mode, factor)

    def _worse(self, measure, group, reference, mode, factor) -> bool:
        """``group`` errs more than the disjoint ``reference`` by ``min_gap``, significantly (one-sided)."""
        a, b = measure[group], measure[reference]
        if a.mean() - b.mean() < self.min_gap:
            return False
        if mode == "error":
            p = float(hypergeom_sf(a.sum(), a.size + b.size, a.sum() + b.sum(), a.size))
        else:
            p = float(welch_greater(a.mean(), a.var(ddof=1) if a.size > 1 else 0.0, a.size,
                                    b.mean(), b.var(ddof=1) if b.size > 1 else 0.0, b.size))
        return p * factor <= self.alpha

    def _make_slice(self, name, kind, preds, members, idx, st, n, err, mode, description=(), cluster=None) -> Slice:
        size = len(members)
        mean_loss = None if st["mean_loss"] is None else float(st["mean_loss"][idx])
        return Slice(
            name=name,
            kind=kind,
            predicates=preds,
            indices=np.asarray(members),
            size=size,
            fraction=size / n,
            errors=float(err[idx]),
            error_rate=float(st["rate"][idx]),
            ci_low=float(st["low"][idx]),
            ci_high=float(st["high"][idx]),
            rest_rate=float(st["rest"][idx]),
            difference=float(st["diff"][idx]),
            ratio=float(st["ratio"][idx]),
            p_value=float(st["p"][idx]),
            q_value=float(st["q"][idx]),
            score=float(st["score"][idx]),
            mean_loss=mean_loss,
            measure=mode,
            description=tuple(description),
            cluster=cluster,
        )


def _step_up_factor(p: np.ndarray, correction: str) -> np.ndarray:
    """``m / rank`` (times ``sum 1/i`` for BY): the multiplier the step-up procedure applies to each p-value.

    Follow-up tests of a slice (against its parents, or after removing better slices) must pass ``p * factor <=
    alpha``: the same bar its own test had to clear, so they do not bypass the multiplicity correction.
    """
    m = p.size
    rank = np.empty(m)
    rank[np.argsort(p, kind="stable")] = np.arange(1, m + 1)
    factor = m / rank
    if correction == "by":
        factor *= np.sum(1.0 / np.arange(1, m + 1))
    return factor


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def find_slices(
    errors: Any,
    metadata: Optional[Mapping[str, Any]] = None,
    losses: Any = None,
    embeddings: Any = None,
    ids: Any = None,
    **kwargs: Any,
) -> list[Slice]:
    """Find subgroups where the model errs significantly more than elsewhere (functional :class:`SliceFinder`).

    Args:
        errors: per-sample 0/1 errors (or None with ``losses``).
        metadata: attribute name -> per-sample values (categorical or numeric).
        losses: per-sample losses (mean loss per slice; searched when ``errors`` is None).
        embeddings: ``(n, d)`` embeddings for cluster slices.
        ids: per-sample ids reported as ``Slice.indices`` instead of positions.
        **kwargs: any :class:`SliceFinder` argument (``max_depth``, ``min_support``, ``alpha``, ``min_gap``, ...).

    Example:
        >>> rng = np.random.default_rng(1)
        >>> meta = {"site": rng.choice(["a", "b", "c"], 3000), "age": rng.uniform(20, 80, 3000)}
        >>> errors = rng.random(3000) < np.where((meta["site"] == "b") & (meta["age"] > 65), 0.5, 0.1)
        >>> find_slices(errors, meta)[0].name
        'site=b & age>=64.6'
    """
    return SliceFinder(**kwargs).find(errors, metadata, losses=losses, embeddings=embeddings, ids=ids)
