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
- ``feature_ablation``: :class:`FeatureAblation`; ``kernel_shap``: :class:`KernelSHAP` (Lundberg & Lee, 2017);
  ``lime``: :class:`LIME` (Ribeiro et al., 2016); feature groups from :func:`patch_mask` / :func:`superpixel_mask`
- ``lrp``: :class:`LRP`, rules and composites (Bach et al., 2015; Montavon et al., 2019); ``excitation_backprop`` /
  ``contrastive_excitation_backprop``: :class:`ExcitationBackprop` (Zhang et al., 2016); ``rise``: :class:`RISE`
  (Petsiuk et al., 2018); ``cgi``: :class:`CompetitiveGradientXInput` (Gupta & Arora, 2019)
- ``edge``: :class:`EdgeDetector`, a model-independent control (Adebayo et al., 2018)
- ``random``: :class:`RandomMap`, a model-independent control
- ``attention_rollout``: :class:`AttentionRollout` (Abnar & Zuidema, 2020); ``gradient_rollout``:
  :class:`GradientAttentionRollout` (Chefer et al., 2021); per token, or ``(B, 1, H, W)`` for a vision transformer

``target`` is an int, a 1-D tensor of per-example class indices, or ``None`` (the predicted class). Wherever the
package takes a method (callbacks, sanity checks, evaluation) it takes a :data:`MethodSpec`: a registry name, a
``(name, kwargs)`` pair, a method object or class, or an explain function ``(model, inputs, target) -> maps``
(:data:`ExplainFn`), resolved by :func:`resolve_method` and named by :func:`method_name`. Outputs have
the input's shape, except Grad-CAM's ``(B, 1, H, W)``. Maps are signed unless ``abs=True``. Every method explains
the model in eval mode and restores each submodule's mode, never writes a parameter's ``.grad``, removes its hooks
and modes even after an exception, draws noise from a private generator, and works under ``torch.inference_mode``.
The gradient methods also take a tuple or dict of tensors, ``forward_kwargs=``, ``output_fn=`` and ``layer=`` (token
ids: explain the embedding layer, then :func:`reduce_tokens` gives one score per token).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> get_method("smoothgrad", model, n_samples=4).attribute(torch.rand(2, 1, 4, 4)).shape
    torch.Size([2, 1, 4, 4])
"""

from lightning_lens.attribution.base import Attribution, ExplainFn, FunctionAttribution, input_gradients
from lightning_lens.attribution._perturbation import patch_mask, superpixel_mask
from lightning_lens.attribution.controls import EdgeDetector, RandomMap
from lightning_lens.attribution.feature_ablation import FeatureAblation
from lightning_lens.attribution.gradcam import GradCAM, GuidedGradCAM, HiResCAM
from lightning_lens.attribution.gradient import Gradient, GradientXInput
from lightning_lens.attribution.guided import Deconvnet, GuidedBackprop, ReLURule
from lightning_lens.attribution.integrated_gradients import IntegratedGradients
from lightning_lens.attribution.layer import reduce_tokens
from lightning_lens.attribution.kernel_shap import KernelSHAP
from lightning_lens.attribution.lime import LIME
from lightning_lens.attribution.occlusion import Occlusion
from lightning_lens.attribution.lrp import LRP
from lightning_lens.attribution.excitation import ExcitationBackprop
from lightning_lens.attribution.rise import RISE
from lightning_lens.attribution.cgi import CompetitiveGradientXInput
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
from lightning_lens.attribution.rollout import AttentionRollout, GradientAttentionRollout

__all__ = [
    "AttentionRollout",
    "Attribution",
    "GradientAttentionRollout",
    "Deconvnet",
    "EdgeDetector",
    "ExplainFn",
    "FeatureAblation",
    "FunctionAttribution",
    "GradCAM",
    "Gradient",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegratedGradients",
    "KernelSHAP",
    "LIME",
    "MethodSpec",
    "Methods",
    "Occlusion",
    "LRP",
    "ExcitationBackprop",
    "RISE",
    "CompetitiveGradientXInput",
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
    "patch_mask",
    "reduce_tokens",
    "register_method",
    "registered_name",
    "resolve_method",
    "superpixel_mask",
]
