"""Subgroup error slices: find the parts of the data where a model errs significantly more (no Lightning import).

- :func:`find_slices` / :class:`SliceFinder`: metadata conjunctions (SliceLine-style lattice search on sparse
  matrices) and embedding clusters, with Wilson intervals, one-sided exact tests and FDR control.
- :class:`Binning` / :func:`fit_bins` / :func:`apply_bins`: a frozen discretisation so slices stay comparable.
- :class:`PCABasis`: a reusable embedding projection.
- :class:`Slice`, :func:`slices_to_json`, :func:`slices_from_json`.
"""

from lightning_lens.slices.binning import AttributeBins, Binning, apply_bins, fit_bins
from lightning_lens.slices.embedding import PCABasis, cluster_embeddings, describe_clusters
from lightning_lens.slices.finder import SliceFinder, default_min_support, find_slices
from lightning_lens.slices.search import enumerate_slices, gap_upper_bound
from lightning_lens.slices.slice import Predicate, Slice, slices_from_json, slices_to_json
from lightning_lens.slices.stats import (
    adjust_pvalues,
    fisher_greater,
    g_test_greater,
    hypergeom_sf,
    welch_greater,
    wilson_interval,
)

__all__ = [
    "AttributeBins",
    "Binning",
    "PCABasis",
    "Predicate",
    "Slice",
    "SliceFinder",
    "adjust_pvalues",
    "apply_bins",
    "cluster_embeddings",
    "default_min_support",
    "describe_clusters",
    "enumerate_slices",
    "find_slices",
    "fisher_greater",
    "fit_bins",
    "g_test_greater",
    "gap_upper_bound",
    "hypergeom_sf",
    "slices_from_json",
    "slices_to_json",
    "welch_greater",
    "wilson_interval",
]
