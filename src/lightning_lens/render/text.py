"""Token attributions as text: each token on a background coloured by its score (diverging, centred at 0).

Two outputs of the same rows: a uint8 (H, W, 3) image (for TensorBoard's Images tab; glyphs rasterized with
matplotlib's FreeType fonts, no pyplot state) and an HTML fragment (for W&B and the file sink; every token escaped).
Special and padding tokens are hidden; long sentences wrap; every row starts with its label (e.g. the label and the
prediction).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from matplotlib.font_manager import FontProperties, findfont, get_font

from lightning_lens.render.heatmap import DIVERGING_CMAP, colorize
from lightning_lens.utils.checks import check_int, check_optional, check_positive_number

__all__ = ["decode_tokens", "special_token_ids", "text_heatmap", "text_html", "token_colors"]

ScoresLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]
_PAD = 3
_BACKGROUND = 255


def _rows_of_scores(scores: ScoresLike, tokens: Sequence[Sequence[str]]) -> list[np.ndarray]:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    rows = [np.nan_to_num(np.asarray(s, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
            for s in scores]
    if len(rows) != len(tokens):
        raise ValueError(f"scores has {len(rows)} rows for {len(tokens)} rows of tokens")
    for r, (s, t) in enumerate(zip(rows, tokens)):
        if len(s) != len(t):
            raise ValueError(f"scores[{r}] has {len(s)} values for {len(t)} tokens")
    return rows


def _visible(tokens: Sequence[Sequence[str]], hide: Optional[Sequence[Sequence[bool]]]) -> list[np.ndarray]:
    if hide is None:
        return [np.ones(len(t), dtype=bool) for t in tokens]
    if len(hide) != len(tokens):
        raise ValueError(f"hide has {len(hide)} rows for {len(tokens)} rows of tokens")
    out = []
    for r, (h, t) in enumerate(zip(hide, tokens)):
        h = np.asarray(h.cpu() if isinstance(h, torch.Tensor) else h, dtype=bool).reshape(-1)
        if len(h) != len(t):
            raise ValueError(f"hide[{r}] has {len(h)} entries for {len(t)} tokens")
        out.append(~h)
    return out


def _scales(rows: list[np.ndarray], visible: list[np.ndarray], vmax: Optional[float]) -> list[float]:
    """Per row: ``vmax``, else the largest ``|score|`` among the row's visible tokens (0 for an all-zero row)."""
    if vmax is not None:
        return [float(vmax)] * len(rows)
    return [float(np.abs(s[v]).max()) if v.any() else 0.0 for s, v in zip(rows, visible)]


def token_colors(scores: ScoresLike, vmax: Optional[float] = None, cmap: Optional[str] = None) -> np.ndarray:
    """uint8 (N, 3) background colours of one row of token scores: diverging colormap, 0 at its centre (white),
    ``+-vmax`` (default: the row's largest ``|score|``) at its ends.

    Example:
        >>> token_colors([1.0, 0.0, -1.0]).tolist()
        [[103, 0, 31], [247, 247, 247], [5, 48, 97]]
    """
    check_optional(check_positive_number, vmax, "vmax")
    s = _rows_of_scores([np.asarray(scores, dtype=np.float64).reshape(-1)], [[""] * int(np.size(scores))])[0]
    scale = float(vmax) if vmax is not None else float(np.abs(s).max(initial=0.0))
    return _scaled_colors(s, scale, cmap)


def _scaled_colors(scores: np.ndarray, scale: float, cmap: Optional[str]) -> np.ndarray:
    """uint8 (N, 3) diverging colours of ``scores / scale`` (all the centre colour when ``scale`` is 0)."""
    normalized = scores / scale if scale > 0 else np.zeros_like(scores)
    return colorize(normalized, True, cmap or DIVERGING_CMAP).reshape(-1, 3)


@functools.lru_cache(maxsize=8)
def _font(fontsize: float) -> object:
    font = get_font(findfont(FontProperties(size=fontsize)))
    return font


