"""Tiny models shipped for tests, examples and users' own checks (as ``captum.testing`` does)."""

from lightning_lens._lazy import lazy_exports

_EXPORTS = {
    "SmallCNN": "models",
    "LinearModel": "models",
    "OneConvReLUModel": "models",
    "OneMinusReLUModel": "models",
    "DifferenceReLUModel": "models",
    "MultiLayerModel": "models",
    "MixedReLUModel": "models",
    "TinyTextTransformer": "models",
    "TabularMLP": "models",
    "LitClassifier": ".lightning_modules",  # a LightningModule: imports Lightning when used
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
