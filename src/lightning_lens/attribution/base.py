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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._inputs import Inputs, ModelInputs

if TYPE_CHECKING:
    from lightning_lens.attribution.layer import LayerSpec
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
    "gradients",
    "Gradients",
    "model_scores",
    "ModelInputs",
    "OutputFn",
    "WithDelta",
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


def _expected_input(model: nn.Module, inputs: Any) -> str:
    """What the model's first convolution or linear layer takes, and a fix for a missing batch dimension."""
    if isinstance(inputs, ModelInputs) and inputs.structure == "tensor":
        inputs = inputs.leaves[0]
    if not isinstance(inputs, torch.Tensor):
        return ""
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


def run_forward(model: nn.Module, inputs: Union[torch.Tensor, ModelInputs]) -> Any:
    """``model(inputs)`` (a :class:`ModelInputs` is called as ``model(*args, **kwargs, **forward_kwargs)``); a
    ``RuntimeError`` inside the forward becomes a :class:`ModelInputError` naming the inputs' shape and what the model
    expects, instead of torch's bare "mat1 and mat2 shapes cannot be multiplied"."""
    try:
        return inputs.call(model) if isinstance(inputs, ModelInputs) else model(inputs)
    except (torch.OutOfMemoryError, ModelInputError):
        raise
    except RuntimeError as err:
        shape = inputs.shape if isinstance(inputs, ModelInputs) else tuple(inputs.shape)
        raise ModelInputError(shape, str(err), _expected_input(model, inputs)) from err


#: maps the model's raw output to ``(batch, classes)`` or ``(batch,)`` scores (an ``output_fn``).
OutputFn = Callable[[Any], torch.Tensor]


def model_scores(out: Any, batch: int, output_fn: Optional[OutputFn] = None) -> torch.Tensor:
    """The model's raw output as ``(batch, classes)`` scores.

    A ``(B, C)`` tensor is taken as it is, ``(B,)`` becomes ``(B, 1)`` (one score: regression or binary), a tuple or
    list gives its first element, a mapping or HuggingFace ``ModelOutput`` its ``"logits"``. ``output_fn``, when given,
    is applied to the raw output first and must return ``(B, C)`` or ``(B,)``.

    Example:
        >>> model_scores({"logits": torch.ones(2, 3), "loss": None}, 2).shape
        torch.Size([2, 3])
        >>> model_scores(torch.ones(2), 2).shape
        torch.Size([2, 1])
    """
    if output_fn is not None:
        out = output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor of scores (batch, classes) or (batch,), got"
                            f" {type(out).__name__}")
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif isinstance(out, Mapping):
        if "logits" not in out:
            raise TypeError(
                f"the model returns a mapping without 'logits' (keys {list(out.keys())}); pass output_fn= to pick the"
                " scores, e.g. output_fn=lambda out: out['scores']"
            )
        out = out["logits"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return logits of shape (batch, classes), got {type(out).__name__}; pass output_fn= (a"
            " function of the model's output returning (batch, classes) or (batch,) scores) or wrap the model"
        )
    if out.dim() == 1 and out.shape[0] == batch:
        return out.unsqueeze(1)
    if out.dim() != 2 or out.shape[0] != batch:
        raise ValueError(
            f"the model must return logits of shape (batch, classes) = ({batch}, C) or ({batch},), got shape"
            f" {tuple(out.shape)}; pass output_fn= to map the output to one score per class, or wrap the model"
        )
    return out


def forward_logits(
    model: nn.Module, inputs: Union[torch.Tensor, ModelInputs], output_fn: Optional[OutputFn] = None
) -> torch.Tensor:
    """``model(inputs)`` as ``(batch, classes)`` scores (see :func:`model_scores`), one row per input."""
    batch = inputs.batch_size if isinstance(inputs, ModelInputs) else inputs.shape[0]
    return model_scores(run_forward(model, inputs), batch, output_fn)


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The selected logit of every row: ``logits[i, target[i]]``."""
    if target.is_inference():  # a target built under inference mode cannot be saved for backward
        target = target.clone()
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


_NO_GRAPH = (
    "the model's output does not depend on its input through autograd: does its forward run under"
    " torch.no_grad(), detach the input, or convert it to numpy?"
)


def input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    owned: bool = False,
    output_fn: Optional[OutputFn] = None,
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
        output_fn: see :func:`model_scores`.

    Returns:
        ``(gradients, resolved_target, logits)``, the gradients detached and shaped like ``inputs``.
    """
    # grad_ready copies: an inference tensor becomes a normal one and the caller's tensor is never touched
    leaf = inputs.detach().requires_grad_(True) if owned and not inputs.is_inference() else grad_ready(inputs)
    logits = forward_logits(model, leaf.clone(), output_fn)
    resolved = resolve_target(target, logits)
    score = target_scores(logits, resolved).sum()
    grads = torch.autograd.grad(score, leaf, allow_unused=True)[0] if score.requires_grad else None
    if grads is None:
        raise RuntimeError(_NO_GRAPH)
    return grads.detach(), resolved, logits.detach()


class Gradients(NamedTuple):
    """What :func:`gradients` returns."""

    #: one gradient per attributed leaf (in order), or the gradient with respect to the layer's output.
    grads: Union[list[torch.Tensor], torch.Tensor]
    target: torch.Tensor
    logits: torch.Tensor
    #: the layer's output in this forward (``None`` without a layer).
    layer_output: Optional[torch.Tensor]


def gradients(
    model: nn.Module,
    inputs: ModelInputs,
    target: Target,
    *,
    output_fn: Optional[OutputFn] = None,
    layer: Optional[tuple[nn.Module, str]] = None,
    layer_value: Optional[Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = None,
    owned: bool = False,
) -> Gradients:
    """:func:`input_gradients` for structured inputs and layers: each row's target score differentiated with respect
    to every attributed leaf of ``inputs``, or with ``layer=(module, name)`` with respect to that module's output.
    ``layer_value`` replaces the module's output in this forward (a path point), or, a function, maps it to its
    replacement (a noisy copy). ``owned``: the caller
    built the attributed leaves itself (no copy needed). Call it inside :meth:`Attribution.explaining`.
    """
    if layer is not None:
        from lightning_lens.attribution.layer import layer_hook

        with layer_hook(layer[0], layer[1], layer_value) as record:
            logits = forward_logits(model, inputs, output_fn)
        if record.output is None:
            raise ValueError(f"layer={layer[1]!r} did not run in the model's forward; pick a module the forward uses")
        resolved = resolve_target(target, logits)
        score = target_scores(logits, resolved).sum()
        grad = torch.autograd.grad(score, record.output, allow_unused=True)[0] if score.requires_grad else None
        if grad is None:
            raise RuntimeError(f"the model's output does not depend on the output of layer={layer[1]!r}")
        return Gradients(grad.detach(), resolved, logits.detach(), record.output.detach())
    if inputs.structure == "tensor" and not inputs.forward_kwargs:  # the common case: the single-tensor core
        grad, resolved, logits = input_gradients(model, inputs.leaves[0], target, owned=owned, output_fn=output_fn)
        return Gradients([grad], resolved, logits, None)
    leaves = [t.detach().requires_grad_(True) if owned else grad_ready(t) for t in inputs.attributed]
    logits = forward_logits(model, inputs.with_attributed([t.clone() for t in leaves]), output_fn)
    resolved = resolve_target(target, logits)
    score = target_scores(logits, resolved).sum()
    grads = torch.autograd.grad(score, leaves, allow_unused=True) if score.requires_grad else None
    if grads is None or all(g is None for g in grads):
        raise RuntimeError(_NO_GRAPH)
    out = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)]
    return Gradients(out, resolved, logits.detach(), None)


