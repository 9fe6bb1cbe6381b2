"""Dispatch of rich outputs (images, tables, text, JSON) over the trainer's loggers.

Lightning has no common API for images or tables, so each function here knows the loggers users pick:
``TensorBoardLogger`` (a ``SummaryWriter``), ``WandbLogger`` and, for ``CSVLogger`` or any logger with a ``log_dir``,
plain files. Loggers of other kinds are warned about once and skipped. Every function is a no-op off rank zero; call
them from every rank, but never place collectives inside them.

Names and text are made safe here, once for every caller: tags become path components confined under the logger's
directory (:func:`sanitize_tag`), W&B gets names its artifact store accepts, and ``<``/``>`` in markdown are escaped so
HTML in a slice name or an error message shows as text. A logger that fails is warned about and skipped; the others
still receive the entry.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_lens.utils.checks import check_instance

ImageLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "fast_tensorboard_checksums",
    "format_number",
    "log_figure",
    "log_html",
    "log_image",
    "log_json",
    "log_scalar_layout",
    "log_scalars",
    "log_table",
    "log_text",
    "logging_step",
    "sanitize_tag",
    "table_to_markdown",
]

_warned: set[Any] = set()

# characters kept in a path component; anything else (spaces, ':', '&', '<', NUL, ...) becomes '_'
_UNSAFE_PATH_CHARS = re.compile(r"[^\w.=\-]+")
# W&B artifact and media names: ASCII letters, digits, '_', '-', '.'
_UNSAFE_WANDB_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")
_MAX_COMPONENT_BYTES = 120  # file systems allow 255 bytes per name; leave room for the step suffix
_MAX_WANDB_KEY = 100  # W&B artifact names ("run-<id>-<key>") are limited to 128 characters


def _warn_once(key: Any, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _shorten(text: str, limit: int) -> str:
    """``text`` if short enough, else its head plus a hash of the whole (distinct long names stay distinct)."""
    if len(text.encode("utf-8")) <= limit:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    head = text
    while len(head.encode("utf-8")) > limit - 9:
        head = head[:-1]
    return f"{head}-{digest}"


def sanitize_tag(tag: str) -> str:
    """``tag`` as ``/``-joined path components that cannot leave the folder they are joined to.

    ``/`` and ``\\`` separate components; empty, ``.`` and ``..`` components are dropped, dots at either end of a
    component are stripped, and characters other than letters, digits, ``_``, ``-``, ``.`` and ``=`` become ``_``.
    Over-long components are shortened with a hash. Idempotent; returns ``""`` when nothing usable is left. Callbacks
    use it for their ``log_prefix``; every ``log_*`` function applies it to its tag.

    Example:
        >>> sanitize_tag("a/../../../x")
        'a/x'
        >>> sanitize_tag("/etc\\passwd")
        'etc/passwd'
        >>> sanitize_tag("slices/digit=3 & size<2")
        'slices/digit=3_size_2'
    """
    check_instance(tag, "tag", str)
    parts = []
    for part in re.split(r"[/\\]+", tag):
        part = _UNSAFE_PATH_CHARS.sub("_", part).strip(".")
        if part:
            parts.append(_shorten(part, _MAX_COMPONENT_BYTES))
    return "/".join(parts)


def _wandb_key(tag: str) -> str:
    """A sanitised tag restricted to the characters W&B accepts in artifact names (a table is stored as one)."""
    parts = [_UNSAFE_WANDB_CHARS.sub("_", p).strip(".") or "_" for p in tag.split("/")]
    return _shorten("/".join(parts), _MAX_WANDB_KEY)


def _escape_html(text: str) -> str:
    """Make HTML inert in markdown: ``<`` and ``>`` as entities (``&`` is kept so ``a & b`` stays readable)."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


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
            _warn_once(
                key,
                f"lightning-lens cannot log images, tables or text to {key} (no log_dir); supported: "
                "TensorBoardLogger, WandbLogger, CSVLogger or any logger with a log_dir",
            )
            continue
        yield kind, logger


