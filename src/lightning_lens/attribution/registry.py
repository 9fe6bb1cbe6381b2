"""Attribution methods by name, and the one way every part of the package turns a method spec into a method.

Callbacks, sanity checks and evaluation metrics all take methods as :data:`MethodSpec` and go through this module:
:func:`method_specs` checks a user's list and names each entry (the name it logs under, :func:`method_name`), and
:func:`resolve_method` builds the method object for a model. An explain function has one signature everywhere,
:data:`~lightning_lens.attribution.base.ExplainFn`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

from torch import nn

from lightning_lens.attribution.base import Attribution, ExplainFn, FunctionAttribution, function_name
from lightning_lens.attribution.controls import EdgeDetector, RandomMap
from lightning_lens.attribution.feature_ablation import FeatureAblation
from lightning_lens.attribution.gradcam import GradCAM, GuidedGradCAM, HiResCAM
from lightning_lens.attribution.gradient import Gradient, GradientXInput
from lightning_lens.attribution.guided import Deconvnet, GuidedBackprop
from lightning_lens.attribution.integrated_gradients import IntegratedGradients
from lightning_lens.attribution.kernel_shap import KernelSHAP
from lightning_lens.attribution.lime import LIME
from lightning_lens.attribution.occlusion import Occlusion
from lightning_lens.attribution.lrp import LRP
from lightning_lens.attribution.excitation import ExcitationBackprop
from lightning_lens.attribution.rise import RISE
from lightning_lens.attribution.cgi import CompetitiveGradientXInput
from lightning_lens.attribution.smoothgrad import SmoothGrad, VarGrad
from lightning_lens.attribution.rollout import AttentionRollout, GradientAttentionRollout

Factory = Callable[..., Attribution]
#: How users name a method: a registry name, ``(name, kwargs)``, a method object, a factory ``model -> method`` (a
#: method class or a ``functools.partial`` of one), or an explain function ``(model, inputs, target) -> maps``.
MethodSpec = Union[str, tuple[str, Mapping[str, Any]], Attribution, Factory, ExplainFn]
#: Several methods: a list of specs (each named by :func:`method_name`) or a ``{label: spec}`` dict (explicit labels).
Methods = Union[Sequence[MethodSpec], Mapping[str, MethodSpec]]

_REGISTRY: dict[str, Factory] = {
    "gradient": Gradient,
    "gradient_x_input": GradientXInput,
    "smoothgrad": SmoothGrad,
    "smoothgrad_squared": functools.partial(SmoothGrad, variant="squared"),
    "vargrad": VarGrad,
    "integrated_gradients": IntegratedGradients,
    "guided_backprop": GuidedBackprop,
    "deconvnet": Deconvnet,
    "gradcam": GradCAM,
    "hirescam": HiResCAM,
    "guided_gradcam": GuidedGradCAM,
    "occlusion": Occlusion,
    "feature_ablation": FeatureAblation,
    "kernel_shap": KernelSHAP,
    "lime": LIME,
    "lrp": LRP,
    "excitation_backprop": ExcitationBackprop,
    "contrastive_excitation_backprop": functools.partial(ExcitationBackprop, contrastive=True),
    "rise": RISE,
    "cgi": CompetitiveGradientXInput,
    "edge": EdgeDetector,
    "random": RandomMap,
    "attention_rollout": AttentionRollout,
    "gradient_rollout": GradientAttentionRollout,
}
#: other spellings users reach for (Captum's class names, abbreviations); they map to the names above.
_ALIASES = {
    "saliency": "gradient",
    "input_x_gradient": "gradient_x_input",
    "gradient_times_input": "gradient_x_input",
    "smoothgrad_sq": "smoothgrad_squared",
    "ig": "integrated_gradients",
    "guided_backpropagation": "guided_backprop",
    "deconvolution": "deconvnet",
    "grad_cam": "gradcam",
    "hires_cam": "hirescam",
    "guided_grad_cam": "guided_gradcam",
    "edge_detector": "edge",
    "sobel": "edge",
    "layerwise_relevance_propagation": "lrp",
    "excitation_backprop_contrastive": "contrastive_excitation_backprop",
    "c_mwp": "contrastive_excitation_backprop",
    "competitive_gradient_x_input": "cgi",
    "random_map": "random",
    "ablation": "feature_ablation",
    "kernelshap": "kernel_shap",
    "shap": "kernel_shap",
    "rollout": "attention_rollout",
    "gradient_attention_rollout": "gradient_rollout",
}


def canonical_name(name: str) -> str:
    """The registry spelling of a method name: lower case, aliases resolved (``"IG"`` -> ``"integrated_gradients"``).

    Example:
        >>> canonical_name("Saliency")
        'gradient'
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def registered_name(factory: Any) -> Optional[str]:
    """The name a class (or other factory) is registered under, or None.

    Example:
        >>> registered_name(SmoothGrad)
        'smoothgrad'
    """
    return next((key for key, f in _REGISTRY.items() if f is factory), None)



