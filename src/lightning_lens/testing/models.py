"""Tiny models for tests, examples and users' own checks: the demo CNN and toy models with hand-computable answers.

The toy models reproduce the analytic fixtures that Captum's test-suite uses (``captum/testing/helpers/
basic_models.py``), so our methods can be checked against the same published numbers. Every toy model has fixed
weights: no randomness, no seed needed.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.utils.checks import check_choice, check_int

__all__ = [
    "DifferenceReLUModel",
    "LinearModel",
    "MixedReLUModel",
    "MultiLayerModel",
    "OneConvReLUModel",
    "OneMinusReLUModel",
    "SmallCNN",
    "TabularMLP",
    "TinyTextTransformer",
    "TinyViT",
]


class SmallCNN(nn.Module):
    """The demo CNN: four 3x3 convolutions (padding 1) each followed by ``nn.ReLU``, max-pooling after the 2nd and 4th.

    Layout (``width=w``)::

        features:   0 conv(in, w)   1 ReLU  2 conv(w, w)   3 ReLU  4 MaxPool2d(2)
                    5 conv(w, 2w)   6 ReLU  7 conv(2w, 2w) 8 ReLU  9 MaxPool2d(2)
        classifier: 0 Flatten  1 Linear(2w * (s/4)^2, hidden)  2 ReLU  3 Linear(hidden, num_classes)

    ``features.8`` is the last convolutional activation (the usual Grad-CAM layer); ``features.9`` is the last module
    with a 4-D output. The classifier is sized for square inputs of side ``input_size`` (default 32, a multiple of 4);
    other sizes raise a clear error instead of a shape mismatch deep inside ``Linear``.

    Args:
        in_channels: input channels (1 for SpuriousDigits, 3 for RGB).
        num_classes: number of output logits.
        width: channels of the first two convolutions (the last two have ``2 * width``).
        input_size: side of the square inputs the classifier is sized for.
        hidden: units of the hidden linear layer.
        inplace: build the ReLUs with ``inplace=True`` (to test attribution methods against inplace activations).

    Example:
        >>> net = SmallCNN(in_channels=1, num_classes=10)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        input_size: int = 32,
        hidden: int = 64,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        check_int(in_channels, "in_channels", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        check_int(width, "width", minimum=1)
        check_int(hidden, "hidden", minimum=1)
        if check_int(input_size, "input_size", minimum=1) % 4:
            raise ValueError(f"input_size must be a multiple of 4 (two 2x2 poolings), got {input_size}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * side * side, hidden),
            nn.ReLU(inplace=inplace),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"SmallCNN expects inputs of shape (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}; set in_channels/input_size to match your data"
            )
        return self.classifier(self.features(x))


class LinearModel(nn.Module):
    """``logits = W flatten(x) + b``: every gradient method has a closed form (the gradient of class c is ``W[c]``).

    Args:
        in_features: number of input features after flattening (e.g. ``C * H * W``).
        num_classes: number of outputs.
        weight: optional ``(num_classes, in_features)`` weight; default ``W[c, i] = (c + 1) * (i + 1) / in_features``
            (deterministic, distinct per class).
        bias: optional ``(num_classes,)`` bias; default zeros.

    Example:
        >>> m = LinearModel(4, 2)
        >>> m.linear.weight.tolist()
        [[0.25, 0.5, 0.75, 1.0], [0.5, 1.0, 1.5, 2.0]]
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        check_int(in_features, "in_features", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        self.linear = nn.Linear(in_features, num_classes)
        with torch.no_grad():
            if weight is None:
                rows = torch.arange(1, num_classes + 1, dtype=torch.float32)[:, None]
                cols = torch.arange(1, in_features + 1, dtype=torch.float32)[None, :]
                weight = rows * cols / in_features
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if tuple(weight.shape) != (num_classes, in_features):
                raise ValueError(f"weight must have shape {(num_classes, in_features)}, got {tuple(weight.shape)}")
            self.linear.weight.copy_(weight)
            bias = torch.zeros(num_classes) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
            if tuple(bias.shape) != (num_classes,):
                raise ValueError(f"bias must have shape {(num_classes,)}, got {tuple(bias.shape)}")
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class OneConvReLUModel(nn.Module):
    """Captum's ``BasicModel_ConvNet_One_Conv``: conv(1->2, 3x3, all-ones weights, bias -50/-75), ReLU, fc(8->4), ReLU.

    ``fc1`` weights are ``+1`` for the first five flattened features and ``-1`` for the last three, bias 0. Input
    ``(B, 1, 4, 4)``, output ``(B, 4)`` (all four outputs equal). Published oracles for
    ``x = torch.arange(16.).view(1, 1, 4, 4)``, target 0 (Captum ``tests/attr``):

    - forward: every output is 54 (``relu1`` = ``[[0, 4], [31, 40]]`` and ``[[0, 0], [6, 15]]``);
    - Guided Backprop: ``[[0, 1, 1, 1], [1, 3, 3, 2], [1, 3, 3, 2], [1, 2, 2, 1]]``;
    - Deconvnet: ``[[2, 3, 3, 1], [3, 5, 5, 2], [3, 5, 5, 2], [1, 2, 2, 1]]``;
    - Grad-CAM at ``conv1`` (no upsampling, no final ReLU in Captum's test): ``[[11.25, 13.5], [20.25, 22.5]]``;
      at ``relu1``: ``[[0, 4], [28, 32.5]]``.

    Args:
        inplace: build both ReLUs with ``inplace=True``.

    Example:
        >>> OneConvReLUModel()(torch.arange(16.0).view(1, 1, 4, 4)).tolist()
        [[54.0, 54.0, 54.0, 54.0]]
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.ones(2, 1, 3, 3))
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        return self.relu2(self.fc1(x.reshape(x.shape[0], 8)))


class OneMinusReLUModel(nn.Module):
    """Captum's ``BasicModel``: ``f(x) = 1 - relu(1 - x)``, elementwise; output has the input's shape.

    Oracle: for ``x = [1, 2, 3, 0, -1, 7]`` the gradient of ``f(x).sum()`` is ``[0, 0, 0, 1, 1, 0]``
    (``relu'(0) = 0``).

    Example:
        >>> OneMinusReLUModel()(torch.tensor([[0.5, 3.0]])).tolist()
        [[0.5, 1.0]]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - F.relu(1 - x)


class DifferenceReLUModel(nn.Module):
    """Captum's ``BasicModel2`` with its two inputs as two features: ``f(x) = relu(relu(x0) - 1 - relu(x1))``.

    Input ``(B, 2)``, output ``(B, 1)``. Oracle: Integrated Gradients at ``x = (3, 1)`` with a zero baseline is
    ``[1.5, -0.5]`` (completeness: ``f(x) - f(0) = 1``).

    Example:
        >>> DifferenceReLUModel()(torch.tensor([[3.0, 1.0]])).tolist()
        [[1.0]]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"DifferenceReLUModel expects inputs of shape (B, 2), got {tuple(x.shape)}")
        return F.relu(F.relu(x[:, :1]) - 1 - F.relu(x[:, 1:]))


