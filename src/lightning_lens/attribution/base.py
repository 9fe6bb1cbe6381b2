"""The shared shape of every attribution method and the one gradient core they all use.

Every method is ``Method(model, ...)`` with ``.attribute(inputs, target=None, *, abs=False, **options) -> Tensor``.
:meth:`Attribution.attribute` is the one entry point: it validates the inputs, ``abs`` and the per-call options (each
method declares them in :attr:`Attribution.call_options`; an omitted option takes the constructor's value), then runs
the method's :meth:`Attribution._attribute` in :meth:`Attribution.explaining`. While a method runs it:

* puts the model in eval mode (``eval_mode=True``, the default) and restores every submodule's own train/eval flag
  afterwards, also after an exception. Eval mode is the right default for explanations: dropout is off and
  BatchNorm uses its running statistics, so the rows of a batch do not interact and one backward pass of the summed
  target scores gives exact per-example gradients. With ``eval_mode=False`` the model runs in whatever modes it is
  in; the module buffers (BatchNorm running statistics) are then snapshotted and restored so explaining never changes
  the model.
* leaves ``torch.inference_mode`` and enables autograd (``trainer.validate()`` runs under inference mode), and
  differentiates with ``torch.autograd.grad`` with respect to a private copy of the inputs only: parameters' ``.grad``
  are never written and the caller's tensor is never modified.
* removes every hook or mode it installs in a ``finally`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from lightning_lens.utils import grad_ready, gradients_enabled, preserve_modes, resolve_target
from lightning_lens.utils.checks import check_bool, check_differentiable_inputs
from lightning_lens.utils.targets import Target, per_example_target

__all__ = [
    "Attribution",
    "ExplainFn",
    "FunctionAttribution",
    "ModelInputError",
    "Target",
    "check_inputs",
    "forward_logits",
    "run_forward",
    "target_scores",
    "input_gradients",
]

#: The one explain-function signature accepted wherever a method is: ``explain(model, inputs, target) -> maps``, with
#: ``target`` ``None`` or a ``(B,)`` tensor of class indices and ``maps`` a ``(B, ...)`` tensor.
ExplainFn = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def check_inputs(inputs: Any, argument: str = "inputs", min_dim: int = 2) -> torch.Tensor:
    """Validate an input batch: a floating-point tensor with a leading batch dimension."""
    return check_differentiable_inputs(inputs, argument, min_dim=min_dim)


class ModelInputError(ValueError, RuntimeError):
    """The model's forward raised on the given inputs (usually a shape the model does not take).

    A ``ValueError`` (the inputs are wrong for the model) that is also a ``RuntimeError``, the type torch raised, so
    code catching either keeps working.

    Attributes:
        shape: the shape of the tensor the forward failed on.
        reason: torch's message.
    """

    def __init__(self, shape: tuple[int, ...], reason: str, expected: str = "") -> None:
        self.shape, self.reason, self.expected = shape, reason, expected
        super().__init__(
            f"inputs: the model's forward failed on inputs of shape {shape}: {reason}; check that inputs match what"
            f" the model expects{expected}"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (e.g. across DDP ranks) despite the custom __init__
        return type(self), (self.shape, self.reason, self.expected)


def _expected_input(model: nn.Module, inputs: torch.Tensor) -> str:
    """What the model's first convolution or linear layer takes, and a fix for a missing batch dimension."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(module)]
            expected_dim = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(module)]
            text = f"; its first layer {name!r} expects inputs of shape (batch, {module.in_channels}, {dims})"
            if inputs.dim() == expected_dim - 1:
                fix = "inputs.unsqueeze(1)" if module.in_channels == 1 else "inputs.unsqueeze(0)"
                text += f": one dimension is missing (add it with {fix})"
            return text
        if isinstance(module, nn.Linear):
            return f"; its first layer {name!r} expects {module.in_features} features per example"
    return ""


def run_forward(model: nn.Module, inputs: torch.Tensor) -> Any:
    """``model(inputs)``; a ``RuntimeError`` inside the forward becomes a :class:`ModelInputError` naming the inputs'
    shape and what the model expects, instead of torch's bare "mat1 and mat2 shapes cannot be multiplied"."""
    try:
        return model(inputs)
    except (torch.OutOfMemoryError, ModelInputError):
        raise
    except RuntimeError as err:
        raise ModelInputError(tuple(inputs.shape), str(err), _expected_input(model, inputs)) from err