def _dispatch(sinks: Sequence[tuple[str, Any]], tag: str, write: Callable[[str, Any], Any]) -> list[Any]:
    """``write(kind, logger)`` for every sink; a logger that raises is warned about once per (kind, error type) and
    skipped, so the other loggers still receive the entry. Returns the results of the loggers that succeeded."""
    results = []
    for kind, logger in sinks:
        try:
            results.append(write(kind, logger))
        except Exception as err:  # one broken logger must not cost the others the entry
            name = type(logger).__name__
            _warn_once(
                ("failed", kind, type(err).__name__),
                f"lightning-lens: {name} failed to log {tag!r} ({type(err).__name__}: {err}); the other loggers "
                f"received it. Further {type(err).__name__} errors from {kind} loggers are not reported.",
            )
    return results


def _safe_tag(tag: Any) -> str:
    """The sanitised tag; refuses a non-string and a tag with nothing usable left."""
    check_instance(tag, "tag", str)
    if not tag:
        raise ValueError("tag must be a non-empty string, got ''")
    safe = sanitize_tag(tag)
    if not safe:
        raise ValueError(
            f"tag {tag!r} has no usable path component; use letters, digits, '_', '-', '.' or '=' between '/'"
        )
    return safe


def _confined_path(root: str, tag: str, step: int, suffix: str) -> Optional[str]:
    """``<root>/lens/<tag>/step_<step><suffix>`` with its folder created, or None (warned once) if the resolved
    path leaves ``root`` (a symlink inside the log directory pointing elsewhere)."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, "lens", *tag.split("/"), f"step_{step:07d}{suffix}"))
    if os.path.commonpath([base, path]) != base:
        _warn_once(
            ("outside", base, tag),
            f"lightning-lens refused to write {tag!r}: its path {path} resolves outside the log directory {base}",
        )
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _file_path(logger: Any, tag: str, step: int, suffix: str) -> Optional[str]:
    return _confined_path(_log_dir(logger) or ".", tag, step, suffix)


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


#: zlib level of the PNGs the sinks write: 1 encodes about twice as fast as the default 6 (the encoding was most of a
#: logged grid's cost) for files a few percent larger on the flat colours of grids and figures
_PNG_COMPRESS_LEVEL = 1


def _png_bytes(arr: np.ndarray) -> bytes:
    """One PNG of a uint8 (H, W, 3) array (Pillow, a dependency of matplotlib)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def fast_tensorboard_checksums() -> bool:
    """Give TensorBoard's event writer a compiled CRC-32C (``google-crc32c``) instead of its pure-Python one.

    Without TensorFlow installed, TensorBoard checksums every record it writes with a Python loop over the bytes:
    ~8 ms for one 44 KB PNG, as much as encoding it, spent holding the GIL in the training process. The replacement
    is installed once (process-wide, for every writer, Lightning's own included) and only after it has given the
    same checksums as TensorBoard's on test data; without ``google-crc32c``'s compiled extension nothing changes.
    Returns whether the fast checksum is in use.

    Example:
        >>> fast_tensorboard_checksums() in (True, False)
        True
    """
    global _FAST_CRC
    if _FAST_CRC is not None:
        return _FAST_CRC
    _FAST_CRC = False
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if getattr(google_crc32c, "implementation", None) != "c":
        return False
    reference = pywrap_tensorflow.masked_crc32c

    def masked_crc32c(data: bytes) -> int:  # TensorBoard's masking (rotate right 15, add a constant)
        x = google_crc32c.value(bytes(data)) & 0xFFFFFFFF
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    samples = [b"", b"a", bytes(range(256)) * 3, b"lightning-lens" * 37]
    if record_writer.masked_crc32c is reference and all(masked_crc32c(d) == reference(d) for d in samples):
        record_writer.masked_crc32c = masked_crc32c
        _FAST_CRC = True
    return _FAST_CRC


_FAST_CRC: Optional[bool] = None


