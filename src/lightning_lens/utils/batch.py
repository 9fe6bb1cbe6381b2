"""Finding inputs, labels, sample ids, metadata and masks in the batches users' dataloaders yield."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from lightning_lens.utils.checks import check_key, check_str_list

Key = Union[int, str, Callable[[Any], Any], None]

_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
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


class BatchAccessor:
    """Reads the parts of a batch: tuple/list batches by position, dict batches by key, anything by callable.

    Args:
        input_key: where the inputs are. Default: position 0, or the first of ``image``, ``input``, ``x`` ... in a dict.
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
    """

    def __init__(
        self,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        metadata_keys: Union[str, Sequence[str], None] = None,
    ) -> None:
        self.input_key = check_key(input_key, "input_key")
        self.target_key = check_key(target_key, "target_key")
        self.index_key = check_key(index_key, "index_key")
        if isinstance(metadata_keys, str):  # one key, not its characters
            metadata_keys = [metadata_keys]
        self.metadata_keys = None if metadata_keys is None else list(check_str_list(metadata_keys, "metadata_keys"))

    @staticmethod
    def _first_key(batch: Mapping, candidates: Sequence[str]) -> Optional[str]:
        return next((k for k in candidates if k in batch), None)

    def inputs(self, batch: Any) -> torch.Tensor:
        """The input tensor of the batch."""
        if self.input_key is not None:
            x = _get(batch, self.input_key, "input_key")
        elif isinstance(batch, torch.Tensor):
            x = batch
        elif isinstance(batch, Mapping):
            key = self._first_key(batch, _INPUT_KEYS)
            if key is None:
                raise KeyError(
                    f"no input found in a dict batch with keys {list(batch)}; pass input_key='<your key>'"
                )
            x = batch[key]
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            raise TypeError(f"cannot find inputs in a batch of type {type(batch).__name__}; pass input_key=callable")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the batch's inputs must be a tensor, got {type(x).__name__}; set input_key")
        return x

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
        return int(self.inputs(batch).shape[0])

    def metadata(self, batch: Any) -> dict[str, Any]:
        """Per-sample metadata of a dict batch: name -> 1-D tensor or list."""
        if not isinstance(batch, Mapping):
            return {}
        n = self._batch_size(batch)
        reserved = {k for k in (self.input_key, self.target_key, self.index_key) if isinstance(k, str)}
        reserved |= set(_INPUT_KEYS) | set(_TARGET_KEYS) | set(_INDEX_KEYS)
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
        return {
            str(k)[: -len("_mask")]: v
            for k, v in batch.items()
            if str(k).endswith("_mask") and isinstance(v, torch.Tensor)
        }
