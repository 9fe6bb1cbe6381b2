"""The run report shows the HTML token views a text model's SaliencyMapCallback logged (file sink), each inside a
sandboxed iframe whose srcdoc is the logged page (attribute-escaped, behind a no-fetch content security policy)."""

from __future__ import annotations

import glob
import os
from html.parser import HTMLParser

from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.datasets import SpuriousText
from lightning_lens.report.html import _FRAME_POLICY, build_report, embed_page
from lightning_lens.report.logs import read_run
from lightning_lens.testing import LitClassifier, TinyTextTransformer


class _Frames(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[dict[str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "iframe":
            self.frames.append({k: v or "" for k, v in attrs})


def _parse(page: str) -> _Frames:
    parser = _Frames()
    parser.feed(page)
    return parser


def test_a_text_runs_report_embeds_its_token_views(tmp_path):
    seed_everything(0)
    text = SpuriousText("val", size=16, seed=0)
    lit = LitClassifier(TinyTextTransformer(len(text.vocabulary), 2, dim=16), num_classes=2)
    cb = SaliencyMapCallback(methods=["gradient_x_input"], layer="model.token_embedding", tokenizer=text,
                             num_probes=3, max_overhead=None, strict=True)
    logger = CSVLogger(str(tmp_path / "logs"), name="text")
    Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path)).validate(lit, DataLoader(text, batch_size=8))
    (logged,) = glob.glob(os.path.join(logger.log_dir, "lens", "saliency", "gradient_x_input", "step_*.html"))
    with open(logged, encoding="utf-8") as f:
        written = f.read().rstrip("\n")
    assert read_run(logger.log_dir).pages == {"saliency/gradient_x_input": [(0, written)]}

    page = build_report(str(tmp_path / "logs"))
    parsed = _parse(page)
    (frame,) = parsed.frames
    assert frame["sandbox"] == ""  # no scripts, no forms, no same-origin access
    assert "script" not in parsed.tags
    doc = frame["srcdoc"]  # the parser undoes the attribute escaping: the logged page, with the policy in its head
    assert doc == written.replace("<head>", "<head>" + _FRAME_POLICY, 1)
    probe_tokens = text.convert_ids_to_tokens(cb.probes.inputs["input_ids"][0].tolist())
    assert 'class="lens-row"' in doc and any(f">{t}</span>" in doc for t in probe_tokens)
    assert 'id="' in page and "Token views" in page


def test_an_embedded_page_cannot_break_out_of_its_frame():
    hostile = '<p title="x">a</p></iframe><script>alert(1)</script><img src="http://example.com/x.png">'
    frame = embed_page(hostile, 'a "title"')
    parsed = _parse(frame)
    assert parsed.tags == ["iframe"] and "<script>" not in frame
    (attrs,) = parsed.frames
    assert attrs["srcdoc"] == _FRAME_POLICY + hostile and attrs["title"] == 'a "title"'
    assert "default-src 'none'" in _FRAME_POLICY  # the image would not be fetched either
