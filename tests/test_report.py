"""``python -m lightning_lens report``: a self-contained HTML page from a short run's logs (TensorBoard event files
and the file sink), with the sanity verdicts explained, the slices, the maps over epochs and the curves; and the page
rendered in headless Chromium with every image loaded."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback, SubgroupErrorSlices
from lightning_lens.lightning_modules import LitClassifier, SpuriousDigitsDataModule
from lightning_lens.report import format_number
from lightning_lens.report.html import build_report, markdown_to_html
from lightning_lens.report.logs import find_runs, read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Every ``src``/``href`` and ``<img>`` of a page, and its visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data"):
                self.links.append(value or "")
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _fit(root, loggers):
    seed_everything(0)
    callbacks = [
        SaliencyMapCallback(methods=["gradient"], num_probes=4, target="prediction", quality_metrics=["relevance_mass"],
                            mask_regions=["square"], max_overhead=None),
        RandomizationSanityCheck(methods=["gradient"], num_probes=4),
        SubgroupErrorSlices(metadata_keys=["digit", "shortcut_present", "thickness"], num_images=4),
    ]
    trainer = Trainer(max_epochs=2, limit_train_batches=6, accelerator="cpu", devices=1, logger=loggers,
                      callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=2, default_root_dir=root)
    trainer.fit(LitClassifier(lr=5e-3), datamodule=SpuriousDigitsDataModule(batch_size=64, eval_batch_size=128))
    return callbacks


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(str(root / "logs"), name="short", default_hp_metric=False)
    callbacks = _fit(root, [logger])
    return root / "logs", callbacks


def _command(log_dir, output):
    return subprocess.run([sys.executable, "-m", "lightning_lens", "report", str(log_dir), "-o", str(output)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tensorboard_page(tensorboard_run, tmp_path_factory):
    log_dir, callbacks = tensorboard_run
    output = tmp_path_factory.mktemp("page") / "report.html"
    result = _command(log_dir, output)
    assert result.returncode == 0, result.stderr
    assert f"Report written to {output}" in result.stdout
    return output.read_text(encoding="utf-8"), callbacks, output


def test_the_page_is_self_contained(tensorboard_page):
    page, _, _ = tensorboard_page
    parsed = _parse(page)
    assert "http://" not in page and "https://" not in page
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in parsed.links), parsed.links
    assert "script" not in parsed.tags and "link" not in parsed.tags  # inline CSS, nothing to load or run
    assert len(parsed.images) >= 5
    for src in parsed.images:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        from matplotlib.image import imread

        assert imread(io.BytesIO(png), format="png").shape[0] > 10  # decodes as a real PNG


def test_the_page_explains_every_verdict_with_its_numbers(tensorboard_page):
    page, callbacks, _ = tensorboard_page
    report = callbacks[1].last_report
    text = " ".join(_parse(page).text)
    assert "Randomization sanity check" in text
    assert f"deciding metric: {report.rule.metric}" in text
    for name, verdict in report.verdicts.items():
        row = re.search(rf"<tr><td>{re.escape(name)}( \(control\))?</td><td class=\"(\w+)\">(\w+)</td>(.*?)</tr>",
                        page)
        assert row is not None, name
        assert row.group(3) == verdict.outcome
        assert f'<td class="num">{format_number(verdict.similarity)}</td>' in row.group(4)
    assert "edge (control)" in text and "random (control)" in text
    meaning = {"passes": "the maps changed when", "fails": "barely changed", "inconclusive": "cannot tell"}
    assert meaning[report.verdicts["gradient"].outcome] in text  # the verdict in words
    assert "control (an edge map ignores the model" in text  # the control's expected verdict, and why


def test_the_page_holds_maps_over_epochs_slices_and_curves(tensorboard_page):
    page, callbacks, _ = tensorboard_page
    saliency, _, slices = callbacks
    parsed = _parse(page)
    text = " ".join(parsed.text)
    # maps of both epochs (the first and the last are always due), each captioned with its epoch
    assert "saliency/gradient" in text and "epoch 0" in text and "epoch 1" in text
    assert "Error slices" in text and "overall accuracy" in text
    for s in slices.last_slices[:3]:
        assert s.name in text
    # the curves: relevance mass beside its chance level on one chart, val/acc on its own
    assert "quality/gradient/relevance_mass" in text and "val/acc" in text


def test_the_file_sink_and_the_event_files_read_back_the_same_tags(tmp_path):
    """A run logged to both a CSVLogger (files) and TensorBoard: each source alone gives the sanity report, the
    maps and the slices."""
    csv = CSVLogger(str(tmp_path / "csv"), name="short")
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="short", default_hp_metric=False)
    _fit(tmp_path, [csv, tb])
    (csv_dir,) = find_runs(str(tmp_path / "csv"))
    (tb_dir,) = find_runs(str(tmp_path / "tb"))
    from_files, from_events = read_run(csv_dir), read_run(tb_dir)
    assert from_files.source == "files" and from_events.source == "files+tensorboard"  # JSON beside the events
    for run in (from_files, from_events):
        assert {"saliency/gradient", "sanity/cascade", "slices/worst_examples"} <= set(run.images)
        assert run.latest_json("sanity/report")["methods"].keys() >= {"gradient", "edge", "random"}
        assert "slices/top" in run.texts
        assert len(run.scalars["val/acc"]) == 2
    assert [s for s, _, _ in from_files.images["saliency/gradient"]] == \
        [s for s, _, _ in from_events.images["saliency/gradient"]]
    assert from_files.texts["slices/top"][-1][1] == from_events.texts["slices/top"][-1][1]
    page = build_report(str(tmp_path / "csv"))
    assert "Randomization sanity check" in page and "Error slices" in page


def test_a_missing_or_empty_log_dir_is_a_clear_error(tmp_path):
    result = _command(tmp_path / "nope", tmp_path / "r.html")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _command(tmp_path, tmp_path / "r.html")
    assert result.returncode == 2 and "holds no TensorBoard event files" in result.stderr


def test_logged_text_is_escaped():
    html = markdown_to_html("| slice | note |\n| --- | --- |\n| &lt;script&gt;alert(1)&lt;/script&gt; | a & b |")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a &amp; b" in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHECK_IMAGES = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', images.length + ' loaded=' + (images.length - broken.length));
});
</script>"""


def test_chromium_renders_the_page_with_every_image_loaded(tensorboard_page, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); the page was checked "
                    "without a browser by the other tests")
    page, _, _ = tensorboard_page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _CHECK_IMAGES + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()], capture_output=True, text=True, timeout=180)
    match = re.search(r'data-images="(\d+) loaded=(\d+)"', result.stdout)
    assert match is not None, result.stderr[-2000:]
    total, loaded = int(match.group(1)), int(match.group(2))
    assert total == page.count("<img ") and total >= 5
    assert loaded == total


def test_one_number_format_and_one_table_of_control_expectations():
    from lightning_lens import loggers, render
    from lightning_lens.report import CONTROL_EXPECTED
    from lightning_lens.report.summaries import text_table

    assert format_number is loggers.format_number  # the logged tables, the console and the report agree
    assert CONTROL_EXPECTED is render.CONTROL_EXPECTATIONS  # the figures and the report explain controls alike
    assert [format_number(v) for v in (0.0009554, 1234.5, float("inf"), None, "edge", 3)] == \
        ["<1e-3", "1234", "inf", "nan", "edge", "3"]
    assert text_table(["method", "score"], [["edge", 0.0001], ["gradient", 2.5e7]]).splitlines()[1:] == \
        ["  edge      <1e-3", "  gradient  2.5e+07"]
