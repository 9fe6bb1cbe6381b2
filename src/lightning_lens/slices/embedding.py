"""Embedding slices: a reusable PCA basis, seeded clustering, and metadata descriptions of clusters.

Clusters are found on the embeddings alone and tested afterwards: appending the error to the embedding makes the
clustering split errors from non-errors instead of finding coherent groups (see the slices research notes, §7).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from lightning_lens.slices.stats import hypergeom_sf
from lightning_lens.utils.checks import check_choice, check_int

__all__ = [
    "PCABasis",
    "cluster_embeddings",
    "cluster_level_counts",
    "describe_cluster_counts",
    "describe_clusters",
    "fit_cluster_model",
]


@dataclass
class PCABasis:
    """A PCA projection fitted once and reused, so clusters of later epochs live in the same coordinates.

    Attributes:
        mean: ``(d,)`` centre of the fitted embeddings.
        components: ``(k, d)`` orthonormal principal axes, largest variance first.
        explained_variance_ratio: ``(k,)`` share of the total variance each axis explains.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> basis = PCABasis.fit(rng.normal(size=(200, 16)), n_components=4)
        >>> basis.transform(rng.normal(size=(5, 16))).shape
        (5, 4)
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    @classmethod
    def fit(cls, embeddings: Any, n_components: int = 32, max_rows: int = 4096, seed: int = 0) -> "PCABasis":
        """Fit on ``(n, d)`` embeddings (eigen-decomposition of the ``d x d`` covariance: cheap for n >> d).

        At most ``max_rows`` rows, drawn with a private generator seeded by ``seed``, are used: plenty for 32 axes.
        """
        x = _as_matrix(embeddings)
        check_int(n_components, "n_components", minimum=1)
        if x.shape[0] > max_rows:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
        n, d = x.shape
        if n < 2:
            raise ValueError(f"PCA needs at least 2 embeddings, got {n}")
        mean = x.mean(axis=0)
        xc = x - mean
        k = min(n_components, d, n - 1)
        if d <= n:
            cov = xc.T @ xc / (n - 1)
            values, vectors = np.linalg.eigh(cov)
            order = np.argsort(values)[::-1][:k]
            components = vectors[:, order].T
            variances = np.maximum(values[order], 0.0)
            total = max(float(np.trace(cov)), 1e-300)
        else:
            _, sing, vt = np.linalg.svd(xc, full_matrices=False)
            components = vt[:k]
            variances = sing[:k] ** 2 / (n - 1)
            total = max(float((sing**2).sum() / (n - 1)), 1e-300)
        # Fix the sign of each axis (largest |loading| positive) so refits give comparable coordinates.
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        components = components * np.where(signs == 0, 1.0, signs)[:, None]
        return cls(mean=mean, components=components, explained_variance_ratio=variances / total)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, embeddings: Any) -> np.ndarray:
        x = _as_matrix(embeddings)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"embeddings have {x.shape[1]} features but the PCA basis was fitted on {self.mean.shape[0]}; "
                "refit the basis (or pass pca=None) when the embedding layer changes"
            )
        return (x - self.mean) @ self.components.T

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "explained_variance_ratio": self.explained_variance_ratio.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PCABasis":
        return cls(mean=np.asarray(d["mean"], dtype=np.float64),
                   components=np.asarray(d["components"], dtype=np.float64),
                   explained_variance_ratio=np.asarray(d["explained_variance_ratio"], dtype=np.float64))


def _as_matrix(embeddings: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (n_samples, n_features) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    return x


def _cluster_model(n: int, n_clusters: int, method: str, seed: int) -> Any:
    check_choice(method, "cluster_method", ("kmeans", "gmm"))
    k = int(min(n_clusters, n))
    if k < 2:
        return None
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed)
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=k, covariance_type="diag", random_state=seed, reg_covar=1e-4, max_iter=100)


def cluster_embeddings(
    z: np.ndarray, n_clusters: int, method: str = "kmeans", seed: int = 0
) -> np.ndarray:
    """Cluster labels ``(n,)`` from scikit-learn's ``KMeans`` or a diagonal ``GaussianMixture``, seeded.

    Example:
        >>> z = np.concatenate([np.zeros((5, 2)), np.ones((5, 2)) * 10])
        >>> labels = cluster_embeddings(z, 2)
        >>> len(set(labels[:5])), len(set(labels[5:])), labels[0] != labels[5]
        (1, 1, np.True_)
    """
    model = _cluster_model(z.shape[0], n_clusters, method, seed)
    if model is None:
        return np.zeros(z.shape[0], dtype=np.int64)
    return np.asarray(model.fit_predict(z), dtype=np.int64)


class _OneCluster:
    def predict(self, z: np.ndarray) -> np.ndarray:
        return np.zeros(np.asarray(z).shape[0], dtype=np.int64)


