"""Deep k-Nearest Neighbors over several layers (Papernot & McDaniel 2018, "Deep k-Nearest Neighbors: Towards
Confident, Interpretable and Robust Deep Learning").

A single :class:`~lightning_lens.interpretable_models.KNNHead` scores a query by the labels of its neighbours in one
representation. DkNN looks in every layer: the nonconformity of a query for class ``j`` is the number of its
neighbours, summed over the layers, whose label is not ``j``. Held-out calibration data turn it into conformal
p-values: ``p_j`` is the fraction of calibration scores (the nonconformity of each calibration example for its true
label) at least as large. Prediction = argmax ``p_j``, credibility = the largest p-value, confidence = one minus the
second largest. An input whose layers disagree (out of distribution, adversarial) gets a low credibility.

Each layer's memory is a ``KNNHead`` (cosine similarity, exact torch or FAISS search), so one layer gives exactly the
head's own credibility. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_lens.interpretable_models.knn import (
    KNNHead,
    _fit_calibration_scores,
    conformal_p_values,
    conformal_prediction,
)
from lightning_lens.utils.checks import check_instance, check_int
from lightning_lens.utils.modules import preserve_modes, resolve_module

__all__ = ["DeepKNN", "DeepKNNOutput", "layer_outputs"]


@dataclass
class DeepKNNOutput:
    """What :meth:`DeepKNN.explain` found for each query (``B`` queries, ``C`` classes)."""

    prediction: torch.Tensor  # (B,) class of the largest p-value
    credibility: torch.Tensor  # (B,) the largest p-value: low = unlike the training data in some layer
    confidence: torch.Tensor  # (B,) one minus the second-largest p-value
    p_values: torch.Tensor  # (B, C)
    nonconformity: torch.Tensor  # (B, C) neighbours not of class j, summed over the layers


class DeepKNN(nn.Module):
    """DkNN credibility from the neighbours of a query in several layers, one :class:`KNNHead` memory per layer.

    Args:
        heads: one head per layer, each holding that layer's training representations (and the same labels). A query's
            neighbours in a layer are its ``head.credibility_k`` nearest entries (the paper used k=75).

    Build it from training representations with :meth:`from_layers`, :meth:`calibrate` it on held-out data (or keep
    the scores outside with :meth:`calibration_scores_for`), then :meth:`explain`. Layers are passed as a sequence of
    tensors ``(N, ...)`` in the order of ``heads`` (flattened to ``(N, D)``); :func:`layer_outputs` collects them from a
    model.

    Example:
        >>> train = [torch.eye(4), torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])]  # two layers, 4 examples
        >>> dknn = DeepKNN.from_layers(train, torch.tensor([0, 0, 1, 1]), num_classes=2, k=2)
        >>> dknn.nonconformity([torch.tensor([[1.0, 1.0, 0, 0]]), torch.tensor([[0.0, 1.0]])]).tolist()
        [[2.0, 2.0]]
    """

    def __init__(self, heads: Sequence[KNNHead]) -> None:
        super().__init__()
        hint = "a list of KNNHead, one per layer"
        heads = list(check_instance(heads, "heads", (list, tuple, nn.ModuleList), hint=hint))
        if not heads:
            raise ValueError("heads must hold at least one KNNHead (one per layer)")
        for i, head in enumerate(heads):
            check_instance(head, f"heads[{i}]", KNNHead)
        classes = {head.num_classes for head in heads}
        if len(classes) != 1:
            raise ValueError(f"heads must share num_classes (the labels are the same in every layer), got {classes}")
        self.num_classes = heads[0].num_classes
        self.heads = nn.ModuleList(heads)
        self.register_buffer("calibration_scores", torch.zeros(0))

    @classmethod
    @torch.no_grad()
    def from_layers(
        cls,
        layers: Sequence[torch.Tensor],
        labels: torch.Tensor,
        num_classes: int,
        k: int = 75,
        backend: Literal["torch", "faiss"] = "torch",
        chunk_size: int = 65536,
    ) -> DeepKNN:
        """A DkNN whose memories hold the training representations ``layers`` (one ``(N, ...)`` tensor per layer) with
        their ``labels``; ``k`` neighbours per layer (at most ``N``), searched with ``backend``."""
        layers = _check_layers(layers, None)
        n = layers[0].shape[0]
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"labels must hold one label per training example ({n}), got {labels.shape[0]}")
        k = min(check_int(k, "k", minimum=1), n)
        heads = []
        for x in layers:
            head = KNNHead(x.shape[1], num_classes, k=k, memory_size=n, refresh="reencode", backend=backend,
                           chunk_size=chunk_size, credibility_k=k).to(x.device)
            head.write(x, labels.to(x.device), torch.arange(n, device=x.device))
            heads.append(head.eval())
        return cls(heads)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool, missing_keys: list,
        unexpected_keys: list, error_msgs: list,
    ) -> None:
        _fit_calibration_scores(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def nonconformity(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, C)``: for each class, the neighbours (over all layers) whose label is not that class."""
        layers = _check_layers(layers, len(self.heads))
        alpha = None
        for head, x in zip(self.heads, layers):
            _, pos = head.search(x.to(head.memory_keys.device), k=head.credibility_k)
            part = head.nonconformity(head.memory_labels[pos.clamp_min(0)], pos >= 0)
            alpha = part if alpha is None else alpha + part.to(alpha.device)
        return alpha

    @torch.no_grad()
    def calibration_scores_for(self, layers: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sorted nonconformity of held-out calibration examples for their true labels, without storing it (pass it
        to :meth:`explain` as ``calibration_scores``, or store it with :meth:`calibrate`)."""
        alpha = self.nonconformity(layers)
        labels = torch.as_tensor(labels, device=alpha.device).long().reshape(-1)
        if labels.shape[0] != alpha.shape[0]:
            raise ValueError(
                f"labels must hold one label per calibration example ({alpha.shape[0]}), got {labels.shape[0]}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return torch.sort(alpha.gather(1, labels.unsqueeze(1)).squeeze(1).float())[0]

    @torch.no_grad()
    def calibrate(self, layers: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Store the calibration scores of held-out data in the module (saved in its state dict)."""
        self.calibration_scores = self.calibration_scores_for(layers, labels).to(self.calibration_scores.device)

    @torch.no_grad()
    def explain(
        self, layers: Sequence[torch.Tensor], calibration_scores: Optional[torch.Tensor] = None
    ) -> DeepKNNOutput:
        """Prediction, credibility, confidence, p-values and nonconformity of each query.

        Uses ``calibration_scores`` if given, else the ones stored by :meth:`calibrate`.
        """
        cal = self.calibration_scores if calibration_scores is None else calibration_scores
        if cal.numel() == 0:
            raise RuntimeError(
                "DeepKNN has no calibration scores: call calibrate(held_out_layers, labels) first or pass "
                "calibration_scores= (from calibration_scores_for)"
            )
        alpha = self.nonconformity(layers)
        p = conformal_p_values(alpha, cal)
        prediction, credibility, confidence = conformal_prediction(p)
        return DeepKNNOutput(prediction, credibility, confidence, p, alpha)


def _check_layers(layers: Any, expected: Optional[int]) -> list[torch.Tensor]:
    if isinstance(layers, torch.Tensor) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of tensors (N, ...), one per layer, got {type(layers).__name__}")
    out = []
    for i, x in enumerate(layers):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise TypeError(f"layers[{i}] must be a tensor of shape (N, ...) with N examples, got {type(x).__name__}")
        out.append(x.flatten(1))
    if expected is not None and len(out) != expected:
        raise ValueError(f"layers must hold one representation per head ({expected}), got {len(out)}")
    if not out:
        raise ValueError("layers must hold at least one representation")
    if len({x.shape[0] for x in out}) != 1:
        raise ValueError(f"every layer must hold the same examples, got sizes {[x.shape[0] for x in out]}")
    return out


@torch.no_grad()
def layer_outputs(
    model: nn.Module, inputs: torch.Tensor, layers: Sequence[Union[str, nn.Module]], batch_size: int = 1024
) -> list[torch.Tensor]:
    """The outputs of the submodules ``layers`` (names or modules) of ``model`` on ``inputs``, flattened to ``(N, D)``,
    in eval mode (the modes are restored) and without gradient; the hooks are removed afterwards.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [tuple(t.shape) for t in layer_outputs(net, torch.randn(5, 3), ["1", "2"])]
        [(5, 4), (5, 2)]
    """
    check_int(batch_size, "batch_size", minimum=1)
    modules = [resolve_module(model, layer, argument=f"layers[{i}]") for i, layer in enumerate(layers)]
    if not modules:
        raise ValueError("layers must name at least one submodule")
    captured: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook_for(slot: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layers[{slot}] returns {type(output).__name__}, not a tensor: pick another layer")
            captured[slot].append(output.detach().flatten(1))

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        with preserve_modes(model, mode=False):
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start:start + batch_size])
                calls = {len(parts) for parts in captured}
                if calls != {start // batch_size + 1}:
                    raise ValueError(
                        "every module in layers must run exactly once per forward pass (a module that is skipped or "
                        "reused gives no single representation): pick another layer"
                    )
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in captured]
