"""Dispatch of rich outputs (images, tables, text, JSON) over the trainer's loggers.

Lightning has no common API for images or tables, so each function here knows the loggers users pick:
``TensorBoardLogger`` (a ``SummaryWriter``), ``WandbLogger`` and, for ``CSVLogger`` or any logger with a ``log_dir``,
plain files. Loggers of other kinds are warned about once and skipped. Every function is a no-op off rank zero; call
them from every rank, but never place collectives inside them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

ImageLike = Union[np.ndarray, torch.Tensor]

_warned: set[str] = set()


# --------------------------------------------------------------------------------------------------------------- utils
def logging_step(trainer: Any) -> int:
    """The step Lightning itself logs metrics at, so images line up with ``val/*`` scalars on the step slider.

    Lightning logs with the count of batches that stepped the optimizer; during the validation that ends a training
    epoch it is one behind ``global_step`` (it is increased after validation). Without a fit loop: ``global_step``.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def _step(trainer: Any, step: Optional[int]) -> int:
    return logging_step(trainer) if step is None else int(step)


def _kind(logger: Any) -> str:
    """'tensorboard', 'wandb', 'files' or 'unsupported', decided by what the logger exposes."""
    name = type(logger).__name__
    if name == "WandbLogger" or any(c.__name__ == "WandbLogger" for c in type(logger).__mro__):
        return "wandb"
    if any(c.__name__ == "TensorBoardLogger" for c in type(logger).__mro__):
        return "tensorboard"
    if _log_dir(logger) is not None:
        return "files"
    return "unsupported"


def _log_dir(logger: Any) -> Optional[str]:
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:  # some loggers build the path lazily and may fail before setup
            value = None
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def _sinks(trainer: Any) -> Iterator[tuple[str, Any]]:
    """(kind, logger) for every logger of the trainer, on rank zero only; unsupported kinds warned about once."""
    if not getattr(trainer, "is_global_zero", True):
        return
    for logger in getattr(trainer, "loggers", []) or []:
        kind = _kind(logger)
        if kind == "unsupported":
            key = type(logger).__name__
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"lightning-lens cannot log images, tables or text to {key} (no log_dir); supported: "
                    "TensorBoardLogger, WandbLogger, CSVLogger or any logger with a log_dir",
                    stacklevel=3,
                )
            continue
        yield kind, logger


def _safe_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"tag must be a non-empty string, got {tag!r}")
    return tag


def _file_path(logger: Any, tag: str, step: int, suffix: str) -> str:
    parts = [re.sub(r"[^\w.=\-]+", "_", p) for p in tag.split("/") if p]
    folder = os.path.join(_log_dir(logger) or ".", "lens", *parts)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"step_{step:07d}{suffix}")


def _as_hwc_uint8(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3) from a uint8/float array (H, W), (H, W, 1|3|4) or a float tensor (1|3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, C) or a (C, H, W) tensor with C in 1/3/4, got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _png_bytes(arr: np.ndarray) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (ensures the Agg backend exists)
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, arr, format="png")
    return buf.getvalue()


def _format_cell(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_to_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (TensorBoard's text plugin renders it).

    Example:
        >>> print(table_to_markdown(["slice", "acc"], [["digit=3", 0.51234]]))
        | slice | acc |
        | --- | --- |
        | digit=3 | 0.5123 |
    """
    lines = ["| " + " | ".join(map(str, columns)) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _check_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    out = [list(r) for r in rows]
    for i, r in enumerate(out):
        if len(r) != len(columns):
            raise ValueError(f"rows[{i}] has {len(r)} values but there are {len(columns)} columns")
    return out


# ---------------------------------------------------------------------------------------------------------- public API
def log_image(
    trainer: Any, tag: str, image: ImageLike, step: Optional[int] = None, caption: Optional[str] = None
) -> None:
    """Log one image under ``tag``.

    Args:
        trainer: the Lightning trainer whose loggers receive the image.
        tag: name such as ``"saliency/gradient"``; TensorBoard tag, W&B key, or folder under ``<log_dir>/lens``.
        image: uint8 ``(H, W[, C])`` array, or a float ``(C, H, W)`` tensor / ``(H, W, C)`` array in ``[0, 1]``.
        step: defaults to the step Lightning logs its own metrics at (``global_step``, or one less during the
            validation that ends a training epoch).
        caption: shown by W&B; written beside the file for file loggers.

    Example:
        >>> log_image(trainer, "saliency/gradient", np.zeros((32, 32, 3), np.uint8))  # doctest: +SKIP
    """
    tag = _safe_tag(tag)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    arr = _as_hwc_uint8(image)
    step = _step(trainer, step)
    for kind, logger in sinks:
        if kind == "tensorboard":
            logger.experiment.add_image(tag, arr, global_step=step, dataformats="HWC")
            logger.experiment.flush()
        elif kind == "wandb":
            kwargs = {"caption": [caption]} if caption else {}
            logger.log_image(key=tag, images=[arr], step=step, **kwargs)
        else:
            path = _file_path(logger, tag, step, ".png")
            with open(path, "wb") as f:
                f.write(_png_bytes(arr))
            if caption:
                with open(path[: -len(".png")] + ".txt", "w") as f:
                    f.write(caption)


def log_figure(trainer: Any, tag: str, figure: Any, step: Optional[int] = None) -> None:
    """Render a matplotlib ``Figure`` (object API, no pyplot) and log it as an image; the figure is cleared after.

    Example:
        >>> fig, ax = new_figure(); ax.plot([0, 1]); log_figure(trainer, "sanity/curves", fig)  # doctest: +SKIP
    """
    from lightning_lens.render import figure_to_array

    tag = _safe_tag(tag)
    try:
        if any(True for _ in _sinks(trainer)):
            log_image(trainer, tag, figure_to_array(figure), step=step)
    finally:
        figure.clf()


def log_table(
    trainer: Any, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: Optional[int] = None
) -> None:
    """Log a table: markdown text in TensorBoard, ``log_table`` in W&B, CSV + markdown files elsewhere.

    Example:
        >>> log_table(trainer, "slices/top", ["slice", "acc"], [["digit=3", 0.5]])  # doctest: +SKIP
    """
    tag = _safe_tag(tag)
    columns = [str(c) for c in columns]
    rows = _check_rows(columns, rows)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    step = _step(trainer, step)
    markdown = table_to_markdown(columns, rows)
    for kind, logger in sinks:
        if kind == "tensorboard":
            logger.experiment.add_text(tag, markdown, global_step=step)
            logger.experiment.flush()
        elif kind == "wandb":
            plain = [[_plain(v) for v in r] for r in rows]
            logger.log_table(key=tag, columns=columns, data=plain, step=step)
        else:
            path = _file_path(logger, tag, step, ".csv")
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([[_plain(v) for v in r] for r in rows])
            with open(path[: -len(".csv")] + ".md", "w") as f:
                f.write(markdown + "\n")


def log_text(trainer: Any, tag: str, text: str, step: Optional[int] = None) -> None:
    """Log markdown text: TensorBoard's text plugin, a one-cell W&B table, or a ``.md`` file."""
    tag = _safe_tag(tag)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    step = _step(trainer, step)
    for kind, logger in sinks:
        if kind == "tensorboard":
            logger.experiment.add_text(tag, text, global_step=step)
            logger.experiment.flush()
        elif kind == "wandb":
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        else:
            with open(_file_path(logger, tag, step, ".md"), "w") as f:
                f.write(text + "\n")


def log_json(trainer: Any, tag: str, obj: Any, step: Optional[int] = None) -> Optional[str]:
    """Write ``obj`` as a JSON artifact under each logger's directory; W&B also uploads it with the run.

    Returns the path written for the first logger (None off rank zero or without loggers).
    """
    tag = _safe_tag(tag)
    sinks = list(_sinks(trainer))
    if not sinks:
        return None
    step = _step(trainer, step)
    text = json.dumps(obj, indent=2, default=_plain)
    first: Optional[str] = None
    for kind, logger in sinks:
        if kind == "wandb":
            run = logger.experiment
            parts = [re.sub(r"[^\w.=\-]+", "_", p) for p in tag.split("/") if p]
            folder = os.path.join(run.dir, "lens", *parts)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"step_{step:07d}.json")
            with open(path, "w") as f:
                f.write(text)
            run.save(path, base_path=run.dir, policy="now")
        else:
            path = _file_path(logger, tag, step, ".json")
            with open(path, "w") as f:
                f.write(text)
        first = first or path
    return first


def log_scalars(trainer: Any, metrics: Mapping[str, Union[float, torch.Tensor]], step: Optional[int] = None) -> None:
    """Send scalars straight to every logger (``logger.log_metrics``), also from hooks where ``pl_module.log`` is not
    allowed (``on_fit_end``). Use ``pl_module.log`` instead when EarlyStopping or ModelCheckpoint must monitor them.

    Example:
        >>> log_scalars(trainer, {"sanity/gradient/spearman_abs": 0.02})  # doctest: +SKIP
    """
    if not getattr(trainer, "is_global_zero", True):
        return
    values: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"metric {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        values[_safe_tag(k)] = float(v)
    if not values:
        return
    step = _step(trainer, step)
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(values, step=step)
    for logger in getattr(trainer, "loggers", []) or []:
        if _kind(logger) == "tensorboard":
            logger.experiment.flush()


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly scalar."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
