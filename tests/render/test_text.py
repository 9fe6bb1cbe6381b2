"""Token attributions drawn as text: diverging colours centred at 0, hidden tokens not drawn, wrapping, escaped HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lightning_lens.render import decode_tokens, special_token_ids, text_heatmap, text_html, token_colors
from lightning_lens.render.heatmap import colorize


def test_token_colors_are_the_diverging_map_centred_at_zero():
    colors = token_colors([2.0, 0.0, -2.0, 1.0])
    np.testing.assert_array_equal(colors[1], colorize(np.zeros(1), True)[0])  # 0 -> the centre colour
    np.testing.assert_array_equal(colors[0], colorize(np.ones(1), True)[0])  # the largest |score| -> an end
    np.testing.assert_array_equal(colors[2], colorize(-np.ones(1), True)[0])
    np.testing.assert_array_equal(colors[3], colorize(np.full(1, 0.5), True)[0])
    np.testing.assert_array_equal(token_colors([1.0], vmax=2.0)[0], colorize(np.full(1, 0.5), True)[0])
    assert (token_colors([0.0, 0.0]) == colorize(np.zeros(1), True)[0]).all()  # an all-zero row: no division by 0


def _has(img: np.ndarray, color: np.ndarray) -> int:
    return int((img == color).all(axis=-1).sum())


def test_every_visible_token_gets_its_background_and_hidden_tokens_are_not_drawn():
    tokens = [["[CLS]", "great", "bad", "[PAD]"]]
    scores = [[5.0, 1.0, -1.0, 3.0]]
    hide = [[True, False, False, True]]
    img = text_heatmap(tokens, scores, hide=hide)
    red, blue = token_colors([1.0, -1.0])
    assert _has(img, red) > 50 and _has(img, blue) > 50  # "great" and "bad" on full-colour boxes (scaled to row max)
    # the hidden tokens take no place: the same image as without them
    np.testing.assert_array_equal(img, text_heatmap([["great", "bad"]], [[1.0, -1.0]]))


def test_long_rows_wrap_and_labels_take_a_line():
    tokens = [["word"] * 40]
    wide = text_heatmap(tokens, [[1.0] * 40], width=2000)
    narrow = text_heatmap(tokens, [[1.0] * 40], width=200)
    assert narrow.shape[1] == 200 and narrow.shape[0] > 3 * wide.shape[0]
    labelled = text_heatmap(tokens, [[1.0] * 40], width=2000, labels=["#1 y=1 pred=1"])
    assert labelled.shape[0] > wide.shape[0]


def test_html_escapes_tokens_and_labels_and_colours_like_the_image():
    html = text_html([["<script>", "ok", "[PAD]"]], [[1.0, -0.5, 9.0]], labels=["a & <b>"],
                     hide=[[False, False, True]])
    assert "<script>" not in html and "&lt;script&gt;" in html and "a &amp; &lt;b&gt;" in html
    assert "[PAD]" not in html
    colors = re.findall(r"background-color:#([0-9a-f]{6})", html)
    expected = token_colors([1.0, -0.5])
    assert colors == ["%02x%02x%02x" % tuple(int(v) for v in c) for c in expected]


def test_decoding_through_tokenizers_and_vocabularies():
    class HF:
        all_special_ids = [0, 101]

        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    class Decoder:
        def decode(self, ids):
            return "w" + str(ids[0])

    ids = torch.tensor([101, 5, 0])
    assert decode_tokens(ids, HF()) == ["t101", "t5", "t0"]
    assert decode_tokens(ids, Decoder()) == ["w101", "w5", "w0"]
    assert special_token_ids(HF()) == {0, 101}
    assert special_token_ids(["<pad>", "a", "[CLS]", "[x"]) == {0, 2}
    with pytest.raises(TypeError, match="tokenizer must have convert_ids_to_tokens"):
        decode_tokens(ids, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"scores": [[1.0]]}, r"scores\[0\] has 1 values for 2 tokens"),
    ({"labels": ["a", "b"]}, "labels has 2 entries for 1 rows"),
    ({"hide": [[True]]}, r"hide\[0\] has 1 entries for 2 tokens"),
])
def test_mismatched_rows_are_refused(kwargs, match):
    args = {"tokens": [["a", "b"]], "scores": [[1.0, 2.0]], **kwargs}
    with pytest.raises(ValueError, match=match):
        text_heatmap(**args)
