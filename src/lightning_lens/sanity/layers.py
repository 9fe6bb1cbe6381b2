"""The layers a randomization test walks through, and their re-initialization.

**Layers.** By default a layer is a module that owns parameters directly, and layers are ordered by *execution*:
one forward pass (no grad, eval mode) records the order in which modules start running
(:func:`lightning_lens.utils.modules_in_execution_order`), so a model whose modules are registered in another order
than they run is still randomized from the output side down. Two refinements make every parameter belong to one
layer:

* a module that owns parameters but never runs as a module (``nn.MultiheadAttention``'s ``out_proj``, whose weight
  the attention forward uses functionally) joins the layer of its nearest ancestor that runs;
* parameters owned directly by the root model (a ViT's ``pos_embed`` or ``cls_token``) form a layer named
  ``"<root>"`` placed first (input side), since they are typically used on the input.

Modules under the root that never run contribute nothing to the output and are skipped (reported by name).

Users can instead name blocks (``layers=["features", "classifier"]``, as the paper used Inception's blocks); a
block's layer holds every parameter below it. Blocks must not overlap; they are ordered by execution as well.

**Re-initialization** (:func:`reinitialize_`) re-draws every parameter of a layer from its initializer:

* modules with ``reset_parameters()`` (every torch layer) call it; ``nn.MultiheadAttention``'s private
  ``_reset_parameters()`` re-draws its in-projection (``in_proj_weight`` or ``q/k/v_proj_weight``), ``in_proj_bias``,
  ``bias_k``/``bias_v``; children are reset before their parents, as in ``__init__``;
* normalization layers follow the ``batchnorm`` policy: ``"keep"`` (Adebayo et al.'s code) re-draws only the affine
  parameters (weight 1, bias 0, torch's initializer) and keeps the trained running statistics; ``"reset"`` (Quantus)
  also resets running mean/variance to 0/1 and the batch counter;
* a parameter that no reset touched (detected by its version counter: a bare ``nn.Parameter`` of a custom module,
  a ``reset_parameters`` that forgets one) is re-drawn from ``N(0, rms^2)``, ``rms`` being the root mean square of
  its trained values (0.02, timm's embedding scale, when those are all zero): the scale is kept, the learned
  structure is not. Pass ``init_fn`` to use another rule.

All randomness comes from a private ``torch.Generator``. Since ``reset_parameters`` draws from torch's global RNG,
each call runs inside ``torch.random.fork_rng`` seeded from the private generator: the caller's global RNG state is
the same afterwards.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar, Union

import torch
from torch import nn

from lightning_lens.utils import modules_in_execution_order, resolve_module

__all__ = [
    "BatchNormPolicy",
    "InitFn",
    "Layer",
    "ExecutionRecorder",
    "find_layers",
    "layers_in_order",
    "reinitialize_",
    "scale_matched_normal_",
    "in_fast_layout",
    "to_fast_layout_",
]

log = logging.getLogger(__name__)
BatchNormPolicy = Literal["keep", "reset"]
T = TypeVar("T")
#: run private model copies in the fastest memory layout (see :func:`to_fast_layout_`); ``False`` for the default one
FAST_LAYOUT = True
#: ``init_fn(name, parameter, generator)`` re-draws ``parameter`` in place (under ``torch.no_grad()``).
InitFn = Callable[[str, nn.Parameter, torch.Generator], None]
ROOT = "<root>"
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Layer:
    """One unit of randomization.

    Attributes:
        name: the module's dotted name (``"<root>"`` for the root model's own parameters).
        modules: ``(name, module)`` of every module whose parameters or statistics the layer re-initializes.
        parameters: ``(name, parameter)`` of every parameter the layer re-draws (full dotted names).
        fallback: names of the parameters the last :func:`reinitialize_` re-drew with the fallback rule.
    """

    name: str
    modules: list[tuple[str, nn.Module]]
    parameters: list[tuple[str, nn.Parameter]]
    fallback: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, {len(self.parameters)} parameters)"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for _, p in self.parameters)

    def state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, saved copy) of every parameter and normalization buffer the layer can change."""
        tensors = [p for _, p in self.parameters]
        for _, m in self.modules:
            if isinstance(m, _NORM_TYPES):
                tensors.extend(b for b in m.buffers(recurse=False))
        return [(t, t.detach().clone()) for t in tensors]


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def find_layers(
    model: nn.Module,
    inputs: Any,
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    output: Optional[list] = None,
) -> tuple[list[Layer], list[str]]:
    """The model's layers from the input side to the output side, and the names of modules skipped (never run).

    Args:
        model: the model (usually the deep copy that will be randomized).
        inputs: one input batch, or a tuple of positional inputs, for the discovery forward pass.
        layers: names (or modules) of blocks to use instead of the parameter-owning modules.
        output: a list to append the model's output of the discovery pass to (eval mode, no grad).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> [l.name for l in find_layers(net, torch.zeros(1, 1, 4, 4))[0]]
        ['0', '3']
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    outputs: list[Any] = []
    # the same pass also records the model's output, so callers need no second forward for the predictions
    handle = model.register_forward_hook(lambda module, inp, out: outputs.append(out) if not outputs else None)
    try:
        order = modules_in_execution_order(model, *args)
    finally:
        handle.remove()
    if output is not None and outputs:
        output.append(outputs[0])
    return layers_in_order(model, order, layers)


def layers_in_order(
    model: nn.Module,
    order: Sequence[tuple[str, nn.Module]],
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
) -> tuple[list[Layer], list[str]]:
    """:func:`find_layers` from an execution order already recorded (``(name, module)`` of the submodules in the
    order their forward first ran, as :func:`~lightning_lens.utils.modules_in_execution_order` or
    :class:`ExecutionRecorder` return it), without another forward pass.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
        >>> [l.name for l in layers_in_order(net, [("3", net[3]), ("0", net[0])])[0]]
        ['3', '0']
    """
    rank = {id(m): i for i, (_, m) in enumerate(order)}
    executed = {name for name, _ in order}
    named = dict(model.named_modules())
    if layers is not None:
        return _named_blocks(model, layers, named, rank), []

    anchors: dict[str, list[str]] = {}  # executed module name (or "" for the root) -> param-owning module names
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not _owns_parameters(module):
            continue
        anchor = name
        while anchor and anchor not in executed:
            anchor = _parent(anchor)
        if anchor == "" and name != "":
            skipped.append(name)  # nothing above it ran: it cannot affect the output
            continue
        anchors.setdefault(anchor, []).append(name)

    result: list[Layer] = []
    seen: set[int] = set()
    for anchor in sorted(anchors, key=lambda a: -1 if a == "" else rank[id(named[a])]):
        names = sorted(anchors[anchor], key=lambda n: -n.count("."))  # children before parents
        params: list[tuple[str, nn.Parameter]] = []
        for n in names:
            for pname, p in named[n].named_parameters(recurse=False):
                if id(p) in seen:
                    warnings.warn(f"parameter {n + '.' + pname if n else pname} is shared with an earlier layer;"
                                  " it is randomized with the layer that reaches it first", stacklevel=3)
                    continue
                seen.add(id(p))
                params.append((f"{n}.{pname}" if n else pname, p))
        result.append(Layer(anchor or ROOT, [(n, named[n]) for n in names], params))
    return result, skipped


def _named_blocks(
    model: nn.Module, layers: Sequence[Union[str, nn.Module]], named: dict[str, nn.Module], rank: dict[int, int]
) -> list[Layer]:
    if isinstance(layers, (str, nn.Module)) or not len(layers):
        raise ValueError("layers must be a non-empty list of module names or modules, e.g. ['features', 'classifier']")
    name_of = {id(m): n for n, m in named.items()}
    blocks: list[tuple[str, nn.Module]] = []
    for entry in layers:
        module = resolve_module(model, entry, argument="layers")
        blocks.append((name_of[id(module)], module))
    owner: dict[int, str] = {}
    result = []
    for bname, block in blocks:
        modules = [(f"{bname}.{n}" if n and bname else (n or bname), m) for n, m in block.named_modules()]
        params = [(f"{bname}.{n}" if bname else n, p) for n, p in block.named_parameters()]
        if not params:
            raise ValueError(f"layers: block {bname!r} has no parameters to randomize")
        for _, p in params:
            if id(p) in owner:
                raise ValueError(f"layers: blocks {owner[id(p)]!r} and {bname!r} overlap; name disjoint blocks")
            owner[id(p)] = bname
        ran = [rank[id(m)] for _, m in modules if id(m) in rank]
        if not ran:
            raise ValueError(f"layers: block {bname!r} never runs in the model's forward; it cannot be randomized")
        modules.sort(key=lambda nm: -nm[0].count("."))
        result.append((min(ran), Layer(bname or ROOT, modules, params)))
    result.sort(key=lambda t: t[0])
    return [layer for _, layer in result]


class ExecutionRecorder:
    """Records, during the first forward pass of ``model`` on exactly ``inputs``, the order in which its submodules
    start running and the model's output: the discovery pass of :func:`find_layers` folded into a forward the caller
    runs anyway (a randomization test's first explanation), which saves one forward pass.

    Inside ``with recorder:`` hooks watch every forward of ``model``; the first root forward decides: if its only
    argument equals ``inputs`` (same shape and values) and every module is in eval mode (the state of the discovery
    pass), :attr:`order` and :attr:`output` are set; any other call (a path point, a noisy copy, train mode) leaves
    them ``None`` and the caller falls back to :func:`find_layers`. Later forwards are ignored; the hooks are removed
    on exit.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
        >>> x = torch.ones(4, 2)
        >>> with ExecutionRecorder(net, x) as rec:
        ...     _ = net(x.clone())
        >>> [name for name, _ in rec.order], tuple(rec.output.shape)
        (['0', '1', '2'], (4, 2))
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor) -> None:
        self.model = model
        self.inputs = inputs
        #: ``(name, module)`` in execution order, or ``None`` if no matching forward ran
        self.order: Optional[list[tuple[str, nn.Module]]] = None
        #: the model's output of that forward, detached, or ``None``
        self.output: Any = None
        self._calls = 0  # root forwards started
        self._pending: list[tuple[str, nn.Module]] = []
        self._seen: set[int] = set()
        self._handles: list[Any] = []

    def _matches(self, args: tuple) -> bool:
        x = self.inputs
        return (len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].shape == x.shape
                and args[0].dtype == x.dtype and args[0].device == x.device and torch.equal(args[0].detach(), x)
                and not any(m.training for m in self.model.modules()))

    def __enter__(self) -> "ExecutionRecorder":
        def root_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._calls += 1
            if self._calls == 1 and not kwargs and self._matches(args):
                self._recording = True

        def root_post(module: nn.Module, args: tuple, output: Any) -> None:
            if self._calls == 1 and getattr(self, "_recording", False):
                self._recording = False
                self.order = list(self._pending)
                self.output = output.detach() if isinstance(output, torch.Tensor) else output

        def make_pre(name: str) -> Callable[..., None]:
            def pre(module: nn.Module, args: Any) -> None:
                if getattr(self, "_recording", False) and id(module) not in self._seen:
                    self._seen.add(id(module))
                    self._pending.append((name, module))

            return pre

        self._recording = False
        try:
            self._handles.append(self.model.register_forward_pre_hook(root_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(root_post))
            # the modules modules_in_execution_order watches, in the same registration order
            for name, module in self.model.named_modules():
                if module is not self.model:
                    self._handles.append(module.register_forward_pre_hook(make_pre(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._recording = False


# ---------------------------------------------------------------------------------------------------------- layout
def to_fast_layout_(model: nn.Module, inputs: Any, channels_last: bool = True) -> bool:
    """Put a private model copy in the memory layout its explanations run fastest in; whether it is channels-last.

    On CPU, convolutions and max-pooling of ``(B, C, H, W)`` batches run 1.5-2x faster (max-pooling ~10x) in the
    channels-last layout than in the default one, which a randomization test, explaining the inputs once per stage,
    pays at every stage. Only the layout changes: the values and the logical order of every tensor are the same,
    the parameters stay the same objects, and ``reset_parameters`` draws the same logical values. The explanations
    differ from the default layout's only by float rounding (other kernels). Applied to CPU models with a
    ``Conv2d`` explaining 4-D inputs; ``channels_last=False`` restores the default layout (for a model whose forward
    cannot run channels-last, e.g. one calling ``.view`` on feature maps).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        >>> to_fast_layout_(net, torch.zeros(1, 2, 4, 4)), net[0].weight.is_contiguous()
        (True, False)
        >>> to_fast_layout_(net, torch.zeros(1, 2, 4, 4), channels_last=False), net[0].weight.is_contiguous()
        (False, True)
    """
    if not channels_last:
        model.to(memory_format=torch.contiguous_format)
        return False
    wanted = (
        isinstance(inputs, torch.Tensor)
        and inputs.dim() == 4
        and inputs.device.type == "cpu"
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
        # a lazy module's parameters only exist after the first forward
        and not any(nn.parameter.is_lazy(t) for t in (*model.parameters(), *model.buffers()))
    )
    if wanted:
        model.to(memory_format=torch.channels_last)
    return wanted


def in_fast_layout(model: nn.Module, inputs: Any, first_step: Callable[[], T]) -> T:
    """Put a private copy in the fast layout (:func:`to_fast_layout_`, if :data:`FAST_LAYOUT`) and run the first step
    of a test on it (the forward and explanations that every later step repeats); if that step raises a
    ``RuntimeError`` in the channels-last layout (a forward calling ``.view`` on feature maps), restore the default
    layout and run it again there. ``first_step`` must leave the copy as it found it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        >>> x = torch.zeros(1, 2, 4, 4)
        >>> in_fast_layout(net, x, lambda: net(x).shape), net[0].weight.is_contiguous()
        (torch.Size([1, 3]), False)
    """
    fast = to_fast_layout_(model, inputs, FAST_LAYOUT)
    try:
        return first_step()
    except RuntimeError as err:
        if not fast:
            raise
        log.debug("the model copy fails in the channels-last layout (%s); using the default layout", err)
        to_fast_layout_(model, inputs, channels_last=False)
        return first_step()


# ------------------------------------------------------------------------------------------------- re-initialization
def scale_matched_normal_(name: str, param: nn.Parameter, generator: torch.Generator) -> None:
    """Fallback init: ``N(0, rms^2)`` with ``rms`` the root mean square of the current values (0.02 if zero)."""
    with torch.no_grad():
        rms = float(param.detach().double().square().mean().sqrt()) if param.numel() else 0.0
        std = rms if rms > 0 and math.isfinite(rms) else 0.02
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32, device="cpu")
        param.copy_((noise * std).to(param.dtype))


def _seed_global_rng(seed: int, device_indices: Sequence[int]) -> None:
    """Seed torch's global CPU generator and those of the given CUDA devices (inside ``torch.random.fork_rng``)."""
    torch.default_generator.manual_seed(seed)
    for idx in device_indices:
        torch.cuda.default_generators[idx].manual_seed(seed)


def _reset_module(module: nn.Module, batchnorm: str) -> None:
    if isinstance(module, nn.modules.batchnorm._NormBase):
        if batchnorm == "reset":
            module.reset_parameters()  # running stats 0/1, counter 0, affine 1/0
        elif module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        return
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        reset = getattr(module, "_reset_parameters", None)  # nn.MultiheadAttention and some third-party layers
    if callable(reset):
        reset()


def reinitialize_(
    layer: Layer,
    generator: torch.Generator,
    batchnorm: BatchNormPolicy = "keep",
    init_fn: Optional[InitFn] = None,
) -> None:
    """Re-draw every parameter of ``layer`` in place (see the module docstring); ``layer.fallback`` lists the
    parameters no module's reset covered.

    Args:
        layer: from :func:`find_layers`.
        generator: private CPU generator all randomness is drawn from.
        batchnorm: ``"keep"`` running statistics or ``"reset"`` them.
        init_fn: rule for parameters no reset method covers (default :func:`scale_matched_normal_`).
    """
    if batchnorm not in ("keep", "reset"):
        raise ValueError(f"batchnorm must be 'keep' (trained running statistics) or 'reset', got {batchnorm!r}")
    init_fn = init_fn or scale_matched_normal_
    versions = {id(p): p._version for _, p in layer.parameters}
    devices = sorted({p.device.index or 0 for _, p in layer.parameters if p.device.type == "cuda"})
    # one fork of the global RNG for the whole layer (saving and restoring its state costs more than a small
    # layer's reset); each module still draws from its own seed, so the values do not depend on the grouping
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for _, module in layer.modules:
            _seed_global_rng(int(torch.randint(0, 2**62, (1,), generator=generator)), devices)
            _reset_module(module, batchnorm)
        layer.fallback = []
        for name, p in layer.parameters:
            if p._version == versions[id(p)]:
                init_fn(name, p, generator)
                layer.fallback.append(name)
