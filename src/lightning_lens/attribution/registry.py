"""Attribution methods by name, so callbacks and configuration files can say ``"smoothgrad"``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from torch import nn

from lightning_lens.attribution.base import Attribution
from lightning_lens.attribution.controls import EdgeDetector, RandomMap
from lightning_lens.attribution.gradcam import GradCAM, GuidedGradCAM, HiResCAM
from lightning_lens.attribution.gradient import Gradient, GradientXInput
from lightning_lens.attribution.guided import Deconvnet, GuidedBackprop
from lightning_lens.attribution.integrated_gradients import IntegratedGradients
from lightning_lens.attribution.occlusion import Occlusion
from lightning_lens.attribution.smoothgrad import SmoothGrad, VarGrad

Factory = Callable[..., Attribution]
#: How users name a method: a registry name, ``(name, kwargs)``, a method object, or a factory ``model -> method``
#: (a method class or a ``functools.partial`` of one).
MethodSpec = Union[str, tuple[str, Mapping[str, Any]], Attribution, Factory]

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
    "edge": EdgeDetector,
    "random": RandomMap,
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
    "random_map": "random",
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
    key = canonical_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; available: {', '.join(available_methods())}")
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


def method_name(spec: MethodSpec) -> str:
    """The name a method spec logs under: the registry spelling of a name, else the object's or class's ``.name``
    (a ``functools.partial`` is named by its class).

    Raises:
        ValueError: an unknown registry name (the message lists the available ones).
        TypeError: a spec that is none of the forms of :data:`MethodSpec`, or a factory without a ``name``.

    Example:
        >>> method_name("IG"), method_name(("smoothgrad", {"n_samples": 4})), method_name(functools.partial(VarGrad))
        ('integrated_gradients', 'smoothgrad', 'vargrad')
    """
    if _is_name_kwargs(spec):
        spec = spec[0]
    if isinstance(spec, str):
        key = canonical_name(spec)
        if key not in _REGISTRY:
            raise ValueError(f"{spec!r} is not a known attribution method; available: {available_methods()}")
        return key
    if not (hasattr(spec, "attribute") or callable(spec)):
        raise TypeError(
            "a method must be a method name, a (name, kwargs) pair, an attribution method object or a factory, got"
            f" {type(spec).__name__}"
        )
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name:
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


def resolve_method(spec: MethodSpec, model: Optional[nn.Module], **kwargs: Any) -> Attribution:
    """The method object ``spec`` describes, built for ``model`` when it is not one already.

    A name or ``(name, kwargs)`` pair goes through :func:`get_method` (``kwargs`` here update the pair's); a method
    object is returned as it is; a class or other factory is called as ``factory(model, **kwargs)``.

    Raises:
        TypeError: a spec of another kind, ``kwargs`` for a ready object, or a factory that returns no method.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> resolve_method(("integrated_gradients", {"n_steps": 8}), model).n_steps
        8
        >>> type(resolve_method(functools.partial(SmoothGrad, n_samples=2), model)).__name__
        'SmoothGrad'
    """
    if _is_name_kwargs(spec):
        return get_method(spec[0], model, **{**spec[1], **kwargs})
    if isinstance(spec, str):
        return get_method(spec, model, **kwargs)
    if hasattr(spec, "attribute") and not isinstance(spec, type):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply to method names, not to the ready {spec!r}")
        return spec
    if not callable(spec):
        raise TypeError(
            "a method must be a method name, a (name, kwargs) pair, an attribution method object or a factory, got"
            f" {type(spec).__name__}"
        )
    method = spec(model, **kwargs)
    if not hasattr(method, "attribute"):
        raise TypeError(
            f"{spec!r} returned {type(method).__name__} when called with the model; expected an attribution method"
            " object with .attribute(inputs, target=...)"
        )
    return method


def _is_name_kwargs(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping)
