"""Attribution methods in pure PyTorch, Captum's shape: ``Method(model).attribute(inputs, target=...)``.

Methods (registry name, class, reference):

- ``gradient``: :class:`Gradient` (Simonyan et al., 2014)
- ``gradient_x_input``: :class:`GradientXInput` (Shrikumar et al., 2016)
- ``smoothgrad``: :class:`SmoothGrad` (Smilkov et al., 2017)
- ``smoothgrad_squared``: ``SmoothGrad(variant="squared")`` (Hooker et al., 2019)
- ``vargrad``: :class:`VarGrad` (Adebayo et al., 2018)
- ``integrated_gradients``: :class:`IntegratedGradients` (Sundararajan et al., 2017)
- ``guided_backprop``: :class:`GuidedBackprop` (Springenberg et al., 2015)
- ``deconvnet``: :class:`Deconvnet` (Zeiler and Fergus, 2014)
- ``gradcam``: :class:`GradCAM` (Selvaraju et al., 2017)
- ``hirescam``: :class:`HiResCAM` (Draelos & Carin, 2020)
- ``guided_gradcam``: :class:`GuidedGradCAM` (Selvaraju et al., 2017)
- ``occlusion``: :class:`Occlusion` (Zeiler and Fergus, 2014)
- ``edge``: :class:`EdgeDetector`, a model-independent control (Adebayo et al., 2018)
- ``random``: :class:`RandomMap`, a model-independent control

``target`` is an int, a 1-D tensor of per-example class indices, or ``None`` (the predicted class). Wherever the
package takes a method (callbacks, sanity checks, evaluation) it takes a :data:`MethodSpec`: a registry name, a
``(name, kwargs)`` pair, a method object or class, or an explain function ``(model, inputs, target) -> maps``
(:data:`ExplainFn`), resolved by :func:`resolve_method` and named by :func:`method_name`. Outputs have
the input's shape, except Grad-CAM's ``(B, 1, H, W)``. Maps are signed unless ``abs=True``. Every method explains
the model in eval mode and restores each submodule's mode, never writes a parameter's ``.grad``, removes its hooks
and modes even after an exception, draws noise from a private generator, and works under ``torch.inference_mode``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> get_method("smoothgrad", model, n_samples=4).attribute(torch.rand(2, 1, 4, 4)).shape
    torch.Size([2, 1, 4, 4])
"""

from lightning_lens.attribution.base import Attribution, ExplainFn, FunctionAttribution, input_gradients
from lightning_lens.attribution.controls import EdgeDetector, RandomMap
from lightning_lens.attribution.gradcam import GradCAM, GuidedGradCAM, HiResCAM
from lightning_lens.attribution.gradient import Gradient, GradientXInput
from lightning_lens.attribution.guided import Deconvnet, GuidedBackprop, ReLURule
from lightning_lens.attribution.integrated_gradients import IntegratedGradients
from lightning_lens.attribution.occlusion import Occlusion
from lightning_lens.attribution.registry import (
    Methods,
    MethodSpec,
    available_methods,
    canonical_name,
    get_method,
    is_explain_function,
    method_name,
    method_specs,
    register_method,
    registered_name,
    resolve_method,
)
from lightning_lens.attribution.smoothgrad import SmoothGrad, VarGrad

__all__ = [
    "Attribution",
    "Deconvnet",
    "EdgeDetector",
    "ExplainFn",
    "FunctionAttribution",
    "GradCAM",
    "Gradient",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "MethodSpec",
    "Methods",
    "Occlusion",
    "RandomMap",
    "ReLURule",
    "SmoothGrad",
    "VarGrad",
    "available_methods",
    "canonical_name",
    "get_method",
    "input_gradients",
    "is_explain_function",
    "method_name",
    "method_specs",
    "register_method",
    "registered_name",
    "resolve_method",
]