class MultiLayerModel(nn.Module):
    """Captum's ``BasicModel_MultiLayer``: linear(3->4, ones, bias [-10, 1, 1, 1]), ReLU, linear(4->2, ones, bias -1).

    Input ``(B, 3)``, output ``(B, 2)``. Oracle: Occlusion of single features with baseline 0 at
    ``x = [20, 50, 30]``, target 0, gives ``[80, 200, 120]`` (each feature removes 4x its value from the logit).

    Example:
        >>> MultiLayerModel()(torch.tensor([[20.0, 50.0, 30.0]])).tolist()
        [[392.0, 392.0]]
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.relu = nn.ReLU(inplace=inplace)
        self.linear2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.linear1.weight.fill_(1.0)
            self.linear1.bias.copy_(torch.tensor([-10.0, 1.0, 1.0, 1.0]))
            self.linear2.weight.fill_(1.0)
            self.linear2.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(x)))


class MixedReLUModel(nn.Module):
    """An MLP whose four ReLUs are written four different ways, to test hook-based ReLU rules (Guided Backprop, ...).

    ``relu_style="mixed"`` (default) uses, in order: ``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.relu`` and
    ``Tensor.relu``. ``relu_style="modules"`` uses four ``nn.ReLU()`` modules instead. Both styles share the same
    fixed weights, so any method must give identical attributions for the two: that is the oracle.

    Layers: ``(B, 4) -> 6 -> 6 -> 6 -> 6 -> 3`` with a ReLU after each of the first four; the weights are
    ``sin`` patterns with both signs (so some units are inactive for typical inputs and the ReLU rules matter).

    Example:
        >>> x = torch.linspace(-1, 1, 8).view(2, 4)
        >>> torch.equal(MixedReLUModel("mixed")(x), MixedReLUModel("modules")(x))
        True
    """

    def __init__(self, relu_style: str = "mixed") -> None:
        super().__init__()
        check_choice(relu_style, "relu_style", ("mixed", "modules"))
        self.relu_style = relu_style
        sizes = [(4, 6), (6, 6), (6, 6), (6, 6), (6, 3)]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                o, i = layer.weight.shape
                grid = torch.arange(o * i, dtype=torch.float32).view(o, i)
                layer.weight.copy_(torch.sin(grid * 1.3 + k))
                layer.bias.copy_(0.1 * torch.cos(torch.arange(o, dtype=torch.float32) + k))
        if relu_style == "modules":
            self.relus = nn.ModuleList(nn.ReLU() for _ in range(4))
        else:
            self.relu_inplace = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for k, layer in enumerate(self.layers):
            h = layer(h)
            if k == len(self.layers) - 1:
                break
            if self.relu_style == "modules":
                h = self.relus[k](h)
            elif k == 0:
                h = self.relu_inplace(h)
            elif k == 1:
                h = F.relu(h)
            elif k == 2:
                h = torch.relu(h)
            else:
                h = h.relu()
        return h


class TinyTextTransformer(nn.Module):
    """A tiny text classifier: token and position embeddings, a ``batch_first`` ``nn.TransformerEncoder``, and a
    linear head on the ``[CLS]`` (first) position.

    ``forward(input_ids, attention_mask=None)`` returns ``(B, num_classes)`` logits; padding positions
    (``attention_mask == 0``) are masked out of attention. ``token_embedding`` is the layer to explain token ids at
    (``layer="token_embedding"``); its output is ``(B, N, dim)``.

    Args:
        vocab_size: number of token ids (``padding_idx`` 0).
        num_classes: number of output logits.
        dim: embedding width.
        heads: attention heads.
        layers: encoder layers.
        max_length: longest sequence the position embedding covers.
        dropout: dropout inside the encoder layers.

    Example:
        >>> net = TinyTextTransformer(vocab_size=62, num_classes=2)
        >>> ids = torch.tensor([[1, 5, 9, 0], [1, 7, 0, 0]])
        >>> net(ids, attention_mask=(ids != 0).long()).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        dim: int = 32,
        heads: int = 2,
        layers: int = 1,
        max_length: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int(vocab_size, "vocab_size", minimum=2)
        check_int(num_classes, "num_classes", minimum=1)
        check_int(heads, "heads", minimum=1)
        check_int(dim, "dim", minimum=heads)
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        check_int(layers, "layers", minimum=1)
        self.max_length = check_int(max_length, "max_length", minimum=1)
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_length, dim)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = input_ids.shape[1]
        if n > self.max_length:
            raise ValueError(f"sequences of {n} tokens are longer than max_length={self.max_length}")
        positions = torch.arange(n, device=input_ids.device)
        h = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        padding = None if attention_mask is None else attention_mask == 0
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(self.norm(h[:, 0]))