class _Glyphs:
    """Measures and rasterizes short strings with matplotlib's FreeType font objects (72 dpi: 1 point = 1 pixel)."""

    def __init__(self, fontsize: float) -> None:
        self.fontsize = float(fontsize)
        self.font = _font(self.fontsize)
        self.line_height = int(np.ceil(self.fontsize * 1.5))
        self._cache: dict[str, tuple[np.ndarray, int]] = {}

    def render(self, text: str) -> np.ndarray:
        """Coverage uint8 (line_height, width) of one string, baseline placed for this line height."""
        if text not in self._cache:
            font = self.font
            font.set_size(self.fontsize, 72)  # type: ignore[attr-defined]
            font.set_text(text, 0.0)  # type: ignore[attr-defined]
            font.draw_glyphs_to_bitmap(antialiased=True)  # type: ignore[attr-defined]
            bitmap = np.asarray(font.get_image())  # type: ignore[attr-defined]
            descent = int(round(font.get_descent() / 64.0))  # type: ignore[attr-defined]
            out = np.zeros((self.line_height, max(bitmap.shape[1], 1)), dtype=np.uint8)
            top = max(0, self.line_height - _PAD - bitmap.shape[0] + descent)
            h = min(bitmap.shape[0], self.line_height - top)
            out[top : top + h, : bitmap.shape[1]] = bitmap[:h]
            self._cache[text] = (out, bitmap.shape[1])
        return self._cache[text][0]


def _ink(background: np.ndarray) -> np.ndarray:
    """Black text on light backgrounds, white on dark ones (luma below 0.5)."""
    luma = (0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]) / 255.0
    return np.array([255, 255, 255] if luma < 0.5 else [0, 0, 0], dtype=np.float64)


def text_heatmap(
    tokens: Sequence[Sequence[str]],
    scores: ScoresLike,
    labels: Optional[Sequence[str]] = None,
    hide: Optional[Sequence[Sequence[bool]]] = None,
    width: int = 720,
    fontsize: float = 14.0,
    vmax: Optional[float] = None,
    cmap: Optional[str] = None,
) -> np.ndarray:
    """Rows of tokens on backgrounds coloured by their scores, as one uint8 (H, W, 3) image.

    Every row starts on a new line with its label (bold-free, black), followed by the visible tokens, wrapped to
    ``width`` pixels. Colours: diverging colormap centred at 0 (red positive, blue negative), scaled per row by its
    largest visible ``|score|`` unless ``vmax`` puts every row on one scale.

    Args:
        tokens: one list of token strings per row.
        scores: one score per token (rows may differ in length; a (rows, tokens) tensor works).
        labels: one text per row, drawn before its tokens (e.g. ``"#12 y=1 pred=1 (0.93)"``).
        hide: True for tokens not to draw (special tokens, padding), same shape as ``tokens``.
        width: image width in pixels.
        fontsize: glyph size in pixels.
        vmax: common colour scale of all rows.
        cmap: a diverging matplotlib colormap name (default ``RdBu_r``).

    Example:
        >>> hide = [[True, False, False]]
        >>> img = text_heatmap([["[CLS]", "great", "film"]], [[0.0, 2.0, -0.5]], labels=["y=1"], hide=hide)
        >>> img.dtype, img.shape[1]
        (dtype('uint8'), 720)
    """
    rows = _rows_of_scores(scores, tokens)
    visible = _visible(tokens, hide)
    if labels is not None and len(labels) != len(tokens):
        raise ValueError(f"labels has {len(labels)} entries for {len(tokens)} rows of tokens")
    check_int(width, "width", minimum=64)
    check_positive_number(fontsize, "fontsize")
    check_optional(check_positive_number, vmax, "vmax")
    glyphs = _Glyphs(fontsize)
    scales = _scales(rows, visible, vmax)
    space = max(2, int(fontsize * 0.3))
    # layout: (line index, x, token text, background colour or None for a label)
    placed: list[tuple[int, int, str, Optional[np.ndarray]]] = []
    line = 0
    for r, (toks, s, v) in enumerate(zip(tokens, rows, visible)):
        x = _PAD
        if labels is not None:
            for part in str(labels[r]).split("\n"):
                placed.append((line, x, part, None))
                line += 1
        colors = _scaled_colors(s, scales[r], cmap)
        for j, token in enumerate(toks):
            if not v[j]:
                continue
            w = glyphs.render(str(token)).shape[1] + 2 * _PAD
            if x + w > width - _PAD and x > _PAD:
                line += 1
                x = _PAD
            placed.append((line, x, str(token), colors[j]))
            x += w + space
        line += 1 if x > _PAD or labels is None else 0
    height = max(1, line) * (glyphs.line_height + _PAD) + _PAD
    out = np.full((height, width, 3), _BACKGROUND, dtype=np.float64)
    for ln, x, text, color in placed:
        coverage = glyphs.render(text).astype(np.float64) / 255.0
        y = _PAD + ln * (glyphs.line_height + _PAD)
        if color is not None:
            box = out[y : y + glyphs.line_height, x : x + coverage.shape[1] + 2 * _PAD]
            box[:] = color
            ink, x = _ink(color), x + _PAD
        else:
            ink = np.zeros(3)
        w = min(coverage.shape[1], width - x)
        region = out[y : y + glyphs.line_height, x : x + w]
        alpha = coverage[: region.shape[0], :w, None]
        region[:] = region * (1.0 - alpha) + ink * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def text_html(
    tokens: Sequence[Sequence[str]],
    scores: ScoresLike,
    labels: Optional[Sequence[str]] = None,
    hide: Optional[Sequence[Sequence[bool]]] = None,
    vmax: Optional[float] = None,
    cmap: Optional[str] = None,
) -> str:
    """The rows of :func:`text_heatmap` as an HTML fragment: one ``<div>`` per row, each token a ``<span>`` with its
    background colour and its score as a tooltip; tokens and labels are HTML-escaped.

    Example:
        >>> fragment = text_html([["a", "<b>"]], [[1.0, 0.0]])
        >>> "&lt;b&gt;</span>" in fragment, fragment.count("<span"), 'title="1"' in fragment
        (True, 2, True)
    """
    rows = _rows_of_scores(scores, tokens)
    visible = _visible(tokens, hide)
    if labels is not None and len(labels) != len(tokens):
        raise ValueError(f"labels has {len(labels)} entries for {len(tokens)} rows of tokens")
    check_optional(check_positive_number, vmax, "vmax")
    scales = _scales(rows, visible, vmax)
    parts = ['<div class="lens-text">']
    for r, (toks, s, v) in enumerate(zip(tokens, rows, visible)):
        colors = _scaled_colors(s, scales[r], cmap)
        spans = []
        for j, token in enumerate(toks):
            if not v[j]:
                continue
            bg = "#%02x%02x%02x" % tuple(int(c) for c in colors[j])
            fg = "#%02x%02x%02x" % tuple(int(c) for c in _ink(colors[j]))
            spans.append(
                f'<span style="background-color:{bg};color:{fg};padding:1px 3px;margin:1px;border-radius:3px"'
                f' title="{s[j]:.4g}">{html.escape(str(token))}</span>'
            )
        label = f'<b class="lens-label">{html.escape(str(labels[r]))}</b> ' if labels is not None else ""
        parts.append(f'<div class="lens-row">{label}{" ".join(spans)}</div>')
    parts.append("</div>")
    return "".join(parts)


