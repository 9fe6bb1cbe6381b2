"""Grad-CAM (Selvaraju et al., 2017) and Guided Grad-CAM."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution._token_grid import check_token_grid, grid_shape, tokens_to_grid
from lightning_lens.attribution.base import (
    Attribution,
    OutputFn,
    Target,
    forward_logits,
    run_forward,
    target_scores,
)
from lightning_lens.attribution.guided import rule_gradients
from lightning_lens.utils import grad_ready, preserve_modes, resolve_module, resolve_target
from lightning_lens.utils.checks import check_bool

Layer = Union[nn.Module, str, None]
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def last_spatial_layer(model: nn.Module, inputs: torch.Tensor) -> tuple[str, nn.Module]:
    """The last submodule (in the order forwards finish) whose output is a 4-D ``(batch, channels, height, width)``
    tensor with more than one spatial position, found by one forward pass.

    Modules whose output is ``1 x 1`` (a global average pool, ``AdaptiveAvgPool2d(1)``) are skipped: a map at that
    resolution is one constant per image. The pass runs without grad in eval mode; hooks are removed and modes
    restored even if it raises.

    Raises:
        ValueError: no submodule has such an output (an MLP, a transformer): the message names ``layer``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> last_spatial_layer(net, torch.zeros(1, 1, 8, 8))[0]
        '0'
    """
    finished: list[tuple[str, nn.Module]] = []
    pooled: list[str] = []
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                (finished if output.shape[2] * output.shape[3] > 1 else pooled).append((name, module))

        return hook

    try:
        for name, module in model.named_modules():
            if module is not model:
                handles.append(module.register_forward_hook(make_hook(name)))
        with preserve_modes(model, mode=False), torch.no_grad():
            run_forward(model, inputs.detach().clone())  # a copy: the model may modify its input in place
    finally:
        for h in handles:
            h.remove()
    if not finished:
        found = (
            f" (only modules with a 1 x 1 spatial output, e.g. {pooled[-1][0]!r}, which would give a constant map)"
            if pooled
            else " (models such as an MLP or a transformer have none)"
        )
        raise ValueError(
            "layer=None looks for the last module with a 4-D (batch, channels, height, width) output larger than"
            f" 1 x 1, but the model has no such submodule{found}; pass layer=<module or dotted name> of a"
            " convolutional block explicitly, or use a method that needs no spatial layer (e.g. 'gradient')"
        )
    return finished[-1]


def _token_layout(output: torch.Tensor, batch: int, token_grid: Optional[tuple[int, int]],
                  prefix_tokens: Optional[int]) -> Optional[tuple[bool, int, int, int]]:
    """``(sequence_first, h, w, prefix)`` when ``output`` is a ``(B, N, D)`` (or ``(N, B, D)``) token tensor whose
    ``N`` fits a patch grid, else None."""
    if not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    if output.shape[0] == batch:
        sequence_first = False
    elif output.shape[1] == batch:  # nn.Transformer* modules with batch_first=False
        sequence_first = True
    else:
        return None
    try:
        h, w, prefix = grid_shape(int(output.shape[0 if sequence_first else 1]), token_grid, prefix_tokens)
    except ValueError:
        return None
    return sequence_first, h, w, prefix


def last_cam_layer(
    model: nn.Module,
    inputs: torch.Tensor,
    token_grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
    output_fn: Optional[OutputFn] = None,
) -> tuple[str, nn.Module]:
    """The default Grad-CAM layer: :func:`last_spatial_layer` for a convolutional network; for a vision transformer
    (modules with ``(B, N, D)`` token outputs that fit a patch grid run after the last spatial one) the last token
    layer whose patch tokens reach the predicted logits.

    Why not simply the last block's output: with a [CLS]-token head, the patch tokens after the last attention
    never reach the logits, so their gradient (and the map) is zero; the last layer where they still matter is the
    input of the last block's attention (pytorch-grad-cam's ``blocks[-1].norm1``). With a mean-pooled head it is the
    last block's (normalised) output. Found with one forward and one backward pass (eval mode, hooks removed and
    modes restored even if it raises); a module that runs more than once per forward is never picked.

    Example:
        >>> from lightning_lens.testing.models import TinyViT
        >>> last_cam_layer(TinyViT(image_size=8, patch_size=2, depth=2), torch.rand(1, 1, 8, 8))[0]
        'encoder.layers.1.norm1'
    """
    spatial: list[tuple[int, str, nn.Module]] = []
    tokens: list[tuple[int, str, nn.Module, torch.Tensor, tuple[bool, int, int, int]]] = []
    calls: dict[str, int] = {}
    handles = []
    batch = inputs.shape[0]

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            step = sum(calls.values())
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                spatial.append((step, name, module))
            elif inputs.dim() == 4 or token_grid is not None:
                layout = _token_layout(output, batch, token_grid, prefix_tokens)
                if layout is not None and output.requires_grad:
                    tokens.append((step, name, module, output, layout))

        return hook

    try:
        for name, module in model.named_modules():
            if module is not model:
                handles.append(module.register_forward_hook(make_hook(name)))
        with preserve_modes(model, mode=False), torch.enable_grad():
            logits = forward_logits(model, grad_ready(inputs).clone(), output_fn)
            tokens = [t for t in tokens if calls[t[1]] == 1 and (not spatial or t[0] > spatial[-1][0])]
            if tokens:
                score = target_scores(logits, logits.argmax(dim=1)).sum()
                grads = torch.autograd.grad(score, [t[3] for t in tokens], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        return last_spatial_layer(model, inputs)
    for (_, name, module, _, (sequence_first, _, _, prefix)), grad in reversed(list(zip(tokens, grads))):
        if grad is None:
            continue
        patches = grad[prefix:] if sequence_first else grad[:, prefix:]
        if bool(patches.ne(0).any()):
            return name, module
    raise ValueError(
        "layer=None: the model's token layers have no patch tokens that reach the logits; pass layer=<module or"
        " dotted name> of a transformer block explicitly"
    )


class GradCAM(Attribution):
    """Grad-CAM: ``ReLU(sum_k alpha_k A^k)`` with ``alpha_k`` the spatial mean of ``dS_c/dA^k`` at a layer.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017.
    Returns ``(B, 1, H, W)``: upsampled to the input's spatial size (bilinear, ``align_corners=False``), or at the
    layer's resolution with ``upsample=False``. Values keep their raw scale (no per-image normalisation).

    Args:
        model: the classifier.
        layer: the layer whose output ``A`` is used: a module, a dotted name (``"features.7"``), or ``None`` for the
            last module whose output is 4-D with more than one spatial position (a global-average-pool head is
            skipped), found with one forward pass on the first call (and kept in :attr:`layer_name`). The layer must
            run exactly once per forward.
        upsample: return maps at the input resolution (default) rather than the layer's.
        relu: apply the paper's final ReLU (default ``True``; ``False`` keeps negative evidence, as Captum's default).
        token_grid: for a vision transformer, ``(h, w)`` of the patch grid: a layer output of ``(B, N, D)`` tokens
            (or ``(N, B, D)``) becomes ``(B, D, h, w)`` after dropping the prefix tokens. Token outputs of image
            models are reshaped automatically when ``N - prefix`` is a perfect square for ``prefix`` 0 or 1 ([CLS]);
            other shapes raise a ``ValueError`` asking for ``token_grid``/``prefix_tokens``.
        prefix_tokens: tokens in front of the patches ([CLS], distillation, register tokens).
        eval_mode, output_fn: see :class:`~lightning_lens.attribution.base.Attribution`.

    With ``layer=None`` on a vision transformer the layer is found by :func:`last_cam_layer` (the last token layer
    whose patch tokens reach the logits).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                             torch.nn.Linear(72, 3))
        >>> GradCAM(model).attribute(torch.randn(2, 1, 8, 8), target=0).shape
        torch.Size([2, 1, 8, 8])
        >>> from lightning_lens.testing.models import TinyViT
        >>> vit = TinyViT(image_size=8, patch_size=2)  # 16 patches and a [CLS] token
        >>> GradCAM(vit, layer="encoder.layers.0", upsample=False).attribute(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 1, 4, 4])
    """

    name = "gradcam"
    produces_map = True

    def __init__(
        self,
        model: nn.Module,
        layer: Layer = None,
        upsample: bool = True,
        relu: bool = True,
        token_grid: Optional[tuple[int, int]] = None,
        prefix_tokens: Optional[int] = None,
        *,
        eval_mode: bool = True,
        output_fn: Optional[OutputFn] = None,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        check_token_grid(token_grid, prefix_tokens)
        self.token_grid = None if token_grid is None else tuple(token_grid)
        self.prefix_tokens = prefix_tokens
        self.layer: Optional[nn.Module] = None if layer is None else resolve_module(model, layer, "layer")
        self.layer_name: Optional[str] = None
        if self.layer is not None:
            self.layer_name = next(n for n, m in model.named_modules() if m is self.layer)
        self.upsample = check_bool(upsample, "upsample")
        self.relu = check_bool(relu, "relu")

    def _resolve_layer(self, inputs: torch.Tensor) -> nn.Module:
        if self.layer is None:
            self.layer_name, self.layer = last_cam_layer(
                self.model, inputs, self.token_grid, self.prefix_tokens, self.output_fn
            )
        return self.layer

    call_options = ("upsample",)

    def _check_option(self, key: str, value: object) -> object:
        return check_bool(value, "upsample")

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        upsample: Optional[bool] = None,
    ) -> torch.Tensor:
        """Grad-CAM maps ``(B, 1, H, W)`` (or the layer's spatial size with ``upsample=False``).

        Args:
            inputs: a floating-point batch ``(B, C, H, W)``.
            target: an int, ``B`` class indices, or ``None`` for the predicted classes.
            abs: absolute values (only changes anything with ``relu=False``).
            upsample: override the constructor's ``upsample`` for this call.
        """
        return super().attribute(inputs, target, abs=abs, upsample=upsample)

    def _attribute(  # type: ignore[override]
        self, inputs: torch.Tensor, target: Target, *, upsample: bool
    ) -> torch.Tensor:
        return self.cam(inputs, target, upsample)[0]

    def cam(self, inputs: torch.Tensor, target: Target, upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps, resolved_target)``; call inside :meth:`explaining`."""
        layer = self._resolve_layer(inputs)
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor; pick a layer whose"
                    " output is one (batch, channels, *spatial) tensor"
                )
            captured.append(output)
            # downstream layers get a copy, so an in-place op after the layer cannot alter the captured activation
            return output.clone()

        handle = layer.register_forward_hook(hook)
        try:
            # the input requires grad so the activation is in the graph even when the layers before it are frozen
            logits = forward_logits(self.model, grad_ready(inputs).clone(), self.output_fn)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"layer {self.layer_name!r} ran {len(captured)} times in one forward pass; Grad-CAM needs a layer"
                " that runs exactly once"
            )
        activation = captured[0]
        tokens = activation.dim() == 3 and (
            inputs.dim() == 4 or self.token_grid is not None or self.prefix_tokens is not None
        )
        if activation.dim() < 3:
            raise ValueError(
                f"layer {self.layer_name!r} outputs shape {tuple(activation.shape)}; Grad-CAM needs a"
                " (batch, channels, *spatial) activation, e.g. the last convolutional block"
            )
        if not activation.requires_grad:
            raise RuntimeError(f"the output of layer {self.layer_name!r} does not depend on the input through autograd")
        resolved = resolve_target(target, logits)
        (grads,) = torch.autograd.grad(target_scores(logits, resolved).sum(), activation, allow_unused=True)
        if grads is None:
            raise ValueError(
                f"the model's output does not depend on the output of layer {self.layer_name!r}; pick a layer on the"
                " path from the input to the logits"
            )
        activation = activation.detach()
        if tokens:
            activation, grads = self._token_grid(activation, inputs.shape[0]), self._token_grid(grads, inputs.shape[0])
        spatial_dims = tuple(range(2, activation.dim()))
        cam = self.combine(grads, activation)
        if self.relu:
            cam = cam.clamp(min=0)
        if upsample:
            size = inputs.shape[2:]
            if len(size) != len(spatial_dims):
                raise ValueError(
                    f"cannot upsample a map of spatial shape {tuple(cam.shape[2:])} to inputs of shape"
                    f" {tuple(inputs.shape)}; pass upsample=False"
                )
            cam = F.interpolate(cam, size=tuple(size), mode=_INTERPOLATION[len(size)], align_corners=False)
        return cam, resolved


    def _token_grid(self, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B, N, D)`` (or ``(N, B, D)``) tokens of the layer as ``(B, D, h, w)`` patch features."""
        if tokens.shape[0] != batch and tokens.shape[1] == batch:
            tokens = tokens.transpose(0, 1)
        if tokens.shape[0] != batch:
            raise ValueError(
                f"layer {self.layer_name!r} outputs shape {tuple(tokens.shape)}, which has no batch dimension of"
                f" size {batch} first or second; pick a layer whose output is (batch, tokens, features)"
            )
        try:
            h, w, prefix = grid_shape(tokens.shape[1], self.token_grid, self.prefix_tokens)
        except ValueError as err:
            raise ValueError(f"layer {self.layer_name!r} outputs {tuple(tokens.shape)} (batch, tokens, features): {err}"
                             ) from None
        return tokens_to_grid(tokens, h, w, prefix)

    def combine(self, grads: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """``sum_k alpha_k A^k`` with ``alpha_k`` the spatial mean of the gradient (the Grad-CAM weighting)."""
        alpha = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
        return (alpha * activation).sum(dim=1, keepdim=True)


class HiResCAM(GradCAM):
    """HiResCAM: ``ReLU(sum_k dS_c/dA^k * A^k)``, the gradient times the activation element-wise, summed over channels.

    Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional neural networks",
    2020. Grad-CAM averages each channel's gradient over space, so a channel that responds to a small region and to
    a large one spreads its weight over both; HiResCAM keeps the gradient's location, and for a model whose head is
    linear on the flattened layer output its map sums exactly to the target score (before the ReLU). Arguments and
    output as :class:`GradCAM`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                             torch.nn.Linear(72, 3))
        >>> HiResCAM(model).attribute(torch.randn(2, 1, 8, 8), target=0).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "hirescam"

    def combine(self, grads: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        return (grads * activation).sum(dim=1, keepdim=True)


class GuidedGradCAM(Attribution):
    """Guided Grad-CAM: Guided Backprop times the upsampled Grad-CAM map, broadcast over channels.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017.
    Output has the input's shape. Arguments as :class:`GradCAM` (the map is always upsampled); for a vision
    transformer, ``token_grid`` / ``prefix_tokens`` place the layer's patch tokens on their grid, and the upsampled
    token-grid CAM multiplies the guided backpropagation at the input pixels (a transformer with GELUs and no ReLU
    gets the plain input gradient there, with a warning).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                             torch.nn.Linear(72, 3))
        >>> GuidedGradCAM(model).attribute(torch.randn(2, 1, 8, 8), target=0).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "guided_gradcam"

    def __init__(
        self,
        model: nn.Module,
        layer: Layer = None,
        relu: bool = True,
        token_grid: Optional[tuple[int, int]] = None,
        prefix_tokens: Optional[int] = None,
        *,
        eval_mode: bool = True,
        output_fn: Optional[OutputFn] = None,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self.gradcam = GradCAM(model, layer=layer, upsample=True, relu=relu, token_grid=token_grid,
                               prefix_tokens=prefix_tokens, eval_mode=eval_mode, output_fn=output_fn)

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        cam, resolved = self.gradcam.cam(inputs, target, upsample=True)
        guided, _ = rule_gradients(self.model, inputs, resolved, "guided", self.output_fn)
        return guided * cam
