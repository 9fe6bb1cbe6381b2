"""Read back what the callbacks logged: file-sink artifacts and TensorBoard event files, as one :class:`RunLog` per run.

A *run* is a directory that holds TensorBoard event files (``events.out.tfevents.*``), a ``lens/`` folder of the
file sink (``lens/<tag>/step_<step>.{png,txt,csv,md,json,html}``, see :mod:`lightning_lens.loggers`) or a CSVLogger's
``metrics.csv``. Images, text and scalars come from the file sink when it has them and from the event files
otherwise (TensorBoard's ``EventAccumulator``); JSON artifacts are always files (TensorBoard runs write them beside
their event files). Plain Python: no Lightning.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["RunLog", "find_runs", "read_run"]

_STEP_FILE = re.compile(r"^step_(\d+)\.(png|txt|csv|md|json|html)$")
_EVENTS = "events.out.tfevents."


@dataclass
class RunLog:
    """Everything one run logged, by tag; every series is sorted by step.

    Attributes:
        path: the run's directory.
        images: tag -> ``[(step, png_bytes, caption or "")]``.
        scalars: tag -> ``[(step, value)]``.
        texts: tag -> ``[(step, markdown)]`` (tables are markdown text, as TensorBoard shows them).
        json: tag -> ``[(step, object)]``.
        pages: tag -> ``[(step, html)]``: the pages :func:`lightning_lens.loggers.log_html` wrote (token views; file
            sink only, TensorBoard gets their image instead).
        source: ``"files"``, ``"tensorboard"`` or both, joined with ``+``.
    """

    path: str
    images: dict[str, list[tuple[int, bytes, str]]] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    json: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    pages: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    source: str = ""

    def latest_json(self, tag: str) -> Optional[Any]:
        """The object of the last step logged under ``tag``, or None."""
        series = self.json.get(tag)
        return series[-1][1] if series else None

    @property
    def empty(self) -> bool:
        return not (self.images or self.scalars or self.texts or self.json or self.pages)


def _is_run(dirpath: str, dirnames: list[str], filenames: list[str]) -> bool:
    return (any(f.startswith(_EVENTS) for f in filenames) or "lens" in dirnames
            or "metrics.csv" in filenames)


def find_runs(log_dir: str) -> list[str]:
    """The run directories under ``log_dir`` (itself included), sorted; ``lens/`` folders are not searched.

    Example:
        >>> find_runs("/nonexistent")
        []
    """
    runs = []
    for dirpath, dirnames, filenames in os.walk(log_dir):
        if _is_run(dirpath, dirnames, filenames):
            runs.append(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d != "lens" and not d.startswith("."))
    return sorted(runs)


def _read_files(run: RunLog) -> None:
    root = os.path.join(run.path, "lens")
    if not os.path.isdir(root):
        return
    for dirpath, _, filenames in os.walk(root):
        tag = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in sorted(filenames):
            m = _STEP_FILE.match(name)
            if m is None:
                continue
            step, kind, path = int(m.group(1)), m.group(2), os.path.join(dirpath, name)
            if kind == "png":
                caption_path = path[: -len(".png")] + ".txt"
                caption = _read_text(caption_path) if os.path.exists(caption_path) else ""
                with open(path, "rb") as f:
                    run.images.setdefault(tag, []).append((step, f.read(), caption))
            elif kind == "md":
                run.texts.setdefault(tag, []).append((step, _read_text(path)))
            elif kind == "html":
                run.pages.setdefault(tag, []).append((step, _read_text(path)))
            elif kind == "json":
                try:
                    with open(path) as f:
                        run.json.setdefault(tag, []).append((step, json.load(f)))
                except (OSError, ValueError):
                    continue  # a half-written artifact: the others still make the page
    metrics = os.path.join(run.path, "metrics.csv")
    if os.path.exists(metrics):
        _read_metrics_csv(run, metrics)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().rstrip("\n")


def _read_metrics_csv(run: RunLog, path: str) -> None:
    """A CSVLogger's ``metrics.csv``: one column per metric, a ``step`` column, empty cells where not logged."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    run.scalars.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue


def _read_events(run: RunLog, event_files: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    for path in event_files:
        acc = EventAccumulator(path, size_guidance={IMAGES: 0, SCALARS: 0, TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
        if not run.images or "files" not in run.source:
            for tag in tags.get("images", []):
                run.images.setdefault(tag, []).extend(
                    (int(e.step), bytes(e.encoded_image_string), "") for e in acc.Images(tag))
        for tag in tags.get("scalars", []):
            run.scalars.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
        for tag in tags.get("tensors", []):
            text = _text_events(acc, tag)
            if text:
                run.texts.setdefault(tag.removesuffix("/text_summary"), []).extend(text)


def _text_events(acc: Any, tag: str) -> list[tuple[int, str]]:
    """The text summaries of ``tag`` (TensorBoard stores text as string tensors of the ``text`` plugin)."""
    meta = acc.SummaryMetadata(tag)
    if meta.plugin_data.plugin_name != "text":
        return []
    out = []
    for e in acc.Tensors(tag):
        values = e.tensor_proto.string_val
        if values:
            out.append((int(e.step), values[0].decode("utf-8", errors="replace")))
    return out


def read_run(path: str) -> RunLog:
    """Everything logged in the run directory ``path`` (see the module docstring).

    Example:
        >>> read_run("/nonexistent").empty
        True
    """
    run = RunLog(path=path)
    _read_files(run)
    sources = ["files"] if not run.empty else []
    run.source = "+".join(sources)
    try:
        names = sorted(os.listdir(path))
    except OSError:
        names = []
    events = [os.path.join(path, n) for n in names if n.startswith(_EVENTS)]
    if events:
        _read_events(run, events)
        sources.append("tensorboard")
    run.source = "+".join(sources)
    for series in (run.images, run.scalars, run.texts, run.json, run.pages):
        for tag in series:
            series[tag].sort(key=lambda item: item[0])
    for tag, values in run.scalars.items():
        run.scalars[tag] = [(s, v) for s, v in values if not math.isnan(v)] or values
    return run
