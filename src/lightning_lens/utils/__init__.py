"""Small pure-PyTorch helpers shared by every part of the package (no Lightning import)."""

from lightning_lens.utils.batch import BatchAccessor
from lightning_lens.utils.grad import gradients_enabled, grad_ready
from lightning_lens.utils.modules import (
    modules_in_execution_order,
    preserve_modes,
    resolve_module,
)
from lightning_lens.utils.probes import ProbeSet
from lightning_lens.utils.targets import resolve_target

__all__ = [
    "BatchAccessor",
    "ProbeSet",
    "grad_ready",
    "gradients_enabled",
    "modules_in_execution_order",
    "preserve_modes",
    "resolve_module",
    "resolve_target",
]
