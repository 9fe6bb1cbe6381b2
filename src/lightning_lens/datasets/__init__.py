"""Small data sets built offline from scikit-learn's bundled digits and tables, or generated: nothing downloads."""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "SpuriousDigits": "spurious_digits",
    "SpuriousText": "spurious_text",
    "LeakyTabular": "leaky_tabular",
    "SevenSegmentDigits": "seven_segment",
    "SignRegimes": "sign_regimes",
    "make_trigonometry": "synthetic_concepts",
    "make_dot": "synthetic_concepts",
    "make_xor": "synthetic_concepts",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