class WithDelta(NamedTuple):
    """An :meth:`Attribution._attribute` result that also carries a per-example error (IG's convergence delta)."""

    attributions: Any
    delta: torch.Tensor


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
    #: ``True`` when :meth:`_attribute` takes structured inputs: it then receives a :class:`ModelInputs` (also for a
    #: single tensor) and returns one attribution per attributed leaf (a list), or one tensor in layer mode.
    supports_structured: ClassVar[bool] = False
    #: ``True`` when the constructor takes ``layer=`` (attributions with respect to a module's output).
    supports_layer: ClassVar[bool] = False
    #: ``False`` for methods that need no floating-point input (attention rollout reads the model's attention, so
    #: token ids are fine): the "integer inputs" checks are skipped.
    needs_float_inputs: ClassVar[bool] = True
    #: ``(module, dotted name)`` of the explained layer (``layer=``), or None for input attributions.
    _layer: Optional[tuple[nn.Module, str]] = None

    def __init__(
        self, model: Optional[nn.Module], *, eval_mode: bool = True, output_fn: Optional[OutputFn] = None
    ) -> None:
        if self.requires_model and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module for {type(self).__name__}, got {type(model).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be a function of the model's output, got {type(output_fn).__name__}")
        self.model = model
        self.eval_mode = check_bool(eval_mode, "eval_mode")
        self.output_fn = output_fn

    def _set_layer(self, layer: Optional[LayerSpec]) -> None:
        """Resolve ``layer=`` (a module or dotted name) for a method that supports layer attribution."""
        from lightning_lens.attribution.layer import resolve_layer

        self._layer = None if layer is None else resolve_layer(self.model, layer)
        #: the explained module (``layer=``), or None
        self.layer: Optional[nn.Module] = None if self._layer is None else self._layer[0]

    def _elements_per_row(self, inputs: ModelInputs) -> int:
        """What one example counts against the element budget of the blocks: its input elements, plus with ``layer=``
        the elements of the layer's output (measured by a forward of one example, without gradients)."""
        elements = inputs.elements_per_row
        if self._layer is not None:
            from lightning_lens.attribution.layer import layer_output

            elements += layer_output(lambda: self.logits(inputs.rows(0, 1).cloned()), *self._layer)[0].numel()
        return elements

    def logits(self, inputs: Union[torch.Tensor, ModelInputs]) -> torch.Tensor:
        """The model's ``(batch, classes)`` scores on ``inputs`` through ``output_fn`` (see :func:`model_scores`)."""
        assert self.model is not None
        return forward_logits(self.model, inputs, self.output_fn)

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

    def attribute(
        self,
        inputs: Inputs,
        target: Target = None,
        *,
        abs: bool = False,
        forward_kwargs: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> Any:
        """Attributions for ``inputs`` (shape ``(B, ...)``) with respect to ``target``.

        Args:
            inputs: a floating-point batch; for methods with :attr:`supports_structured` also a tuple of tensors
                (``model(*inputs)``) or a dict of tensors (``model(**inputs)``). The result mirrors the structure:
                an attribution for every floating-point tensor, integer and boolean tensors returned unchanged. With
                ``layer=`` the result is one tensor shaped like the layer's output.
            target: an int, a 1-D tensor of ``B`` class indices, or ``None`` for the predicted classes.
            abs: return absolute values (signed by default).
            forward_kwargs: more keyword arguments for the model's forward, never attributed (tensors whose first
                dimension is the batch size follow the rows the method builds).
            options: the method's :attr:`call_options`, overriding the constructor's values for this call.

        Raises:
            TypeError: non-tensor or integer inputs (without ``layer=``), a non-bool ``abs``, or an option the method
                does not take.
        """
        structured = isinstance(inputs, (tuple, list, Mapping)) or forward_kwargs is not None
        if not self.supports_structured and structured:
            raise TypeError(
                f"{type(self).__name__} takes one floating-point tensor of inputs; tuple or dict inputs and"
                " forward_kwargs work with the gradient methods (gradient, gradient_x_input, smoothgrad, vargrad,"
                " integrated_gradients); or wrap the model so that it takes one tensor"
            )
        if isinstance(inputs, torch.Tensor) and not structured and self._layer is None and self.needs_float_inputs:
            if not inputs.is_floating_point():
                raise TypeError(self._no_float_message(inputs))
            inputs = check_inputs(inputs)
        elif not structured and not isinstance(inputs, torch.Tensor):
            inputs = check_inputs(inputs)  # the standard message for a wrong type
        absolute = check_bool(abs, "abs")
        resolved = self._resolve_options(options)
        if self.handles_abs:
            resolved["abs"] = absolute
        batch: Any = inputs
        try:
            with self.explaining():
                if self.supports_structured:
                    batch = ModelInputs.from_user(inputs, forward_kwargs)
                    if self._layer is None and self.needs_float_inputs and not any(batch.is_attributed):
                        raise TypeError(self._no_float_message(inputs))
                result = self._attribute(batch, target, **resolved)
        except ModelInputError as err:
            shape = batch.shape if isinstance(batch, ModelInputs) else tuple(batch.shape)
            if err.shape == shape or self.model is None:
                raise
            # the method ran the model on rows it built (noisy copies, path points): report the caller's inputs
            described = batch.describe() if isinstance(batch, ModelInputs) else str(shape)
            raise ModelInputError(
                shape, f"{err.reason} (on rows of shape {err.shape} built from inputs {described})",
                _expected_input(self.model, inputs),
            ) from err.__cause__
        delta = None
        if isinstance(result, WithDelta):
            result, delta = result.attributions, result.delta
        if isinstance(result, list):
            if absolute and not self.handles_abs:
                result = [a.abs() for a in result]
            result = batch.pack(result)
        elif absolute and not self.handles_abs:
            result = result.abs()
        return result if delta is None else (result, delta)

    def _no_float_message(self, inputs: Any) -> str:
        """The error for inputs with nothing to differentiate (token ids): name ``layer=`` and the embedding."""
        from lightning_lens.attribution.layer import find_embedding

        embedding = find_embedding(self.model)
        layer = f"layer={embedding!r} (the model's embedding module)" if embedding else "layer=<the embedding module>"
        how = (
            f"pass {layer} to {type(self).__name__}" if self.supports_layer
            else f"use a method that takes layer=, e.g. IntegratedGradients(model, {layer})"
        )
        leaves = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else [
            inputs
        ]
        dtypes = ", ".join(sorted({str(t.dtype) for t in leaves if isinstance(t, torch.Tensor)}))
        return (
            f"inputs must be a floating-point tensor or hold one, got dtype {dtypes}: integer inputs such as token ids"
            " cannot be differentiated, and converting them to float does not help. Explain the output of the embedding layer"
            f" instead: {how}"
        )

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
        output_fn: accepted as every method takes it; ``fn`` calls the model itself, :meth:`logits` applies it.

    Example:
        >>> def doubled(model, inputs, target):
        ...     return 2 * inputs
        >>> method = FunctionAttribution(None, doubled)
        >>> method.name, method.attribute(torch.ones(1, 2)).tolist()
        ('doubled', [[2.0, 2.0]])
    """

    requires_model = False

    def __init__(
        self,
        model: Optional[nn.Module],
        fn: ExplainFn,
        name: Optional[str] = None,
        *,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, output_fn=output_fn, eval_mode=eval_mode)
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
