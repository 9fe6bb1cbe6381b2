"""Thin Lightning callbacks over the pure parts of lightning-lens."""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "SaliencyMapCallback": "saliency_maps",
    "RandomizationSanityCheck": "randomization_check",
    "ExplanationTestsCallback": "explanation_tests",
    "SubgroupErrorSlices": "error_slices",
    "RoutingMonitor": "routing_monitor",
    "ConceptMonitor": "concept_monitor",
    "NeighborGallery": "neighbor_gallery",
    "KNNMemoryRefresh": "knn_memory",
    "TracInCallback": "tracin",
    "PermutationImportanceMonitor": "permutation_importance",
    "PrivacyAuditCallback": "privacy_audit",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