def warm_up() -> None:
    """Import what the first image write needs (Pillow's PNG encoder and its plugins, TensorBoard's summary protocol
    buffers, the compiled CRC module), so that the first write inside a training hook does not pay for it."""
    from PIL import Image, PngImagePlugin  # noqa: F401

    Image.preinit()
    try:
        from tensorboard.compat.proto import summary_pb2  # noqa: F401
    except ImportError:
        pass
    try:
        import google_crc32c  # noqa: F401
    except ImportError:
        pass


def _tensorboard_image(writer: Any, tag: str, arr: np.ndarray, step: int) -> None:
    """``writer.add_image`` with the PNG encoded once, by :func:`_png_bytes`: ``add_image`` converts the array to
    float and back and encodes at zlib level 6. Writers other than torch's ``SummaryWriter`` get ``add_image``."""
    fast_tensorboard_checksums()
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if not type(writer).__module__.startswith("torch.utils.tensorboard") or get_file_writer is None:
        writer.add_image(tag, arr, global_step=step, dataformats="HWC")
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=int(arr.shape[0]), width=int(arr.shape[1]), colorspace=int(arr.shape[2]),
                          encoded_image_string=_png_bytes(arr))
    get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def format_number(value: Union[float, int, str, None]) -> str:
    """The one number format of every table the library logs (markdown, files), of the console summaries and of the
    run report.

    The rule: integers as they are; floats with 3 significant figures (``0.512``, ``12.3``, ``0.00955``), rounded to
    an integer from 100 on (``1234``) and in scientific notation from 1e6 on (``1.23e+06``); a non-zero magnitude
    below 1e-3 is written ``<1e-3`` (``-<1e-3`` when negative) instead of ``3.3e-25``: at three significant figures
    against the other entries it is zero, and the sign and "not exactly zero" are all that is left to say. Exact zero
    is ``0``; ``nan``, ``inf`` and ``-inf`` are spelled out; a missing number (``None``) is ``nan``, and text is
    returned as it is (a table cell that holds a name). Machine-readable outputs (CSV, JSON, W&B tables) keep the
    full values.

    Example:
        >>> [format_number(v) for v in (0.51234, 3.3e-25, 0.0009554, 0.0123456, 12.345, 1234.5, 2.5e7, 0.0, 42)]
        ['0.512', '<1e-3', '<1e-3', '0.0123', '12.3', '1234', '2.5e+07', '0', '42']
        >>> format_number(-0.0001), format_number(float("nan")), format_number(float("-inf")), format_number(None)
        ('-<1e-3', 'nan', '-inf', 'nan')
    """
    if value is None:
        return "nan"
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    magnitude = abs(v)
    if magnitude == 0.0:
        return "0"
    if magnitude < 1e-3:
        return "-<1e-3" if v < 0 else "<1e-3"
    if magnitude < 100.0:
        return f"{v:.3g}"
    if magnitude < 1e6:
        return str(int(round(v)))
    return f"{v:.3g}"