def forward_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, checked to be a ``(batch, classes)`` tensor with one row per input."""
    out = run_forward(model, inputs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor of logits of shape (batch, classes), got {type(out).__name__};"
            " wrap the model so that its forward returns one score per class"
        )
    if out.dim() != 2 or out.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"the model must return logits of shape (batch, classes) = ({inputs.shape[0]}, C), got shape"
            f" {tuple(out.shape)}; wrap the model so that its forward returns one score per class"
        )
    return out


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The selected logit of every row: ``logits[i, target[i]]``."""
    if target.is_inference():  # a target built under inference mode cannot be saved for backward
        target = target.clone()
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    owned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of each row's target logit with respect to that row of ``inputs``, in one forward and backward.

    This is the core every gradient method shares. Call it inside :meth:`Attribution.explaining` (or at least
    :func:`lightning_lens.utils.gradients_enabled`). The model sees a non-leaf copy of the inputs, so a forward that
    modifies its input in place still works; only that copy's gradient is requested from autograd, so parameters'
    ``.grad`` stay untouched. Rows are explained independently, which is exact when rows do not interact in the
    forward (true in eval mode).

    Args:
        model: returns ``(rows, classes)`` logits.
        inputs: ``(rows, ...)`` floating-point rows.
        target: see :func:`lightning_lens.utils.resolve_target` (``None`` = each row's argmax).
        owned: the caller built ``inputs`` itself and does not need it afterwards (saves one copy).

    Returns:
        ``(gradients, resolved_target, logits)``, the gradients detached and shaped like ``inputs``.
    """
    # grad_ready copies: an inference tensor becomes a normal one and the caller's tensor is never touched
    leaf = inputs.detach().requires_grad_(True) if owned and not inputs.is_inference() else grad_ready(inputs)
    logits = forward_logits(model, leaf.clone())
    resolved = resolve_target(target, logits)
    score = target_scores(logits, resolved).sum()
    grads = torch.autograd.grad(score, leaf, allow_unused=True)[0] if score.requires_grad else None
    if grads is None:
        raise RuntimeError(
            "the model's output does not depend on its input through autograd: does its forward run under"
            " torch.no_grad(), detach the input, or convert it to numpy?"
        )
    return grads.detach(), resolved, logits.detach()


class Attribution:
    """Base class: an attribution method bound to a model.

    Subclasses set :attr:`name`, list their per-call options in :attr:`call_options` (validated by
    :meth:`_check_option`) and implement :meth:`_attribute`, which runs inside :meth:`explaining` and returns raw
    (signed) attributions; :meth:`attribute`, the same for every method, validates the inputs and options and applies
    ``abs``. A subclass may re-declare ``attribute`` only to give its options typed keywords, forwarding them to
    ``super().attribute``.

    Args:
        model: the classifier to explain, returning ``(batch, classes)`` logits.
        eval_mode: explain the model in eval mode (default) and restore every submodule's mode afterwards; ``False``
            uses the modes the model is in (buffers are restored afterwards).

    Example:
        >>> from lightning_lens.attribution import Gradient
        >>> model = torch.nn.Linear(3, 2)
        >>> Gradient(model).attribute(torch.ones(1, 3), target=1).shape
        torch.Size([1, 3])
    """

    #: the registry name of the method (``"gradient"``, ``"smoothgrad"`` ...), used as a label in logs.
    name: ClassVar[str] = "attribution"
    #: ``True`` for methods whose output is ``(B, 1, *spatial)`` rather than the input's shape.
    produces_map: ClassVar[bool] = False
    #: ``False`` for controls that ignore the model.
    requires_model: ClassVar[bool] = True
    #: keyword options :meth:`attribute` takes besides ``target`` and ``abs``; each one omitted (or ``None``) takes the
    #: value of the instance attribute of the same name, i.e. the constructor's.
    call_options: ClassVar[tuple[str, ...]] = ()
    #: ``True`` when :meth:`_attribute` applies ``abs`` itself (it then receives ``abs=...``), e.g. SmoothGrad takes the
    #: absolute value of every sample's gradient before averaging.
    handles_abs: ClassVar[bool] = False

    def __init__(self, model: Optional[nn.Module], *, eval_mode: bool = True) -> None:
        if self.requires_model and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module for {type(self).__name__}, got {type(model).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.eval_mode = check_bool(eval_mode, "eval_mode")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """The context every forward/backward of the method runs in (see the module docstring)."""
        if self.model is None:
            with gradients_enabled():  # tensors made here are normal tensors even under inference mode
                yield
            return
        buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.eval_mode:
            buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            with preserve_modes(self.model, mode=False if self.eval_mode else None), gradients_enabled():
                yield
        finally:
            if buffers:
                with torch.no_grad():
                    for buf, saved in buffers:
                        buf.copy_(saved)

    def attribute(self, inputs: torch.Tensor, target: Target = None, *, abs: bool = False, **options: Any) -> Any:
        """Attributions for ``inputs`` (shape ``(B, ...)``) with respect to ``target``.

        Args:
            inputs: a floating-point batch.
            target: an int, a 1-D tensor of ``B`` class indices, or ``None`` for the predicted classes.
            abs: return absolute values (signed by default).
            options: the method's :attr:`call_options`, overriding the constructor's values for this call.

        Raises:
            TypeError: non-tensor or integer inputs, a non-bool ``abs``, or an option the method does not take.
        """
        inputs = check_inputs(inputs)
        absolute = check_bool(abs, "abs")
        resolved = self._resolve_options(options)
        if self.handles_abs:
            resolved["abs"] = absolute
        try:
            with self.explaining():
                attributions = self._attribute(inputs, target, **resolved)
        except ModelInputError as err:
            if err.shape == tuple(inputs.shape) or self.model is None:
                raise
            # the method ran the model on rows it built (noisy copies, path points): report the caller's inputs
            raise ModelInputError(
                tuple(inputs.shape), f"{err.reason} (on rows of shape {err.shape} built from them)",
                _expected_input(self.model, inputs),
            ) from err.__cause__
        return attributions.abs() if absolute and not self.handles_abs else attributions

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.attribute(*args, **kwargs)

    def _resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of :attr:`call_options`: the given value checked by :meth:`_check_option`, else the
        constructor's."""
        unknown = sorted(set(options) - set(self.call_options))
        if unknown:
            accepted = ", ".join(self.call_options) if self.call_options else "none"
            raise TypeError(
                f"{type(self).__name__}.attribute() got unknown option(s) {unknown}; its options besides target and"
                f" abs: {accepted}"
            )
        return {
            key: getattr(self, key) if options.get(key) is None else self._check_option(key, options[key])
            for key in self.call_options
        }

    def _check_option(self, key: str, value: Any) -> Any:
        """Validate one per-call option (the constructor's checks); the base accepts it as it is."""
        return value

    def _attribute(self, inputs: torch.Tensor, target: Target, **options: Any) -> Any:
        """The method itself: raw attributions of validated ``inputs``, run inside :meth:`explaining`."""
        raise NotImplementedError


class FunctionAttribution(Attribution):
    """An explain function ``fn(model, inputs, target) -> maps`` (:data:`ExplainFn`) as a method object.

    It gets the shared checks and context of every method (eval mode, autograd on, modes restored). ``target`` reaches
    ``fn`` as ``None`` (``fn`` picks its own classes) or a ``(B,)`` tensor of class indices; ``fn`` must return one
    map per example. :func:`~lightning_lens.attribution.resolve_method` wraps plain functions in it, so every place
    that takes a method takes an explain function too.

    Args:
        model: the model handed to ``fn`` (may be None for a model-free function).
        fn: the explain function.
        name: the name it logs under; default ``fn.name`` or ``fn.__name__`` (``"explain_function"`` for a lambda).

    Example:
        >>> def doubled(model, inputs, target):
        ...     return 2 * inputs
        >>> method = FunctionAttribution(None, doubled)
        >>> method.name, method.attribute(torch.ones(1, 2)).tolist()
        ('doubled', [[2.0, 2.0]])
    """

    requires_model = False

    def __init__(
        self, model: Optional[nn.Module], fn: ExplainFn, name: Optional[str] = None, *, eval_mode: bool = True
    ) -> None:
        super().__init__(model, eval_mode=eval_mode)
        if not callable(fn):
            raise TypeError(f"fn must be a function (model, inputs, target) -> maps, got {type(fn).__name__}")
        self.fn = fn
        label = name if name is not None else function_name(fn) or "explain_function"
        if not isinstance(label, str) or not label:
            raise TypeError(f"name must be a non-empty str, got {label!r}")
        self._name = label

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def __repr__(self) -> str:
        return f"FunctionAttribution(name={self.name!r}, fn={self.fn!r})"

    def _attribute(self, inputs: torch.Tensor, target: Target, **options: Any) -> torch.Tensor:
        batch = inputs.shape[0]
        targets = None if target is None else per_example_target(target, batch, inputs.device)
        out = self.fn(self.model, inputs, targets)  # type: ignore[arg-type]
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != batch:
            raise TypeError(
                f"the explain function {self.name!r} must return a tensor of maps of shape (batch, ...) with batch"
                f" {batch}, got {getattr(out, 'shape', type(out).__name__)}"
            )
        return out.detach()


def function_name(fn: Any) -> Optional[str]:
    """The name an explain function logs under: its ``name`` attribute, else its ``__name__`` (not ``<lambda>``).

    Example:
        >>> def occlude_center(model, inputs, target): ...
        >>> function_name(occlude_center), function_name(lambda m, x, t: x)
        ('occlude_center', None)
    """
    label = getattr(fn, "name", None)
    if isinstance(label, str) and label:
        return label
    label = getattr(fn, "__name__", None)
    if isinstance(label, str) and label.isidentifier():
        return label
    return None
