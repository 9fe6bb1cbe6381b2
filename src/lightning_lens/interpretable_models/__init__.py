"""Interpretable-by-design layers: mixture-of-experts routing, concept bottlenecks, kNN-retrieval heads."""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "MixtureOfExperts": "moe",
    "moe_aux_loss": "moe",
    "moe_layers": "moe",
    "routing_statistics": "moe",
    "ConceptBottleneckModel": "concept_bottleneck",
    "ConceptBottleneckModule": ".lightning_modules",  # a LightningModule: imports Lightning when used
    "KNNHead": "knn",
    "KNNClassifier": "knn",
    "MomentumEncoder": "knn",
    "Neighbors": "knn",
    "DeepKNN": "dknn",
    "DeepKNNOutput": "dknn",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