def _format_cell(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return format_number(value)
    return _escape_html(str(value)).replace("|", "\\|").replace("\n", " ")


def table_to_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]], legend: Optional[str] = None) -> str:
    """A GitHub-flavoured markdown table (TensorBoard's text plugin renders it); HTML in cells is escaped, numbers
    are written by :func:`format_number`, and ``legend`` (what the columns mean) is a line in italics under it.

    Example:
        >>> print(table_to_markdown(["slice", "acc"], [["digit=3", 0.51234], ["<b>x</b>", 1]], legend="acc: accuracy"))
        | slice | acc |
        | --- | --- |
        | digit=3 | 0.512 |
        | &lt;b&gt;x&lt;/b&gt; | 1 |
        <BLANKLINE>
        *acc: accuracy*
    """
    lines = ["| " + " | ".join(_format_cell(str(c)) for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_format_cell(v) for v in row) + " |" for row in rows]
    if legend:
        lines += ["", "*" + _escape_html(str(legend)).replace("*", "\\*").replace("\n", " ") + "*"]
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
        tag: name such as ``"saliency/gradient"``; TensorBoard tag, W&B key, or folder under ``<log_dir>/lens``
            (sanitised with :func:`sanitize_tag`).
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

    def write(kind: str, logger: Any) -> None:
        if kind == "tensorboard":
            _tensorboard_image(logger.experiment, tag, arr, step)
            logger.experiment.flush()
        elif kind == "wandb":
            kwargs = {"caption": [caption]} if caption else {}
            logger.log_image(key=_wandb_key(tag), images=[arr], step=step, **kwargs)
        else:
            path = _file_path(logger, tag, step, ".png")
            if path is None:
                return
            with open(path, "wb") as f:
                f.write(_png_bytes(arr))
            if caption:
                with open(path[: -len(".png")] + ".txt", "w") as f:
                    f.write(caption)

    _dispatch(sinks, tag, write)


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
    trainer: Any,
    tag: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: Optional[int] = None,
    legend: Optional[str] = None,
) -> None:
    """Log a table: markdown text in TensorBoard, ``log_table`` in W&B, CSV + markdown files elsewhere.

    HTML in cells is escaped in the markdown (TensorBoard, ``.md``), numbers there are written by
    :func:`format_number`; W&B and the CSV get the values as they are (numbers stay numbers, so W&B sorts them).
    ``legend``, one line saying what the columns mean, goes under the markdown table (TensorBoard, ``.md``).

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
    markdown = table_to_markdown(columns, rows, legend=legend)
    plain = [[_plain(v) for v in r] for r in rows]

    def write(kind: str, logger: Any) -> None:
        if kind == "tensorboard":
            logger.experiment.add_text(tag, markdown, global_step=step)
            logger.experiment.flush()
        elif kind == "wandb":
            logger.log_table(key=_wandb_key(tag), columns=columns, data=plain, step=step)
        else:
            path = _file_path(logger, tag, step, ".csv")
            if path is None:
                return
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(plain)
            with open(path[: -len(".csv")] + ".md", "w") as f:
                f.write(markdown + "\n")

    _dispatch(sinks, tag, write)


def log_text(trainer: Any, tag: str, text: str, step: Optional[int] = None) -> None:
    """Log markdown text: TensorBoard's text plugin, a one-cell W&B table, or a ``.md`` file.

    ``<`` and ``>`` are escaped for TensorBoard and the ``.md`` file, so HTML (``<script>``, ``<lambda>`` in an error
    message) shows as text; markdown emphasis, lists and tables still render.

    Example:
        >>> log_text(trainer, "saliency/errors", "Grad-CAM failed: <lambda> raised")  # doctest: +SKIP
    """
    tag = _safe_tag(tag)
    text = str(text)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    step = _step(trainer, step)
    markdown = _escape_html(text)

    def write(kind: str, logger: Any) -> None:
        if kind == "tensorboard":
            logger.experiment.add_text(tag, markdown, global_step=step)
            logger.experiment.flush()
        elif kind == "wandb":
            logger.log_text(key=_wandb_key(tag), columns=["text"], data=[[text]], step=step)
        else:
            path = _file_path(logger, tag, step, ".md")
            if path is not None:
                with open(path, "w") as f:
                    f.write(markdown + "\n")

    _dispatch(sinks, tag, write)


def log_html(
    trainer: Any,
    tag: str,
    html_fragment: str,
    step: Optional[int] = None,
    image: Optional[ImageLike] = None,
    caption: Optional[str] = None,
) -> None:
    """Log an HTML fragment (e.g. tokens coloured by attribution): ``wandb.Html`` in W&B, an ``.html`` file under
    ``<log_dir>/lens/<tag>/`` elsewhere; TensorBoard cannot show HTML, so it gets ``image`` (the same content as
    pixels) when given, else nothing. The fragment is written as given: build it from escaped text (as
    :func:`lightning_lens.render.text_html` does); the file gets a minimal page around it with the escaped caption.

    Example:
        >>> log_html(trainer, "saliency/text/gradient", "<div>great</div>", image=png)  # doctest: +SKIP
    """
    import html as _html

    tag = _safe_tag(tag)
    check_instance(html_fragment, "html_fragment", str)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    step = _step(trainer, step)
    arr = None if image is None else _as_hwc_uint8(image)
    title = _html.escape(caption if caption is not None else tag)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>"
            f"<body><p>{title}</p>\n{html_fragment}\n</body></html>\n")

    def write(kind: str, logger: Any) -> None:
        if kind == "tensorboard":
            if arr is not None:
                _tensorboard_image(logger.experiment, tag, arr, step)
                logger.experiment.flush()
        elif kind == "wandb":
            import wandb

            logger.log_metrics({_wandb_key(tag): wandb.Html(page)}, step=step)
        else:
            path = _file_path(logger, tag, step, ".html")
            if path is not None:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(page)

    _dispatch(sinks, tag, write)


def log_json(trainer: Any, tag: str, obj: Any, step: Optional[int] = None) -> Optional[str]:
    """Write ``obj`` as a JSON artifact under each logger's directory; W&B also uploads it with the run.

    Returns the path written for the first logger that succeeded (None off rank zero, without loggers, or when
    every logger failed or refused the path).

    Example:
        >>> log_json(trainer, "slices/all", {"slices": []})  # doctest: +SKIP
        'logs/csv/version_0/lens/slices/all/step_0000042.json'
    """
    tag = _safe_tag(tag)
    sinks = list(_sinks(trainer))
    if not sinks:
        return None
    step = _step(trainer, step)
    text = json.dumps(obj, indent=2, default=_plain)

    def write(kind: str, logger: Any) -> Optional[str]:
        if kind == "wandb":
            run = logger.experiment
            path = _confined_path(run.dir, tag, step, ".json")
            if path is not None:
                with open(path, "w") as f:
                    f.write(text)
                run.save(path, base_path=run.dir, policy="now")
        else:
            path = _file_path(logger, tag, step, ".json")
            if path is not None:
                with open(path, "w") as f:
                    f.write(text)
        return path

    return next((p for p in _dispatch(sinks, tag, write) if p is not None), None)


def log_scalars(trainer: Any, metrics: Mapping[str, Union[float, torch.Tensor]], step: Optional[int] = None) -> None:
    """Send scalars straight to every logger (``logger.log_metrics``), also from hooks where ``pl_module.log`` is not
    allowed (``on_fit_end``). Use ``pl_module.log`` instead when EarlyStopping or ModelCheckpoint must monitor them.

    Metric names are passed as they are (they name no file): ``slices/acc/colour=2&size=1`` stays readable. A logger
    that raises is warned about and skipped.

    Example:
        >>> log_scalars(trainer, {"sanity/gradient/spearman_abs": 0.02})  # doctest: +SKIP
    """
    if not getattr(trainer, "is_global_zero", True):
        return
    values: dict[str, float] = {}
    for k, v in metrics.items():
        check_instance(k, "metric name", str)
        if not k:
            raise ValueError("metric names must be non-empty strings, got ''")
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"metric {k!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        values[k] = float(v)
    if not values:
        return
    step = _step(trainer, step)
    sinks = [(_kind(logger), logger) for logger in getattr(trainer, "loggers", []) or []]

    def write(kind: str, logger: Any) -> None:
        logger.log_metrics(values, step=step)
        if kind == "tensorboard":
            logger.experiment.flush()
        elif kind == "wandb":
            _wandb_line_series(logger, values, step)

    _dispatch(sinks, ", ".join(values), write)


# TensorBoard shows one custom-scalar layout per run (the last written): the charts of every callback are merged here,
# per writer, and the merged layout is written again only when a chart is added
_layouts: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]]" = weakref.WeakKeyDictionary()
_wandb_layouts: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]]" = weakref.WeakKeyDictionary()


def _check_layout(layout: Any) -> dict[str, dict[str, list[str]]]:
    check_instance(layout, "layout", Mapping, hint="{category: {chart title: [scalar tags or regexes]}}")
    out: dict[str, dict[str, list[str]]] = {}
    for category, charts in layout.items():
        check_instance(category, "layout category", str)
        check_instance(charts, f"layout[{category!r}]", Mapping, hint="{chart title: [scalar tags or regexes]}")
        out[category] = {}
        for title, tags in charts.items():
            check_instance(title, "layout chart title", str)
            if isinstance(tags, str) or not isinstance(tags, Sequence) or not tags:
                raise TypeError(
                    f"layout[{category!r}][{title!r}] must be a non-empty list of scalar tags, got {tags!r}"
                )
            out[category][title] = [str(t) for t in tags]
    return out


def _merge_layout(target: dict[str, dict[str, list[str]]], layout: Mapping[str, Mapping[str, list[str]]]) -> bool:
    changed = False
    for category, charts in layout.items():
        known = target.setdefault(category, {})
        for title, tags in charts.items():
            if known.get(title) != list(tags):
                known[title] = list(tags)
                changed = True
    return changed


def log_scalar_layout(
    trainer: Any, layout: Mapping[str, Mapping[str, Sequence[str]]], step: Optional[int] = None
) -> None:
    """Put related scalars on one chart: a metric beside its chance level, one line per expert.

    ``layout`` is ``{category: {chart title: [tags]}}``; a tag may be a regular expression (``moe/l0/load/expert_\\d+``
    draws every expert). TensorBoard gets a custom-scalar layout (its "Custom Scalars" tab, a Multiline chart per
    title); the layouts of every callback are merged per run and rewritten only when a chart is new, so calling this
    every epoch costs nothing. W&B gets one line-series chart per title (``<category>/<title>``), redrawn from the
    values :func:`log_scalars` sends for those tags. Other loggers keep the plain scalars.

    Example:
        >>> log_scalar_layout(trainer, {"quality": {"pointing_game": ["quality/gradient/pointing_game/object",
        ...                                                           "quality/gradient/pointing_game/object_chance"]}})
        ... # doctest: +SKIP
    """
    checked = _check_layout(layout)
    sinks = list(_sinks(trainer))
    if not sinks:
        return
    step = _step(trainer, step)

    def write(kind: str, logger: Any) -> None:
        if kind == "tensorboard":
            writer = logger.experiment
            merged = _layouts.setdefault(writer, {})
            if _merge_layout(merged, checked):
                from torch.utils.tensorboard.summary import custom_scalars

                layout_summary = custom_scalars(
                    {c: {t: ["Multiline", tags] for t, tags in charts.items()} for c, charts in merged.items()}
                )
                writer._get_file_writer().add_summary(layout_summary, step)  # add_custom_scalars, with a step
                writer.flush()
        elif kind == "wandb":
            _merge_layout(_wandb_layouts.setdefault(logger, {}), checked)

    _dispatch(sinks, "scalar layout", write)


def _wandb_line_series(logger: Any, values: Mapping[str, float], step: int) -> None:
    """Redraw the W&B line-series charts of :func:`log_scalar_layout` whose tags are among ``values``."""
    layout = _wandb_layouts.get(logger)
    if not layout:
        return
    history = getattr(logger, "_lens_scalar_history", None)
    if history is None:
        history = {}
        setattr(logger, "_lens_scalar_history", history)
    charts = []
    for category, titles in layout.items():
        for title, patterns in titles.items():
            keys = [k for k in values if any(re.fullmatch(p, k) for p in patterns)]
            if keys:
                charts.append((f"{category}/{title}", title, patterns))
    if not charts:
        return
    for key, value in values.items():
        history.setdefault(key, {})[step] = value
    import wandb

    panels = {}
    for key, title, patterns in charts:
        series = sorted(k for k in history if any(re.fullmatch(p, k) for p in patterns))
        steps = sorted({s for k in series for s in history[k]})
        ys = [[history[k].get(s, float("nan")) for s in steps] for k in series]
        panels[_wandb_key(key)] = wandb.plot.line_series(xs=steps, ys=ys, keys=series, title=title, xname="step")
    logger.experiment.log(panels, commit=False)


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
