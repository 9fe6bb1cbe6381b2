"""Reading the checkpoints TracIn sums over: state dicts, ``torch.save`` files and Lightning ``.ckpt`` files.

A checkpoint is turned into a dict ``name -> tensor`` keyed like ``model.named_parameters()`` /
``model.named_buffers()`` (CPU tensors, never loaded into the model). Lightning writes the LightningModule's state
under the ``"state_dict"`` key with the module's attribute names as prefix (``"model.fc.weight"`` for
``self.model = net``); when the model given to :class:`~lightning_lens.influence.TracInCP` is that inner ``net``, the
common prefix (``"model."``) is stripped, and when the model is the LightningModule and the checkpoint holds the
inner network's state dict, the prefix is added. ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
prefixes are handled the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = ["Checkpoint", "checkpoint_learning_rate", "load_checkpoint", "match_state_dict"]

#: a state dict, or the path of a file holding one (``torch.save(model.state_dict())``, a Lightning ``.ckpt``,
#: or a dict with a ``"state_dict"`` / ``"model_state_dict"`` entry)
Checkpoint = Union[Mapping[str, Any], str, "os.PathLike[str]"]


def _read(checkpoint: Checkpoint, weights_only: bool, argument: str) -> Mapping[str, Any]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise ValueError(f"{argument}: no checkpoint file at {path!r}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:
            hint = (
                "; if you trust the file, pass weights_only=False (it unpickles arbitrary objects)"
                if weights_only
                else ""
            )
            raise ValueError(f"{argument}: cannot load {path!r} ({type(err).__name__}: {err}){hint}") from err
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"{argument}: {path!r} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
            )
        return obj
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise TypeError(
        f"{argument} must hold state dicts or checkpoint file paths, got {type(checkpoint).__name__}"
    )


def _state_dict(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict", "model_state_dict"):  # Lightning's .ckpt; a common torch.save convention
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def checkpoint_learning_rate(checkpoint: Mapping[str, Any]) -> Optional[float]:
    """The learning rate a checkpoint file recorded, or None: the first param group of a Lightning ``.ckpt``'s first
    optimizer, or a ``"learning_rate"`` entry (Captum's convention).

    Example:
        >>> checkpoint_learning_rate({"optimizer_states": [{"param_groups": [{"lr": 0.1}]}], "state_dict": {}})
        0.1
        >>> checkpoint_learning_rate({"weight": torch.zeros(1)}) is None
        True
    """
    value: Any = None
    try:
        value = checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    except (KeyError, IndexError, TypeError):
        value = checkpoint.get("learning_rate") if isinstance(checkpoint, Mapping) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def _prefix_candidates(model_name: str, keys: list[str]) -> list[tuple[str, str]]:
    """(strip, add) pairs that turn ``model_name`` into a checkpoint key: ``key = strip + name[len(add):]``."""
    out = []
    for key in keys:
        if key == model_name:
            out.append(("", ""))
        elif key.endswith("." + model_name):
            out.append((key[: -len(model_name)], ""))
        elif model_name.endswith("." + key):
            out.append(("", model_name[: -len(key)]))
    return out


def match_state_dict(
    model: nn.Module, state: Mapping[str, Any], argument: str = "checkpoints"
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` keyed by ``model``'s parameter and buffer names (see the module docstring).

    Every parameter must be found with its shape; buffers are taken when present (a buffer the checkpoint lacks
    keeps the model's own value). Raises ``ValueError`` naming ``argument`` otherwise.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> lightning_style = {"model.weight": torch.ones(1, 2), "model.bias": torch.zeros(1)}
        >>> sorted(match_state_dict(net, lightning_style))
        ['bias', 'weight']
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    if not params:
        raise ValueError(f"{argument}: the model has no parameters")
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    first = next(iter(params))
    chosen: Optional[tuple[str, str]] = None
    for strip, add in _prefix_candidates(first, keys):
        if all(n.startswith(add) and strip + n[len(add):] in state for n in params):
            chosen = (strip, add)
            break
    if chosen is None:
        missing = [n for n in params if n not in state][:5]
        sample = ", ".join(repr(k) for k in keys[:5])
        raise ValueError(
            f"{argument}: the checkpoint does not hold the model's parameters (missing e.g. {missing}; its keys look"
            f" like {sample}); pass the model the checkpoint was saved from (the LightningModule, or its inner"
            " network: a common prefix such as 'model.' is stripped)"
        )
    strip, add = chosen
    out: dict[str, torch.Tensor] = {}
    for name, ref in list(params.items()) + list(buffers.items()):
        if not name.startswith(add):
            continue
        key = strip + name[len(add):]
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            continue  # a buffer the checkpoint does not store
        if value.shape != ref.shape:
            raise ValueError(
                f"{argument}: {key!r} has shape {tuple(value.shape)} in the checkpoint but {name!r} has"
                f" {tuple(ref.shape)} in the model; pass the model the checkpoint was saved from"
            )
        out[name] = value.detach().to("cpu", ref.dtype)
    return out


def load_checkpoint(
    model: nn.Module, checkpoint: Checkpoint, weights_only: bool = True, argument: str = "checkpoints"
) -> tuple[dict[str, torch.Tensor], Optional[float]]:
    """``(tensors keyed like the model, recorded learning rate or None)`` of one checkpoint (see the module docstring).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> tensors, lr = load_checkpoint(net, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> tensors["weight"].tolist(), lr
        ([[1.0, 1.0]], None)
    """
    obj = _read(checkpoint, weights_only, argument)
    return match_state_dict(model, _state_dict(obj), argument), checkpoint_learning_rate(obj)
