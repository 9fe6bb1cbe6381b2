"""lightning-lens: interpretability as a routine part of training with PyTorch Lightning.

Subpackages: ``attribution``, ``sanity``, ``evaluation``, ``slices``, ``render``, ``loggers``, ``callbacks``,
``interpretable_models``, ``datasets``, ``utils``, ``testing``. Only ``callbacks`` (and the Lightning training
modules it names) import Lightning.
"""

from lightning_lens.__about__ import __version__

__all__ = ["__version__"]
