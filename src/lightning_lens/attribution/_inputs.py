"""Structured model inputs: a tensor, a tuple of tensors (positional) or a dict of tensors (keyword arguments).

:class:`ModelInputs` is what a method that takes structured inputs receives. It knows which leaves are attributed
(the floating-point ones; integer and boolean tensors such as token ids, masks and categorical codes only ride
along), how to call the model, how to select and repeat rows for the blocks of the multi-sample methods, and how to
pack per-leaf attributions back into the user's structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

Structure = Literal["tensor", "tuple", "dict"]
#: what ``attribute`` takes: a tensor, a tuple of tensors or a dict of tensors.
Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a normal tensor (an inference tensor is cloned: autograd refuses to save it)."""
    return t.detach().clone() if t.is_inference() else t.detach()


def _repeated(t: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` stacked copies of ``t`` along its first dimension."""
    return t.repeat(k, *([1] * (t.dim() - 1)))


class ModelInputs:
    """A batch as the model takes it, ``model(*args, **kwargs, **forward_kwargs)``.

    Build it with :meth:`from_user`. Tensors of ``forward_kwargs`` whose first dimension is the batch size are
    per-example: they follow the rows in :meth:`rows` and :meth:`repeat`; they are never attributed.

    Example:
        >>> batch = ModelInputs.from_user({"x": torch.ones(2, 3), "ids": torch.zeros(2, 4, dtype=torch.long)})
        >>> batch.batch_size, batch.structure, batch.is_attributed, batch.elements_per_row
        (2, 'dict', (True, False), 7)
        >>> batch.pack([torch.full((2, 3), 5.0)])["x"][0].tolist()
        [5.0, 5.0, 5.0]
    """

    def __init__(
        self,
        structure: Structure,
        keys: tuple[Union[int, str], ...],
        leaves: tuple[torch.Tensor, ...],
        forward_kwargs: dict[str, Any],
        originals: Optional[tuple[Any, ...]] = None,
        per_example: Optional[frozenset[str]] = None,
    ) -> None:
        self.structure = structure
        self.keys = keys
        self.leaves = leaves
        self.forward_kwargs = forward_kwargs
        self.is_attributed = tuple(t.is_floating_point() for t in leaves)
        self.batch_size = leaves[0].shape[0]
        # the forward_kwargs that hold one row per example, decided once on the caller's batch
        self.per_example = per_example if per_example is not None else frozenset(
            k for k, v in forward_kwargs.items()
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size
        )
        # the caller's own tensors, returned unchanged for the leaves that get no attribution
        self._originals = originals if originals is not None else leaves

    @classmethod
    def from_user(
        cls, inputs: Any, forward_kwargs: Optional[Mapping[str, Any]] = None, *, argument: str = "inputs"
    ) -> "ModelInputs":
        """Validate the user's ``inputs`` and ``forward_kwargs``. Call it inside ``gradients_enabled()`` (the
        method's ``explaining()``) so that inference tensors become normal ones.

        Raises:
            TypeError: a non-tensor leaf, an empty structure, or non-str keys.
            ValueError: leaves with different batch sizes, or a 0-d leaf.
        """
        if forward_kwargs is None:
            kwargs: dict[str, Any] = {}
        elif isinstance(forward_kwargs, Mapping) and all(isinstance(k, str) for k in forward_kwargs):
            kwargs = dict(forward_kwargs)
        else:
            raise TypeError(
                f"forward_kwargs must be a dict of keyword arguments for the model's forward, got"
                f" {type(forward_kwargs).__name__}"
            )
        structure: Structure
        if isinstance(inputs, torch.Tensor):
            structure, keys, raw = "tensor", (0,), (inputs,)
        elif isinstance(inputs, Mapping):
            structure, keys, raw = "dict", tuple(inputs.keys()), tuple(inputs.values())
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{argument}: a dict of inputs is passed as model(**{argument}), so its keys must be"
                                f" str, got {bad}")
            clash = sorted(set(keys) & set(kwargs))
            if clash:
                raise ValueError(f"forward_kwargs repeats the input(s) {clash}; give each argument once")
        elif isinstance(inputs, (tuple, list)):
            structure, keys, raw = "tuple", tuple(range(len(inputs))), tuple(inputs)
        else:
            raise TypeError(
                f"{argument} must be a torch.Tensor, a tuple of tensors (passed positionally) or a dict of tensors"
                f" (passed as keyword arguments), got {type(inputs).__name__}"
            )
        if not raw:
            raise TypeError(f"{argument} is empty: pass at least one tensor")
        for key, leaf in zip(keys, raw):
            if not isinstance(leaf, torch.Tensor):
                where = argument if structure == "tensor" else f"{argument}[{key!r}]"
                raise TypeError(
                    f"{where} must be a tensor, got {type(leaf).__name__}; pass arguments that are not per-example"
                    " tensors in forward_kwargs"
                )
            if leaf.dim() == 0:
                raise ValueError(f"{argument}[{key!r}] is a scalar; every input needs a leading batch dimension")
        sizes = {key: leaf.shape[0] for key, leaf in zip(keys, raw)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{argument}: every tensor needs the same batch size (first dimension), got {sizes}")
        kwargs = {k: _normal(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return cls(structure, keys, tuple(_normal(t) for t in raw), kwargs, originals=raw)

    # -- views ------------------------------------------------------------------------------------------------------
    @property
    def attributed(self) -> list[torch.Tensor]:
        """The floating-point leaves, in order."""
        return [t for t, a in zip(self.leaves, self.is_attributed) if a]

    @property
    def attributed_keys(self) -> list[Union[int, str]]:
        return [k for k, a in zip(self.keys, self.is_attributed) if a]

    @property
    def elements_per_row(self) -> int:
        """Elements of one example over all leaves (what the element budget counts)."""
        return sum(t[0].numel() for t in self.leaves) if self.batch_size else sum(t.numel() for t in self.leaves)

    def describe(self) -> str:
        """The leaves' shapes, e.g. ``{'input_ids': (2, 8), 'attention_mask': (2, 8)}`` (for messages)."""
        if self.structure == "tensor":
            return str(tuple(self.leaves[0].shape))
        shapes = {k: tuple(t.shape) for k, t in zip(self.keys, self.leaves)}
        return str(shapes if self.structure == "dict" else tuple(shapes.values()))

    @property
    def shape(self) -> tuple[int, ...]:
        """The first leaf's shape (what single-tensor messages print)."""
        return tuple(self.leaves[0].shape)

    # -- building new row sets --------------------------------------------------------------------------------------
    def _derived(self, leaves: Sequence[torch.Tensor], forward_kwargs: dict[str, Any], batch: int) -> "ModelInputs":
        """A batch built from this one: the same structure, keys, attributed leaves and per-example kwargs."""
        out = ModelInputs(self.structure, self.keys, tuple(leaves), forward_kwargs, per_example=self.per_example)
        out.is_attributed, out.batch_size = self.is_attributed, batch
        return out

    def _merge(self, values: Sequence[Any], others: Sequence[Any], what: str = "attributed tensors") -> list[Any]:
        """``values`` (one per attributed leaf, in order) in the attributed places, ``others`` (aligned with
        :attr:`leaves`) in the rest."""
        values = list(values)
        if len(values) != sum(self.is_attributed):
            raise ValueError(f"expected {sum(self.is_attributed)} {what}, got {len(values)}")
        it = iter(values)
        return [next(it) if a else other for other, a in zip(others, self.is_attributed)]

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: int) -> "ModelInputs":
        kwargs = {k: fn(v) if k in self.per_example else v for k, v in self.forward_kwargs.items()}
        return self._derived([fn(t) for t in self.leaves], kwargs, batch)

    def rows(self, b0: int, b1: int) -> "ModelInputs":
        """Examples ``b0:b1`` of every per-example tensor."""
        if b0 == 0 and b1 == self.batch_size:
            return self
        return self._map_rows(lambda t: t[b0:b1], b1 - b0)

    def repeat(self, k: int, attributed: Optional[Sequence[torch.Tensor]] = None) -> "ModelInputs":
        """``k`` stacked copies of the batch, sample-major: row ``s * B + b`` is example ``b``.

        With ``attributed`` (``k * B`` rows per attributed leaf: noisy copies, path points) those replace the attributed
        leaves, which are then not repeated (no block-sized copy made only to be replaced).
        """
        if attributed is not None:
            if k == 1:
                return self.with_attributed(attributed)
            merged = self._merge(attributed, self.leaves)
            leaves = [t if a else _repeated(t, k) for t, a in zip(merged, self.is_attributed)]
            kwargs = {key: _repeated(v, k) if key in self.per_example else v for key, v in self.forward_kwargs.items()}
            return self._derived(leaves, kwargs, k * self.batch_size)
        if k == 1:
            return self
        return self._map_rows(lambda t: _repeated(t, k), k * self.batch_size)

    def with_attributed(self, values: Sequence[torch.Tensor]) -> "ModelInputs":
        """The same batch with the attributed leaves replaced by ``values`` (same number of rows)."""
        return self._derived(self._merge(values, self.leaves), self.forward_kwargs, self.batch_size)

    def with_leaves(self, leaves: Sequence[torch.Tensor]) -> "ModelInputs":
        """The same batch with every leaf replaced (e.g. a baseline that also replaces token ids)."""
        return self._derived(leaves, self.forward_kwargs, self.batch_size)

    # -- the model call and the result ------------------------------------------------------------------------------
    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs, **forward_kwargs)``. The leaves are passed as they are: clone first if the model
        may modify its inputs in place and you need them afterwards."""
        if self.structure == "dict":
            return model(**dict(zip(self.keys, self.leaves)), **self.forward_kwargs)  # type: ignore[arg-type]
        return model(*self.leaves, **self.forward_kwargs)

    def cloned(self) -> "ModelInputs":
        """The same batch with the attributed leaves cloned (the model may modify its input in place)."""
        return self.with_attributed([t.clone() for t in self.attributed])

    def pack(self, values: Sequence[torch.Tensor]) -> Any:
        """Attributions of the attributed leaves (in order) in the user's structure; the other leaves unchanged."""
        out = self._merge(values, self._originals, "attributions")
        if self.structure == "tensor":
            return out[0]
        if self.structure == "dict":
            return dict(zip(self.keys, out))
        return tuple(out)

    def unpack(self, values: Any, argument: str) -> list[Any]:
        """Per-leaf entries of a user's structure mirroring the inputs (a baseline): a list aligned with
        :attr:`leaves`; missing dict keys are ``...`` (the default)."""
        if self.structure == "dict":
            if not isinstance(values, Mapping):
                raise TypeError(f"{argument} must be a dict mirroring the inputs' keys, got {type(values).__name__}")
            unknown = sorted(set(values) - set(self.keys))
            if unknown:
                raise ValueError(f"{argument} has keys {unknown} that are not inputs; inputs: {list(self.keys)}")
            return [values.get(k, ...) for k in self.keys]
        if not isinstance(values, (tuple, list)) or len(values) != len(self.leaves):
            raise TypeError(f"{argument} must be a tuple of {len(self.leaves)} entries mirroring the inputs")
        return list(values)
