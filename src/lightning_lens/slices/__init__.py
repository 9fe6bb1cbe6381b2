"""Subgroup error slices: find the parts of the data where a model errs significantly more (no Lightning import).

- :func:`find_slices` / :class:`SliceFinder`: metadata conjunctions (SliceLine-style lattice search counted in chunks
  of rows) and embedding clusters, with Wilson intervals, one-sided exact tests and FDR control.
- :meth:`SliceFinder.find_steps` / :func:`run_sharded`: the same search on data split into shards (DDP ranks), from
  summed counts (see :mod:`lightning_lens.slices.shards`).
- :class:`Binning` / :func:`fit_bins` / :func:`apply_bins`: a frozen discretisation so slices stay comparable.
- :class:`PCABasis`: a reusable embedding projection.
- :class:`Slice`, :func:`slices_to_json`, :func:`slices_from_json`.
- :class:`SliceTracker`: slices followed across epochs; :class:`Reservoir`: a bounded uniform sample of a stream;
  :func:`classification_outcomes`: per-sample loss/correctness with NaN/inf samples flagged; the report helpers.
"""

from lightning_lens.slices.binning import AttributeBins, Binning, apply_bins, fit_bins
from lightning_lens.slices.embedding import PCABasis, cluster_embeddings, describe_clusters
from lightning_lens.slices.finder import SliceFinder, default_min_support, find_slices
from lightning_lens.slices.outcomes import EXCLUSION_REASONS, classification_outcomes, exclusion_counts
from lightning_lens.slices.report import (
    TABLE_COLUMNS,
    TABLE_LEGEND,
    labelled_image_rows,
    slice_table_rows,
    summarize_slices,
)
from lightning_lens.slices.reservoir import Reservoir
from lightning_lens.slices.search import enumerate_slices, gap_upper_bound, slice_count_steps
from lightning_lens.slices.shards import run_local, run_sharded
from lightning_lens.slices.slice import Predicate, Slice, slices_from_json, slices_to_json
from lightning_lens.slices.stats import (
    adjust_pvalues,
    fisher_greater,
    g_test_greater,
    hypergeom_sf,
    welch_greater,
    wilson_interval,
)
from lightning_lens.slices.tracking import SliceTracker, tracking_name

__all__ = [
    "EXCLUSION_REASONS",
    "TABLE_COLUMNS",
    "TABLE_LEGEND",
    "AttributeBins",
    "Binning",
    "PCABasis",
    "Predicate",
    "Reservoir",
    "Slice",
    "SliceFinder",
    "SliceTracker",
    "adjust_pvalues",
    "apply_bins",
    "classification_outcomes",
    "cluster_embeddings",
    "default_min_support",
    "describe_clusters",
    "enumerate_slices",
    "exclusion_counts",
    "find_slices",
    "fisher_greater",
    "fit_bins",
    "g_test_greater",
    "gap_upper_bound",
    "hypergeom_sf",
    "labelled_image_rows",
    "slice_table_rows",
    "slices_from_json",
    "slices_to_json",
    "run_local",
    "run_sharded",
    "slice_count_steps",
    "summarize_slices",
    "tracking_name",
    "welch_greater",
    "wilson_interval",
]
