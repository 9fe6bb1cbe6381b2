"""Training-data influence from a run's checkpoints: TracIn (Pruthi et al. 2020), pure PyTorch.

``TracInCP`` (per-example gradients with ``torch.func``, optional sparse JL projection), ``TracInCPFast`` (the
last-layer factorisation), checkpoint loading (state dicts, ``torch.save`` files, Lightning ``.ckpt`` files) and the
reports built on the scores (precision at k, galleries). The Lightning side is
:class:`lightning_lens.callbacks.TracInCallback`.
"""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "TracInCP": "tracin",
    "TracInCPFast": "tracin",
    "TopInfluence": "tracin",
    "BatchScores": "tracin",
    "TestGradients": "tracin",
    "load_checkpoint": "checkpoints",
    "match_state_dict": "checkpoints",
    "checkpoint_learning_rate": "checkpoints",
    "precision_at_k": "reports",
    "self_influence_gallery": "reports",
    "influence_gallery": "reports",
    "rank_by_self_influence": "reports",
    "top_influence": "reports",
    "global_rng_preserved": "tracin",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