def decode_tokens(ids: Union[torch.Tensor, Sequence[int]], tokenizer: object) -> list[str]:
    """Token strings of one row of ids through ``tokenizer``: an object with ``convert_ids_to_tokens`` (HuggingFace
    tokenizers, :class:`~lightning_lens.datasets.SpuriousText`), else one with ``decode`` (called per id), else a
    sequence of strings indexed by id (a vocabulary). Ids outside a vocabulary show as ``[id]``.

    Example:
        >>> decode_tokens(torch.tensor([1, 0, 7]), ["[PAD]", "[CLS]", "good"])
        ['[CLS]', '[PAD]', '[7]']
    """
    values = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return [str(t) for t in convert(values)]
    decode = getattr(tokenizer, "decode", None)
    if callable(decode):
        return [str(decode([i])) for i in values]
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return [str(tokenizer[i]) if 0 <= i < len(tokenizer) else f"[{i}]" for i in values]
    raise TypeError(
        "tokenizer must have convert_ids_to_tokens or decode (a HuggingFace tokenizer) or be a list of token strings"
        f" indexed by id, got {type(tokenizer).__name__}"
    )


def special_token_ids(tokenizer: object) -> set[int]:
    """Ids of a tokenizer's special tokens (``all_special_ids`` or ``special_ids``), or, for a vocabulary list, of
    the entries written like ``[CLS]`` or ``<pad>``; hidden when tokens are drawn.

    Example:
        >>> sorted(special_token_ids(["[PAD]", "[CLS]", "good", "<s>"]))
        [0, 1, 3]
    """
    for attr in ("all_special_ids", "special_ids"):
        ids = getattr(tokenizer, attr, None)
        if ids is not None and not callable(ids):
            return {int(i) for i in ids}
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return {i for i, t in enumerate(tokenizer) if isinstance(t, str) and len(t) > 2
                and ((t[0], t[-1]) in (("[", "]"), ("<", ">")))}
    return set()