def available_methods() -> list[str]:
    """The registered method names (aliases such as ``"saliency"`` or ``"ig"`` are accepted too).

    Example:
        >>> "smoothgrad" in available_methods()
        True
    """
    return list(_REGISTRY)


def get_method(name: str, model: Optional[nn.Module], **kwargs: Any) -> Attribution:
    """Build the method registered as ``name`` for ``model``; ``kwargs`` go to its constructor.

    Example:
        >>> import torch
        >>> get_method("integrated_gradients", torch.nn.Linear(3, 2), n_steps=16).n_steps
        16
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a method name (str), got {type(name).__name__}")
    key = _known_name(name)
    try:
        return _REGISTRY[key](model, **kwargs)
    except TypeError as err:
        raise TypeError(f"get_method({name!r}, ...): {err}") from err


def register_method(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Register ``factory(model, **kwargs) -> Attribution`` (usually a class) under ``name``.

    Example:
        >>> import torch
        >>> register_method("my_gradient", Gradient, overwrite=True)
        >>> type(get_method("my_gradient", torch.nn.Linear(2, 2))).__name__
        'Gradient'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(model, **kwargs), got {type(factory).__name__}")
    key = canonical_name(name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"an attribution method is already registered as {key!r}; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def _known_name(name: str) -> str:
    """The registry spelling of ``name``; a ``ValueError`` listing the available names (and the closest) if unknown."""
    key = canonical_name(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=1)
        hint = f" (did you mean {canonical_name(close[0])!r}?)" if close else ""
        raise ValueError(f"unknown attribution method {name!r}{hint}; available: {available_methods()}")
    return key


def method_name(spec: MethodSpec) -> str:
    """The name a method spec logs under: the registry spelling of a name, else the object's or class's ``.name``
    (a ``functools.partial`` is named by its class), else an explain function's ``__name__``.

    Raises:
        ValueError: an unknown registry name (the message lists the available ones).
        TypeError: a spec that is none of the forms of :data:`MethodSpec`, or a factory or lambda without a ``name``.

    Example:
        >>> method_name("IG"), method_name(("smoothgrad", {"n_samples": 4})), method_name(functools.partial(VarGrad))
        ('integrated_gradients', 'smoothgrad', 'vargrad')
    """
    if _is_name_kwargs(spec):
        spec = spec[0]
    if isinstance(spec, str):
        return _known_name(spec)
    _check_spec_kind(spec)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name:
        return name
    if is_explain_function(spec):
        name = function_name(spec)
        if name is None:
            raise TypeError(
                f"{spec!r} has no name to log under; use a def-function, give it a `name` attribute, or pass"
                " methods as a dict {label: function}"
            )
        return name
    cls = spec if isinstance(spec, type) else getattr(spec, "func", None)  # functools.partial keeps its class in .func
    name = getattr(cls, "name", None)
    if isinstance(name, str) and name:
        return name
    name = registered_name(cls) if cls is not None else None
    if name is None:
        raise TypeError(
            f"{spec!r} has no string .name; use a lightning_lens.attribution method (object or class) or give your"
            " method a `name` attribute"
        )
    return name


def _check_spec_kind(spec: Any) -> None:
    """Refuse what is neither a name, a method object, a factory nor an explain function."""
    if not (hasattr(spec, "attribute") or callable(spec)):
        raise TypeError(
            "a method must be a method name, a (name, kwargs) pair, an attribution method object, a factory or an"
            f" explain function (model, inputs, target) -> maps, got {type(spec).__name__}"
        )
    is_explain_function(spec)  # refuses the old (inputs, target) form


def method_specs(
    methods: Union[Methods, MethodSpec], argument: str = "methods", *, allow_single: bool = False
) -> list[tuple[str, MethodSpec]]:
    """``[(name, spec)]`` from a user's methods: the one validation every callback, sanity check and metric uses.

    Names are :func:`method_name`'s (so ``"IG"`` is ``"integrated_gradients"`` everywhere), except that a
    ``{label: spec}`` dict labels its entries itself. A registry name's spec becomes its registry spelling.

    Args:
        methods: a list of specs, or a ``{label: spec}`` dict.
        argument: the argument name used in error messages.
        allow_single: also accept one spec on its own (the sanity functions take ``methods="gradient"``).

    Raises:
        TypeError: a lone string or spec where a list is needed (with a "did you mean" fix), an entry that is no spec.
        ValueError: an empty list, an unknown name, or two entries with the same name.

    Example:
        >>> method_specs(["IG", ("smoothgrad", {"n_samples": 4})])
        [('integrated_gradients', 'integrated_gradients'), ('smoothgrad', ('smoothgrad', {'n_samples': 4}))]
    """
    single = False
    if isinstance(methods, Mapping):
        items: list[tuple[Optional[str], Any]] = []
        for label, spec in methods.items():
            if not isinstance(label, str) or not label.strip():
                raise TypeError(f"{argument}: dict keys are the labels methods log under, non-empty str; got {label!r}")
            items.append((label, spec))
    elif allow_single and (isinstance(methods, str) or _is_name_kwargs(methods) or not isinstance(methods, Sequence)):
        items = [(None, methods)]
        single = True
    elif isinstance(methods, str) or not isinstance(methods, Sequence) or _is_name_kwargs(methods):
        raise TypeError(
            f"{argument} must be a list of method names, method objects, factories or explain functions, got"
            f" {methods!r}" + (f"; did you mean {argument}=[{methods!r}]?" if isinstance(methods, (str, tuple)) else "")
        )
    else:
        items = [(None, m) for m in methods]
    if not items:
        raise ValueError(f"{argument} is empty; name at least one attribution method, e.g. {argument}=['gradient']")
    specs: list[tuple[str, MethodSpec]] = []
    for i, (label, spec) in enumerate(items):
        where = f"{argument}[{label!r}]" if label is not None else argument if single else f"{argument}[{i}]"
        try:
            if isinstance(spec, tuple) and not _is_name_kwargs(spec):
                raise TypeError("a tuple must be (name, kwargs), e.g. ('smoothgrad', {'n_samples': 20})")
            if label is not None and not isinstance(spec, (str, tuple)):
                _check_spec_kind(spec)  # a labelled object or function needs no name of its own
                name = label
            else:
                name = method_name(spec)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}={spec!r}: {err}") from None
        specs.append((label if label is not None else name, name if isinstance(spec, str) else spec))
    names = [n for n, _ in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"{argument} contains {duplicates} more than once (duplicate names); each method logs under its name, so"
            " names must be unique: give differently configured methods distinct .name attributes or pass a dict"
            " {label: method}"
        )
    return specs


def resolve_method(spec: MethodSpec, model: Optional[nn.Module], **kwargs: Any) -> Attribution:
    """The method object ``spec`` describes, built for ``model`` when it is not one already.

    A name or ``(name, kwargs)`` pair goes through :func:`get_method` (``kwargs`` here update the pair's); a method
    object is returned as it is; a class or other factory is called as ``factory(model, **kwargs)``; an explain
    function ``(model, inputs, target) -> maps`` is wrapped in a
    :class:`~lightning_lens.attribution.base.FunctionAttribution` bound to ``model``.

    Raises:
        TypeError: a spec of another kind, ``kwargs`` for a ready object or function, a factory that returns no
            method, or a function of ``(inputs, target)`` (the old two-argument form).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> resolve_method(("integrated_gradients", {"n_steps": 8}), model).n_steps
        8
        >>> type(resolve_method(functools.partial(SmoothGrad, n_samples=2), model)).__name__
        'SmoothGrad'
        >>> def doubled(model, inputs, target):
        ...     return 2 * inputs
        >>> resolve_method(doubled, model).name
        'doubled'
    """
    if _is_name_kwargs(spec):
        return get_method(spec[0], model, **{**spec[1], **kwargs})
    if isinstance(spec, str):
        return get_method(spec, model, **kwargs)
    if hasattr(spec, "attribute") and not isinstance(spec, type):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply to method names, not to the ready {spec!r}")
        return spec  # type: ignore[return-value]
    _check_spec_kind(spec)
    if is_explain_function(spec):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply to method names, not to the function {spec!r}")
        return FunctionAttribution(model, spec)
    method = spec(model, **kwargs)
    if not hasattr(method, "attribute"):
        raise TypeError(
            f"{spec!r} returned {type(method).__name__} when called with the model; expected an attribution method"
            " object with .attribute(inputs, target=...)"
        )
    return method


def is_explain_function(spec: Any) -> bool:
    """Whether ``spec`` is an explain function ``(model, inputs, target) -> maps`` rather than a factory
    ``model -> method``: a plain callable (not a method object, class or partial of a class) with at least two
    required positional parameters.

    Raises:
        TypeError: a function of exactly ``(inputs, target)``, the two-argument form evaluation used to take.

    Example:
        >>> is_explain_function(lambda model, inputs, target: inputs), is_explain_function(Gradient)
        (True, False)
    """
    if isinstance(spec, type) or hasattr(spec, "attribute") or not callable(spec):
        return False
    if isinstance(spec, functools.partial) and isinstance(spec.func, type):
        return False
    try:
        signature = inspect.signature(spec)
    except (TypeError, ValueError):  # a builtin without a signature: call it as a factory
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in signature.parameters.values() if p.kind in positional and p.default is p.empty]
    if len(required) < 2:
        return False
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise TypeError(
            f"{spec!r} takes {signature}, but explain functions take (model, inputs, target) and return the maps;"
            " wrap a function of (inputs, target) as `lambda model, inputs, target: fn(inputs, target)`"
        ) from None
    return True


def _is_name_kwargs(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping)
