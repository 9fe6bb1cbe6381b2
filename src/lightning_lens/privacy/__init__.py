"""What explanations give away, pure PyTorch: membership inference from losses and explanation statistics (Shokri,
Strobel & Zick 2021), model extraction with and without explanations (Milli et al. 2019), and exact recovery of
linear models from gradient queries. The Lightning side is :class:`lightning_lens.callbacks.PrivacyAuditCallback`;
``examples/dp_explanations.py`` trains with DP-SGD (Opacus, the ``privacy`` extra) and compares the maps.
"""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "DIRECTIONS": "membership",
    "SCORES": "membership",
    "ScoreOutput": "membership",
    "score_explainer": "membership",
    "MembershipInferenceResult": "membership",
    "ThresholdAttack": "membership",
    "attacks_from_statistics": "membership",
    "membership_inference": "membership",
    "membership_statistics": "membership",
    "roc_auc": "membership",
    "threshold_attack": "membership",
    "tpr_at_fpr": "membership",
    "ExtractionRow": "extraction",
    "LinearRecovery": "extraction",
    "extraction_curve": "extraction",
    "recover_linear_model": "extraction",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
