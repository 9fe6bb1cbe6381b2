"""``find_slices`` / :class:`SliceFinder`: search, test, correct, prune and rank error slices."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
from scipy import stats as sps

from lightning_lens.slices.binning import Binning, as_column
from lightning_lens.slices.embedding import (
    PCABasis,
    cluster_level_counts,
    describe_cluster_counts,
    fit_cluster_model,
)
from lightning_lens.slices.search import Candidates, slice_count_steps
from lightning_lens.slices.shards import Gather, Steps, Sum, hash_ids, run_local
from lightning_lens.slices.slice import Predicate, Slice
from lightning_lens.slices.stats import (
    adjust_pvalues,
    fisher_greater,
    g_test_greater,
    hypergeom_sf,
    welch_greater,
    wilson_interval,
)
from lightning_lens.utils.checks import (
    check_bool,
    check_choice,
    check_float,
    check_fraction,
    check_instance,
    check_int,
    check_optional,
    check_positive_number,
)

__all__ = ["SliceFinder", "default_min_support", "find_slices"]

_TESTS = ("auto", "fisher", "g", "welch")


def default_min_support(n: int) -> int:
    """``max(30, ceil(0.5% of n))``: the smallest slice worth reporting."""
    return max(30, int(math.ceil(0.005 * n)))


class SliceFinder:
    """Finds subgroups where a model errs significantly more than on the rest of the data.

    Keeps the metadata :class:`Binning` and the embedding :class:`PCABasis` fitted on its first call (``freeze=True``)
    so that later calls (later epochs) name the same groups; :meth:`state_dict` stores both.

    **Metadata slices** are conjunctions of ``attribute == level`` predicates, up to ``max_depth`` of them, enumerated
    level-wise with SliceLine's pruning and counted in chunks of rows (see :mod:`lightning_lens.slices.search`).
    **Embedding slices** are clusters (k-means or a diagonal Gaussian mixture) of PCA-reduced embeddings, described by
    the metadata values over-represented in them.

    **Cost**: memory is the metadata codes (rows x attributes bytes) plus the candidates' statistics; no per-candidate
    row mask is built. The binning, the PCA basis and the clustering are fitted on a sample of about ``fit_rows``
    rows (all rows when there are fewer), chosen by a hash of the ids; every row is then binned and assigned. Every
    statistic is a sum over rows, so :meth:`find_steps` searches data sharded over processes by exchanging counts
    only, with the same result as one process.

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
        max_depth: most predicates in a metadata slice (1 to 4; each level is one more pass over the rows).
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
        fit_rows: size of the sample the binning, the PCA basis and the clustering are fitted on.

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
        fit_rows: int = 20_000,
    ) -> None:
        check_int(max_depth, "max_depth", minimum=1, maximum=4)
        if min_support is not None:
            check_float(min_support, "min_support", minimum=0.0, open_min=True)
            if min_support >= 1 and not float(min_support).is_integer():
                raise ValueError(f"min_support must be a count >= 1 or a fraction in (0, 1), got {min_support!r}")
        check_fraction(alpha, "alpha")
        check_float(min_gap, "min_gap", minimum=0.0)
        check_choice(test, "test", _TESTS)
        check_choice(correction, "correction", ("bh", "by"))
        check_fraction(score_alpha, "score_alpha")
        check_optional(check_int, max_slices, "max_slices", minimum=1)
        check_fraction(max_jaccard, "max_jaccard")
        check_bool(drop_explained, "drop_explained")
        check_int(n_bins, "n_bins", minimum=2)
        check_int(max_categories, "max_categories", minimum=1)
        check_int(n_components, "n_components", minimum=1)
        check_optional(check_int, n_clusters, "n_clusters", minimum=2)
        check_choice(cluster_method, "cluster_method", ("kmeans", "gmm"))
        check_int(seed, "seed", minimum=0)
        check_optional(check_positive_number, time_budget, "time_budget")
        check_bool(freeze, "freeze")
        self.fit_rows = check_int(fit_rows, "fit_rows", minimum=2)
        check_optional(check_instance, binning, "binning", Binning, hint="see fit_bins")
        check_optional(check_instance, pca, "pca", PCABasis)
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
        return run_local(self.find_steps(errors, metadata, losses=losses, embeddings=embeddings, ids=ids))

    __call__ = find

    def find_steps(
        self,
        errors: Any,
        metadata: Optional[Mapping[str, Any]] = None,
        losses: Any = None,
        embeddings: Any = None,
        ids: Any = None,
    ) -> Steps[list[Slice]]:
        """:meth:`find` on one shard of the rows (one DDP rank's), as a generator of the sums and gathers it needs
        from the other shards (see :mod:`lightning_lens.slices.shards`); it returns the slices of all shards together.

        Rows never move: each shard counts its own rows and only counts are summed. What crosses shards:

        - a few scalars (n, the sum and range of the measure) and, per search level, the candidates' count tables;
        - a sample of about ``fit_rows`` rows (all rows when there are fewer), chosen by a hash of the ids so it does
          not depend on the sharding: its metadata once (to fit the binning) and its embeddings every call (raw once
          to fit the PCA basis, then ``n_components`` PCA coordinates to fit the clustering);
        - membership counts of the significant slices (one row per distinct pattern of membership), and the ids of
          the reported slices' members.

        ``ids`` must be integers, unique over all shards (positions when None: only for a single shard). Every
        shard gets the same slices; ``find`` on all rows at once gives the same slices as any sharding.

        Example:
            >>> from lightning_lens.slices.shards import run_sharded
            >>> rng = np.random.default_rng(0)
            >>> meta = {"digit": rng.integers(0, 10, 4000), "thick": rng.integers(0, 3, 4000)}
            >>> errors = rng.random(4000) < np.where((meta["digit"] == 7) & (meta["thick"] == 2), 0.6, 0.1)
            >>> halves = [np.arange(2000), np.arange(2000, 4000)]
            >>> per_shard = run_sharded([SliceFinder().find_steps(errors[h], {k: v[h] for k, v in meta.items()}, ids=h)
            ...                          for h in halves])
            >>> [s.name for s in per_shard[0]][:1] == [s.name for s in per_shard[1]][:1] == ['digit=7 & thick=2']
            True
        """
        start = time.perf_counter()
        deadline = None if self.time_budget is None else start + float(self.time_budget)
        measure, loss_arr, mode = self._check_outcomes(errors, losses)
        n_local = measure.size
        metadata = dict(metadata or {})
        columns = {str(k): as_column(v, str(k)) for k, v in metadata.items()}
        for k, v in columns.items():
            if v.size != n_local:
                raise ValueError(f"metadata[{k!r}] has {v.size} values but errors/losses have {n_local}")
        emb = None
        if embeddings is not None:
            from lightning_lens.slices.embedding import _as_matrix

            emb = _as_matrix(embeddings)
            if emb.shape[0] != n_local:
                raise ValueError(f"embeddings have {emb.shape[0]} rows but errors/losses have {n_local}")
        if not columns and emb is None:
            raise ValueError("nothing to slice on: pass metadata (a dict of per-sample attributes) and/or embeddings")
        id_arr = None
        if ids is not None:
            id_arr = np.asarray(as_column(ids, "ids"))
            if id_arr.size != n_local:
                raise ValueError(f"ids has {id_arr.size} values but errors/losses have {n_local}")
        # the sample for fitting and the order of its rows go by integer ids (positions otherwise)
        keys = id_arr if id_arr is not None and id_arr.dtype.kind in "iub" else np.arange(n_local)
        test = self.test
        if test == "auto":
            test = "fisher" if mode == "error" else "welch"
        if mode == "loss" and test != "welch":
            raise ValueError(f"test={test!r} needs 0/1 errors; slices found on losses use test='welch'")
        if mode == "error" and test == "welch":
            raise ValueError("test='welch' compares mean losses: pass errors=None and losses=...")

        shards = yield Gather({"n": n_local, "sum": float(measure.sum()), "sq": float((measure * measure).sum()),
                               "min": float(measure.min()) if n_local else None,
                               "max": float(measure.max()) if n_local else None})
        n = int(sum(s["n"] for s in shards))
        total = float(sum(s["sum"] for s in shards)) if len(shards) > 1 else shards[0]["sum"]
        total_sq = float(sum(s["sq"] for s in shards)) if len(shards) > 1 else shards[0]["sq"]
        low = min((s["min"] for s in shards if s["n"]), default=0.0)
        high = max((s["max"] for s in shards if s["n"]), default=0.0)

        sigma = self.resolve_min_support(n)
        report: dict[str, Any] = {"n": n, "min_support": sigma, "measure": mode, "test": test,
                                  "correction": self.correction, "depth_requested": self.max_depth,
                                  "depth_reached": 0, "n_tested": 0, "n_tested_by_level": {}, "n_clusters_tested": 0,
                                  "embedding_skipped": False, "n_reported": 0}
        self.last_report_ = report
        mean_rate = total / n if n else 0.0
        report["overall_rate"] = mean_rate
        degenerate = n < 2 or low == high
        if mode == "error":
            degenerate = degenerate or total == 0 or total == n
        sample = _sample_rows(keys, n, self.fit_rows, self.seed)

        codes: dict[str, np.ndarray] = {}
        binning = None
        if columns:
            binning = self.binning_
            if binning is None:
                fitted = yield from _gather_sample(sample, keys, columns)
                binning = Binning.fit(fitted, n_bins=self.n_bins, max_categories=self.max_categories)
                if self.freeze:
                    self.binning_ = binning
            codes = binning.transform(columns)

        if degenerate:
            report["elapsed_s"] = time.perf_counter() - start
            return []

        # ---- candidates: metadata conjunctions, then clusters
        cands = None
        if codes:
            cands = yield from slice_count_steps(
                codes, {a: binning.attributes[a].n_levels for a in codes}, measure, sigma, self.min_gap,
                max_depth=self.max_depth, losses=loss_arr if mode == "error" else None,
                need_squares=mode == "loss", deadline=deadline, totals=(n, total, high),
            )
            report["depth_reached"] = cands.depth_reached
            report["n_tested_by_level"] = {int(l): int((cands.level == l).sum()) for l in np.unique(cands.level)}
        cluster_labels = None
        cluster_ids = np.zeros(0, dtype=np.int64)
        c_size = c_err = c_loss = c_sq = np.zeros(0)
        if emb is not None:
            out_of_time = False
            if deadline is not None:
                flags = yield Sum({"late": np.array([float(time.perf_counter() > deadline)])})
                out_of_time = flags["late"][0] > 0
            if out_of_time:
                report["embedding_skipped"] = True
            else:
                pca = self.pca_
                if pca is None or pca.mean.shape[0] != emb.shape[1]:
                    fitted = yield from _gather_sample(sample, keys, {"embedding": emb})
                    pca = PCABasis.fit(fitted["embedding"], n_components=self.n_components, seed=self.seed)
                    if self.freeze:
                        self.pca_ = pca
                    z_fit = pca.transform(fitted["embedding"])
                    z = pca.transform(emb)
                else:
                    z = pca.transform(emb)
                    z_fit = (yield from _gather_sample(sample, keys, {"z": z}))["z"]
                k = self.n_clusters or min(20, max(2, n // (4 * sigma)))
                model = fit_cluster_model(z_fit, k, self.cluster_method, self.seed)
                cluster_labels = np.asarray(model.predict(z), dtype=np.int64) if n_local else np.zeros(0, np.int64)
                k_fit = max(1, min(k, z_fit.shape[0]))
                sums = yield Sum(self._cluster_sums(cluster_labels, k_fit, measure, loss_arr, mode))
                cluster_ids = np.flatnonzero((sums["size"] >= sigma) & (sums["size"] < n))
                c_size, c_err = sums["size"][cluster_ids], sums["err"][cluster_ids]
                c_loss = sums["loss"][cluster_ids] if loss_arr is not None else np.zeros(0)
                c_sq = sums["sq"][cluster_ids] if mode == "loss" else np.zeros(0)

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

        st = self._statistics(size, err, sq, total, n, mode, test, total_sq)
        st["q"] = adjust_pvalues(st["p"], self.correction)
        st["factor"] = _step_up_factor(st["p"], self.correction)
        st["mean_loss"] = None if loss_sum is None else loss_sum / size
        ok = (st["q"] <= self.alpha) & (st["diff"] >= self.min_gap)

        # ---- pruning among metadata slices
        meta_ok = np.flatnonzero(ok[:m_meta])
        if meta_ok.size and cands is not None:
            meta_ok = self._keep_children_worse_than_parents(cands, meta_ok, st, mode)
            if self.drop_explained:
                meta_ok = self._drop_explained_parents(cands, meta_ok, total, n, mode, total_sq, st["factor"])
        emb_ok = m_meta + np.flatnonzero(ok[m_meta:])

        # ---- overlaps between significant slices, from counts per pattern of membership (no row masks kept)
        meta_ok = meta_ok[np.argsort(-st["score"][meta_ok], kind="stable")]
        emb_ok = emb_ok[np.argsort(-st["score"][emb_ok], kind="stable")]
        selected = np.concatenate([meta_ok, emb_ok]).astype(np.int64)
        membership = _MembershipTable.empty(selected.size)
        if selected.size:
            local = _MembershipTable.count(self._members(selected, cands, codes, m_meta, cluster_labels, cluster_ids,
                                                         n_local), measure)
            membership = _MembershipTable.merge((yield Gather(local.as_tuple())), selected.size)
        # near-duplicates: named slices first (a cluster that repeats a metadata slice adds nothing readable)
        distinct: list[tuple[int, int]] = []  # (candidate index, column in the membership table)
        for column, idx in enumerate(selected):
            if not any(membership.jaccard(column, other) > self.max_jaccard for _, other in distinct):
                distinct.append((int(idx), column))
        # strongest SliceLine score first whatever the kind (a tight cluster can explain away the diluted metadata
        # slices it straddles, and vice versa)
        distinct.sort(key=lambda item: -st["score"][item[0]])
        kept: list[tuple[int, int]] = []
        for idx, column in distinct:
            if self.drop_explained and not self._survives_overlaps(membership, column, [c for _, c in kept], mode,
                                                                   float(st["factor"][idx])):
                continue
            kept.append((idx, column))

        # ---- order: metadata slices by score, then clusters by errors x error rate
        kept_meta = [k for k in kept if k[0] < m_meta]
        kept_emb = sorted((k for k in kept if k[0] >= m_meta), key=lambda k: -err[k[0]] * st["rate"][k[0]])
        kept = (kept_meta + kept_emb)[: self.max_slices]
        level_text = {a: [binning.predicate_text(a, c) for c in range(binning.attributes[a].n_levels)]
                      for a in codes} if codes else {}
        descriptions = {}
        kept_clusters = np.array([cluster_ids[k[0] - m_meta] for k in kept if k[0] >= m_meta], dtype=np.int64)
        if kept_clusters.size and codes:
            counts = yield Sum(cluster_level_counts(cluster_labels, codes, {a: len(level_text[a]) for a in codes},
                                                    kept_clusters))
            sizes = np.array([size[m_meta + int(np.flatnonzero(cluster_ids == c)[0])] for c in kept_clusters])
            descriptions = describe_cluster_counts(counts, sizes, n, level_text, kept_clusters)
        # ---- members of the reported slices (their ids), from every shard
        chosen = np.array([idx for idx, _ in kept], dtype=np.int64)
        positions: list[list[np.ndarray]] = [[] for _ in chosen]
        for lo, bits in self._members(chosen, cands, codes, m_meta, cluster_labels, cluster_ids, n_local):
            for j in range(chosen.size):
                positions[j].append(lo + np.flatnonzero(bits[:, j]))
        local_members = [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in positions]
        local_members = [m if id_arr is None else id_arr[m] for m in local_members]
        shard_members = yield Gather(local_members)
        out = []
        for j, (idx, _) in enumerate(kept):
            members = _concat_members([shard[j] for shard in shard_members])
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
    def _cluster_sums(labels, k, measure, loss_arr, mode) -> dict[str, np.ndarray]:
        out = {"size": np.bincount(labels, minlength=k).astype(np.float64),
               "err": np.bincount(labels, weights=measure, minlength=k)}
        if loss_arr is not None:
            out["loss"] = np.bincount(labels, weights=loss_arr, minlength=k)
        if mode == "loss":
            out["sq"] = np.bincount(labels, weights=measure * measure, minlength=k)
        return out

    def _statistics(self, size, err, sq, total, n, mode, test, total_sq) -> dict[str, np.ndarray]:
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
            var_in = np.maximum(sq - err * err / size, 0.0) / np.maximum(size - 1, 1)
            rest_sq = total_sq - sq
            var_out = np.maximum(rest_sq - (total - err) ** 2 / rest_n, 0.0) / np.maximum(rest_n - 1, 1)
            p = welch_greater(rate, var_in, size, rest, var_out, rest_n)
            half = sps.t.ppf(0.975, np.maximum(size - 1, 1)) * np.sqrt(var_in / size)
            low, high = rate - half, rate + half
        return {"rate": rate, "rest": rest, "diff": rate - rest, "ratio": ratio, "score": score, "p": p,
                "low": low, "high": high}

    def _keep_children_worse_than_parents(self, cands: Candidates, idx, st, mode) -> np.ndarray:
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
        self, table: "_MembershipTable", column: int, better: list[int], mode: str, factor: float
    ) -> bool:
        """Whether a slice (a column of the membership table) still stands next to the slices already kept (all
        follow-up tests at ``p * factor``).

        - Inside a kept slice T (at least 90% of its members in T): it must be worse, by ``min_gap`` and
          significantly, than the rest of T (the "children no worse than their parent" rule, by membership).
        - Overlapping kept slices otherwise (including ones it contains): its members outside them must still be
          worse, by ``min_gap`` and significantly, than the data outside all of them.
        """
        mask = table.bits[:, column]
        size = table.size(mask)
        cover = np.zeros_like(mask)
        for other_column in better:
            other = table.bits[:, other_column]
            inter = mask & other
            n_inter = table.size(inter)
            if n_inter == 0:
                continue
            if n_inter >= 0.9 * size:
                rest_of_other = other & ~mask
                if not table.size(rest_of_other):
                    return False
                if not self._worse(table, inter, rest_of_other, mode, factor):
                    return False
            else:
                cover |= other
        if not table.size(cover):
            return True
        residual = mask & ~cover
        if not table.size(residual):
            return False
        outside = ~cover & ~mask
        if not table.size(outside):
            return True
        return self._worse(table, residual, outside, mode, factor)

    def _worse(self, table: "_MembershipTable", group, reference, mode, factor) -> bool:
        """``group`` errs more than the disjoint ``reference`` by ``min_gap``, significantly (one-sided)."""
        a_n, a_sum, a_sq = table.stats(group)
        b_n, b_sum, b_sq = table.stats(reference)
        if a_sum / a_n - b_sum / b_n < self.min_gap:
            return False
        if mode == "error":
            p = float(hypergeom_sf(a_sum, a_n + b_n, a_sum + b_sum, a_n))
        else:
            p = float(welch_greater(a_sum / a_n, _sample_variance(a_n, a_sum, a_sq), a_n,
                                    b_sum / b_n, _sample_variance(b_n, b_sum, b_sq), b_n))
        return p * factor <= self.alpha

    @staticmethod
    def _members(selected, cands, codes, m_meta, labels, cluster_ids, n_local, chunk_rows: int = 1 << 16):
        """Membership ``(rows, len(selected))`` of this shard's rows in candidates ``selected``, chunk by chunk."""
        rules = []
        for idx in selected:
            if idx < m_meta:
                feats = cands.features[idx][cands.features[idx] >= 0]
                rules.append([(codes[cands.attributes[cands.feature_attr[f]]], cands.feature_code[f]) for f in feats])
            else:
                rules.append([(labels, cluster_ids[idx - m_meta])])
        for lo in range(0, n_local, chunk_rows):
            hi = min(n_local, lo + chunk_rows)
            bits = np.ones((hi - lo, len(rules)), dtype=bool)
            for j, rule in enumerate(rules):
                for column, value in rule:
                    bits[:, j] &= column[lo:hi] == value
            yield lo, bits

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


def _sample_variance(n: float, total: float, squares: float) -> float:
    return max(squares - total * total / n, 0.0) / (n - 1) if n > 1 else 0.0


def _sample_rows(keys: np.ndarray, n: int, fit_rows: int, seed: int) -> np.ndarray:
    """This shard's rows in the fitting sample: all rows when ``n <= fit_rows``, else those whose id hashes below
    ``fit_rows / n`` of the hash range (about ``fit_rows`` rows, the same ones however the rows are sharded)."""
    if n <= fit_rows:
        return np.arange(keys.size)
    threshold = np.uint64(min(int(fit_rows / n * 2.0**64), 2**64 - 1))
    return np.flatnonzero(hash_ids(keys, seed) < threshold)


def _gather_sample(sample: np.ndarray, keys: np.ndarray, columns: Mapping[str, np.ndarray]):
    """Every shard's sampled rows of ``columns``, ordered by id (a step generator returning the columns)."""
    shards = yield Gather({"keys": keys[sample], "columns": {k: v[sample] for k, v in columns.items()},
                           "objects": [k for k, v in columns.items() if v.dtype.kind == "O" and v.size]})
    order = np.argsort(np.concatenate([s["keys"] for s in shards]), kind="stable")
    # a column that holds objects anywhere (e.g. None in one shard) is an object column for the binning everywhere
    objects = {k for s in shards for k in s["objects"]}
    out = {}
    for k in columns:
        parts = [s["columns"][k] for s in shards]
        out[k] = _concat_column([p.astype(object) for p in parts] if k in objects else parts)[order]
    return out


def _concat_column(parts: list[np.ndarray]) -> np.ndarray:
    if any(p.dtype.kind == "O" for p in parts) and not all(p.dtype.kind == "O" for p in parts):
        parts = [p.astype(object) for p in parts]
    return np.concatenate(parts)


def _concat_members(parts: list[np.ndarray]) -> np.ndarray:
    """Member ids of all shards, ascending (so any sharding reports the same array)."""
    members = _concat_column(parts) if parts else np.zeros(0, dtype=np.int64)
    try:
        return np.sort(members, kind="stable")
    except TypeError:  # ids of mixed types: keep the shards' order
        return members


def _unique_rows(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a ``(rows, bytes)`` uint8 array (ascending as bytes) and each row's index among them."""
    rows, width = packed.shape
    words = -(-width // 8)
    padded = np.zeros((rows, words * 8), dtype=np.uint8)
    padded[:, :width] = packed
    if words == 1:  # one integer per row: a plain sort (np.unique(axis=0) is far slower)
        keys = padded.view(">u8").ravel()
    else:
        keys = padded.view(np.dtype((np.void, words * 8))).ravel()
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return packed[first], inverse.ravel()


class _MembershipTable:
    """Rows counted per distinct pattern of membership in ``k`` slices (``bits``: patterns x slices), with the sum
    and the sum of squares of the measure: every overlap statistic between the slices, without a row mask."""

    def __init__(self, packed: np.ndarray, count: np.ndarray, total: np.ndarray, squares: np.ndarray, k: int) -> None:
        self.packed, self.count, self.total, self.squares = packed, count, total, squares
        self.bits = np.unpackbits(packed, axis=1, count=k).astype(bool) if k else np.zeros((count.size, 0), bool)

    @classmethod
    def empty(cls, k: int) -> "_MembershipTable":
        return cls(np.zeros((0, (k + 7) // 8), dtype=np.uint8), np.zeros(0), np.zeros(0), np.zeros(0), k)

    @classmethod
    def count(cls, chunks, measure: np.ndarray) -> "_MembershipTable":
        """From ``(first row, bits)`` chunks of this shard's rows."""
        parts, k = [], 0
        for lo, bits in chunks:
            k = bits.shape[1]
            x = measure[lo:lo + bits.shape[0]]
            packed = np.packbits(bits, axis=1)
            uniq, inverse = _unique_rows(packed)
            parts.append((uniq, np.bincount(inverse, minlength=uniq.shape[0]).astype(np.float64),
                          np.bincount(inverse, weights=x, minlength=uniq.shape[0]),
                          np.bincount(inverse, weights=x * x, minlength=uniq.shape[0])))
        return cls.merge(parts, k) if parts else cls.empty(k)

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.packed, self.count, self.total, self.squares

    @classmethod
    def merge(cls, parts: list[tuple[np.ndarray, ...]], k: int) -> "_MembershipTable":
        """Tables of several chunks or shards as one (patterns summed)."""
        parts = [p for p in parts if p[0].shape[0]]
        if not parts:
            return cls.empty(k)
        uniq, inverse = _unique_rows(np.concatenate([p[0] for p in parts]))
        sums = [np.bincount(inverse, weights=np.concatenate([p[i] for p in parts]), minlength=uniq.shape[0])
                for i in (1, 2, 3)]
        return cls(uniq, *sums, k=k)

    def size(self, patterns: np.ndarray) -> float:
        return float(self.count[patterns].sum())

    def stats(self, patterns: np.ndarray) -> tuple[float, float, float]:
        return (float(self.count[patterns].sum()), float(self.total[patterns].sum()),
                float(self.squares[patterns].sum()))

    def jaccard(self, i: int, j: int) -> float:
        a, b = self.bits[:, i], self.bits[:, j]
        union = self.size(a | b)
        return self.size(a & b) / union if union else 1.0


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
