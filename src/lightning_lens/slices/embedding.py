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
from lightning_lens.utils.checks import check_int

__all__ = ["PCABasis", "cluster_embeddings", "describe_clusters"]


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
    if method not in ("kmeans", "gmm"):
        raise ValueError(f"cluster_method must be 'kmeans' or 'gmm', got {method!r}")
    n = z.shape[0]
    k = int(min(n_clusters, n))
    if k < 2:
        return np.zeros(n, dtype=np.int64)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed)
    else:
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed, reg_covar=1e-4,
                                max_iter=100)
    return np.asarray(model.fit_predict(z), dtype=np.int64)


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
    n = labels.size
    out: dict[int, list[dict[str, Any]]] = {}
    clusters = np.unique(labels) if clusters is None else clusters
    for c in clusters:
        members = labels == c
        s = int(members.sum())
        terms = []
        for attr, col in codes.items():
            k_levels = len(level_text[attr])
            overall = np.bincount(col, minlength=k_levels)
            inside = np.bincount(col[members], minlength=k_levels)
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