def fit_cluster_model(z: np.ndarray, n_clusters: int, method: str = "kmeans", seed: int = 0) -> Any:
    """The clustering of :func:`cluster_embeddings`, fitted on ``z`` (e.g. a sample), to ``predict`` any rows.

    On the rows it was fitted on, ``predict`` gives the labels :func:`cluster_embeddings` returns (scikit-learn ends
    both fits with an assignment step), so a model fitted on a sample assigns every row consistently.

    Example:
        >>> z = np.concatenate([np.zeros((5, 2)), np.ones((5, 2)) * 10])
        >>> model = fit_cluster_model(z, 2)
        >>> far = model.predict(np.full((1, 2), 9.0))[0]
        >>> bool((model.predict(z) == cluster_embeddings(z, 2)).all()), bool(far == model.predict(z)[-1])
        (True, True)
    """
    model = _cluster_model(z.shape[0], n_clusters, method, seed)
    if model is None:
        return _OneCluster()
    return model.fit(z)


def cluster_level_counts(
    labels: np.ndarray, codes: Mapping[str, np.ndarray], n_levels: Mapping[str, int], clusters: np.ndarray
) -> dict[str, np.ndarray]:
    """Per attribute, ``(len(clusters) + 1, n_levels)`` counts: rows of each cluster at each level, then all rows.

    Sums over shards of the rows, so clusters of sharded data are described from all-reduced counts.

    Example:
        >>> cluster_level_counts(np.array([0, 0, 1]), {"site": np.array([0, 1, 1])}, {"site": 2}, np.array([1]))
        {'site': array([[0., 1.],
               [1., 2.]])}
    """
    out = {}
    slot = np.full(int(max(labels.max(initial=0), clusters.max(initial=0))) + 1, -1, dtype=np.int64)
    slot[np.asarray(clusters, dtype=np.int64)] = np.arange(len(clusters))
    row = slot[labels] if labels.size else np.zeros(0, dtype=np.int64)
    member = row >= 0
    for attr, col in codes.items():
        k = int(n_levels[attr])
        inside = np.bincount(row[member] * k + col[member], minlength=len(clusters) * k).reshape(len(clusters), k)
        out[attr] = np.vstack([inside, np.bincount(col, minlength=k)]).astype(np.float64)
    return out


def describe_cluster_counts(
    counts: Mapping[str, np.ndarray],
    sizes: np.ndarray,
    n: int,
    level_text: Mapping[str, list[str]],
    clusters: np.ndarray,
    max_terms: int = 3,
    min_lift: float = 1.5,
    max_p: float = 1e-3,
) -> dict[int, list[dict[str, Any]]]:
    """:func:`describe_clusters` from :func:`cluster_level_counts` (``sizes``: members of each cluster)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for i, c in enumerate(clusters):
        s = int(sizes[i])
        terms = []
        for attr, table in counts.items():
            overall, inside = table[-1], table[i]
            present = np.flatnonzero(inside)
            if present.size == 0 or s == 0:
                continue
            share = inside[present] / s
            lift = share / (overall[present] / n)
            p = hypergeom_sf(inside[present], n, overall[present], s)
            for j, lv in enumerate(present):
                if lift[j] >= min_lift and p[j] <= max_p:
                    terms.append({"text": level_text[attr][lv], "share": float(share[j]), "lift": float(lift[j]),
                                  "p_value": float(p[j])})
        terms.sort(key=lambda t: (-t["share"], -t["lift"]))
        out[int(c)] = terms[:max_terms]
    return out


def describe_clusters(
    labels: np.ndarray,
    codes: Mapping[str, np.ndarray],
    level_text: Mapping[str, list[str]],
    clusters: Optional[np.ndarray] = None,
    max_terms: int = 3,
    min_lift: float = 1.5,
    max_p: float = 1e-3,
) -> dict[int, list[dict[str, Any]]]:
    """Metadata values over-represented in each cluster: ``{cluster: [{text, share, lift, p_value}, ...]}``.

    A value qualifies when its share in the cluster is at least ``min_lift`` times its share overall and a one-sided
    hypergeometric (Fisher) test of enrichment gives ``p <= max_p``; the ``max_terms`` with the largest share are kept.

    Example:
        >>> labels = np.repeat([0, 1], 50)
        >>> codes = {"site": np.r_[np.zeros(50, int), np.ones(50, int)]}
        >>> describe_clusters(labels, codes, {"site": ["site=a", "site=b"]})[1][0]["text"]
        'site=b'
    """
    clusters = np.unique(labels) if clusters is None else np.asarray(clusters)
    counts = cluster_level_counts(labels, codes, {a: len(level_text[a]) for a in codes}, clusters)
    sizes = np.array([np.count_nonzero(labels == c) for c in clusters])
    return describe_cluster_counts(counts, sizes, labels.size, level_text, clusters, max_terms, min_lift, max_p)
