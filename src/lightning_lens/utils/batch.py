"""Finding inputs, labels, sample ids, metadata and masks in the batches users' dataloaders yield."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from lightning_lens.utils.checks import check_key, check_str_list

Key = Union[int, str, Callable[[Any], Any], None, Sequence[Union[int, str]]]
#: the model inputs of a batch: one tensor, a tuple of tensors (positional arguments) or a dict (keyword arguments)
Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]

_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values", "features")
#: a dict batch with ``input_ids`` (a text batch) passes these, when present, as keyword arguments
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_TARGET_KEYS = ("label", "labels", "target", "targets", "y")
_INDEX_KEYS = ("index", "indices", "idx", "sample_id", "id")


def _get(batch: Any, key: Key, argument: str) -> Any:
    if callable(key):
        return key(batch)
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as err:
        kind = "keys " + ", ".join(map(repr, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"{argument}={key!r} does not select anything in the batch ({kind}); pass a key, an index or a callable"
        ) from err


def _check_input_key(value: Any) -> Key:
    """``value`` if it selects the inputs: what :func:`check_key` accepts, or a non-empty tuple/list of dict keys
    (the inputs are then a dict, passed as keyword arguments) or of positions (a tuple, passed positionally)."""
    if isinstance(value, (tuple, list)):
        if not value or not (all(isinstance(k, str) for k in value)
                             or all(isinstance(k, int) and not isinstance(k, bool) for k in value)):
            raise TypeError(
                f"input_key as a sequence must hold dict keys (str) or positions (int), all of one kind, got {value!r}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"input_key names a key twice: {value!r}")
        return tuple(value)
    return check_key(value, "input_key")


def input_batch_size(inputs: Inputs, argument: str = "inputs") -> int:
    """The number of examples of model inputs (a tensor, a tuple or a dict of tensors); all must agree.

    Example:
        >>> input_batch_size({"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5)})
        3
    """
    leaves = input_leaves(inputs, argument)
    sizes = {int(v.shape[0]) if v.dim() else -1 for v in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [tuple(v.shape) for v in leaves]
        raise ValueError(f"{argument} must be tensors with one common leading batch dimension, got shapes {shapes}")
    return sizes.pop()


def input_leaves(inputs: Inputs, argument: str = "inputs") -> list[torch.Tensor]:
    """The tensors of model inputs, in call order.

    Example:
        >>> [t.shape for t in input_leaves((torch.zeros(2, 3), torch.zeros(2)))]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    values = list(inputs.values()) if isinstance(inputs, Mapping) else (
        list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        kinds = [type(v).__name__ for v in values]
        raise TypeError(f"{argument} must be a tensor, a tuple of tensors or a dict of tensors, got {kinds or inputs}")
    return values


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """``fn`` applied to every tensor of model inputs, keeping the structure.

    Example:
        >>> map_inputs(lambda t: t[:1], {"a": torch.zeros(2, 3)})["a"].shape
        torch.Size([1, 3])
    """
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(fn(v) for v in inputs)
    return fn(inputs)


def describe_inputs(inputs: Inputs) -> str:
    """Shapes and dtypes of model inputs, for messages.

    Example:
        >>> describe_inputs({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
        "{'input_ids': (2, 4) torch.int64}"
    """
    one = lambda t: f"{tuple(t.shape)} {t.dtype}"  # noqa: E731
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(one(v) for v in inputs) + ")"
    return one(inputs)


class BatchAccessor:
    """Reads the parts of a batch: tuple/list batches by position, dict batches by key, anything by callable.

    Args:
        input_key: where the inputs are. Default: position 0, or the first of ``image``, ``input``, ``x``,
            ``features`` ... in a dict, or, in a dict with ``input_ids`` (a text batch), a dict of ``input_ids`` and
            whichever of ``attention_mask``, ``token_type_ids``, ``position_ids`` it has (keyword arguments of the
            model). A tuple of dict keys selects several inputs as a dict (keyword arguments), a tuple of positions
            as a tuple (positional arguments); a callable may return a tensor, a tuple or a dict of tensors.
        target_key: where the labels are. Default: position 1, or ``label``, ``target``, ``y`` ... in a dict.
        index_key: where the dataset indices are. Default: ``index``/``idx``/``sample_id`` in a dict, else none.
        metadata_keys: dict keys to treat as per-sample metadata (one string is one key). Default: every other key of
            a dict batch whose value is a 1-D tensor or a list with one entry per sample (keys ending in ``_mask`` are
            masks instead).

    Example:
        >>> acc = BatchAccessor()
        >>> batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([3, 5]), "digit_mask": torch.ones(2, 1, 4, 4)}
        >>> acc.targets(batch).tolist(), list(acc.masks(batch))
        ([3, 5], ['digit'])
        >>> text = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
        >>> list(acc.inputs(text)), acc.masks(text)
        (['input_ids', 'attention_mask'], {})
    """

    def __init__(
        self,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        metadata_keys: Union[str, Sequence[str], None] = None,
    ) -> None:
        self.input_key = _check_input_key(input_key)
        self.target_key = check_key(target_key, "target_key")
        self.index_key = check_key(index_key, "index_key")
        if isinstance(metadata_keys, str):  # one key, not its characters
            metadata_keys = [metadata_keys]
        self.metadata_keys = None if metadata_keys is None else list(check_str_list(metadata_keys, "metadata_keys"))

    @staticmethod
    def _first_key(batch: Mapping, candidates: Sequence[str]) -> Optional[str]:
        return next((k for k in candidates if k in batch), None)

    def inputs(self, batch: Any) -> Inputs:
        """The model inputs of the batch: a tensor, or a tuple/dict of tensors (see ``input_key``)."""
        if isinstance(self.input_key, tuple):
            parts = [_get(batch, k, "input_key") for k in self.input_key]
            x: Any = dict(zip(self.input_key, parts)) if isinstance(self.input_key[0], str) else tuple(parts)
        elif self.input_key is not None:
            x = _get(batch, self.input_key, "input_key")
        elif isinstance(batch, torch.Tensor):
            x = batch
        elif isinstance(batch, Mapping):
            key = self._first_key(batch, _INPUT_KEYS)
            if key is not None:
                x = batch[key]
            elif "input_ids" in batch:
                x = {k: batch[k] for k in _TEXT_KEYS if k in batch}
            else:
                raise KeyError(
                    f"no input found in a dict batch with keys {list(batch)}; pass input_key='<your key>'"
                )
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            raise TypeError(f"cannot find inputs in a batch of type {type(batch).__name__}; pass input_key=callable")
        if isinstance(x, list) and all(isinstance(v, torch.Tensor) for v in x):
            x = tuple(x)
        if isinstance(x, Mapping):
            x = dict(x)
        if not isinstance(x, (torch.Tensor, tuple, dict)) or (not isinstance(x, torch.Tensor) and not all(
                isinstance(v, torch.Tensor) for v in (x.values() if isinstance(x, dict) else x))):
            raise TypeError(
                f"the batch's inputs must be a tensor, a tuple or a dict of tensors, got {type(x).__name__}; set"
                " input_key"
            )
        return x

    def input_names(self, batch: Any) -> set[str]:
        """The dict keys of a dict batch that hold model inputs (kept out of metadata and masks)."""
        if not isinstance(batch, Mapping):
            return set()
        if isinstance(self.input_key, tuple):
            return {k for k in self.input_key if isinstance(k, str)}
        if isinstance(self.input_key, str):
            return {self.input_key}
        if self.input_key is None and self._first_key(batch, _INPUT_KEYS) is None and "input_ids" in batch:
            return {k for k in _TEXT_KEYS if k in batch}
        return set()

    def targets(self, batch: Any) -> Optional[torch.Tensor]:
        """The label tensor of the batch, or None when the batch has none."""
        if self.target_key is not None:
            y = _get(batch, self.target_key, "target_key")
        elif isinstance(batch, Mapping):
            key = self._first_key(batch, _TARGET_KEYS)
            y = batch[key] if key is not None else None
        elif isinstance(batch, (tuple, list)) and len(batch) > 1:
            y = batch[1]
        else:
            y = None
        return None if y is None else torch.as_tensor(y)

    def indices(self, batch: Any) -> Optional[torch.Tensor]:
        """Dataset indices of the batch's samples, or None."""
        if self.index_key is not None:
            idx = _get(batch, self.index_key, "index_key")
        elif isinstance(batch, Mapping):
            key = self._first_key(batch, _INDEX_KEYS)
            idx = batch[key] if key is not None else None
        else:
            idx = None
        return None if idx is None else torch.as_tensor(idx).long()

    def _batch_size(self, batch: Any) -> int:
        return input_batch_size(self.inputs(batch), "the batch's inputs")

    def metadata(self, batch: Any) -> dict[str, Any]:
        """Per-sample metadata of a dict batch: name -> 1-D tensor or list."""
        if not isinstance(batch, Mapping):
            return {}
        n = self._batch_size(batch)
        reserved = {k for k in (self.input_key, self.target_key, self.index_key) if isinstance(k, str)}
        reserved |= set(_INPUT_KEYS) | set(_TARGET_KEYS) | set(_INDEX_KEYS) | self.input_names(batch)
        keys = self.metadata_keys if self.metadata_keys is not None else [k for k in batch if k not in reserved]
        out: dict[str, Any] = {}
        for k in keys:
            if k not in batch:
                raise KeyError(f"metadata_keys names {k!r}, which the batch does not have (keys: {list(batch)})")
            v = batch[k]
            if str(k).endswith("_mask"):
                continue
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n:
                out[k] = v
            elif isinstance(v, (list, tuple)) and len(v) == n:
                out[k] = list(v)
        return out

    def masks(self, batch: Any) -> dict[str, torch.Tensor]:
        """Ground-truth masks in a dict batch: keys ``<region>_mask`` -> tensor, returned as ``{region: mask}``."""
        if not isinstance(batch, Mapping):
            return {}
        inputs = self.input_names(batch)  # an attention_mask is a model input, not a ground-truth region
        return {
            str(k)[: -len("_mask")]: v
            for k, v in batch.items()
            if str(k).endswith("_mask") and isinstance(v, torch.Tensor) and k not in inputs
        }


def input_kind(inputs: Inputs, tabular: bool = False) -> str:
    """What model inputs hold, for choosing how to explain and draw them: ``"text"`` (an integer ``(batch, tokens)``
    tensor of token ids, alone or among several inputs), ``"multi"`` (a tuple or dict of tensors without token
    ids), ``"tabular"`` (a floating ``(batch, features)`` tensor when ``tabular``, e.g. feature names are known) or
    ``"image"`` (anything else: one tensor).

    Example:
        >>> input_kind({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)})
        'text'
        >>> input_kind(torch.zeros(2, 8), tabular=True), input_kind((torch.zeros(2, 1, 4, 4), torch.zeros(2, 3)))
        ('tabular', 'multi')
    """
    if token_ids(inputs) is not None:
        return "text"
    if not isinstance(inputs, torch.Tensor):
        return "multi"
    return "tabular" if tabular and inputs.is_floating_point() and inputs.dim() == 2 else "image"


def token_ids(inputs: Inputs) -> Optional[torch.Tensor]:
    """The token ids among model inputs: ``input_ids`` of a dict, else the first integer ``(batch, tokens)`` tensor;
    None when there is none.

    Example:
        >>> token_ids((torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.long))).shape
        torch.Size([2, 4])
    """
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        return inputs["input_ids"]
    for leaf in input_leaves(inputs):
        if leaf.dim() == 2 and not leaf.is_floating_point() and not leaf.is_complex() and leaf.dtype != torch.bool:
            return leaf
    return None


def padding_mask(inputs: Inputs) -> Optional[torch.Tensor]:
    """True where a token is padding: ``attention_mask == 0`` of a dict of text inputs, else None.

    Example:
        >>> padding_mask({"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])})
        tensor([[False, False,  True]])
    """
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        return inputs["attention_mask"] == 0
    return None