class TabularMLP(nn.Module):
    """An MLP for standardised tabular features: ``Linear -> ReLU`` blocks and a linear head.

    Args:
        in_features: number of columns.
        num_classes: number of output logits.
        hidden: widths of the hidden layers.

    Example:
        >>> TabularMLP(31, 2)(torch.zeros(4, 31)).shape
        torch.Size([4, 2])
    """

    def __init__(self, in_features: int, num_classes: int = 2, hidden: tuple[int, ...] = (32, 16)) -> None:
        super().__init__()
        check_int(in_features, "in_features", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        layers: list[nn.Module] = []
        width = in_features
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width, check_int(h, f"hidden[{i}]", minimum=1)), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyViT(nn.Module):
    """A tiny vision transformer (no timm or torchvision): patch-embedding convolution, a learned [CLS] token and
    position embeddings, pre-norm ``nn.TransformerEncoder`` blocks, a final ``LayerNorm`` and a linear head on the
    [CLS] token (``pool="cls"``, as ViT/DeiT) or on the mean of the patch tokens (``pool="mean"``, as many ViTs and
    the CAM setting: Grad-CAM at ``norm`` is then exactly CAM).

    Layout: ``patch_embed`` (``Conv2d``, kernel = stride = ``patch_size``) -> tokens ``(B, 1 + (s/p)^2, dim)`` with
    ``cls_token`` in front and ``pos_embed`` added -> ``encoder.layers.0 ... encoder.layers.{depth-1}`` -> ``norm`` ->
    ``head``. The token grid is ``(s/p, s/p)`` with one prefix token, which token-grid CAMs and rollout detect
    automatically. ``cls_token`` and ``pos_embed`` are parameters of the model itself (the randomization cascade
    re-draws them as its ``"<root>"`` layer).

    Args:
        image_size: side of the square inputs (a multiple of ``patch_size``).
        patch_size: side of the square patches.
        in_channels: input channels.
        num_classes: number of output logits.
        dim: token width.
        heads: attention heads (``dim`` must be a multiple).
        depth: encoder blocks.
        mlp_ratio: hidden width of each block's MLP, as a multiple of ``dim``.
        dropout: dropout inside the blocks.
        pool: what the head reads: ``"cls"`` the [CLS] token, ``"mean"`` the mean of the patch tokens (the [CLS]
            token is kept, so rollout and the token grid are the same for both).

    Example:
        >>> vit = TinyViT(image_size=32, patch_size=4, num_classes=10)
        >>> vit(torch.zeros(2, 1, 32, 32)).shape, vit.num_patches
        (torch.Size([2, 10]), 64)
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 32,
        heads: int = 2,
        depth: int = 2,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        pool: Literal["cls", "mean"] = "cls",
    ) -> None:
        super().__init__()
        self.pool = check_choice(pool, "pool", ("cls", "mean"))
        check_int(image_size, "image_size", minimum=1)
        check_int(patch_size, "patch_size", minimum=1)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        check_int(in_channels, "in_channels", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        check_int(heads, "heads", minimum=1)
        check_int(dim, "dim", minimum=heads)
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        check_int(depth, "depth", minimum=1)
        check_int(mlp_ratio, "mlp_ratio", minimum=1)
        self.image_size, self.in_channels = image_size, in_channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        block = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=mlp_ratio * dim, dropout=dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"TinyViT expects inputs of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), got"
                f" {tuple(x.shape)}; set in_channels/image_size to match your data"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.encoder(tokens))
        return self.head(tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(1))
