"""The README's python code blocks run as written (in a short mode: every Trainer trains one epoch of a few batches)
and produce what the text around them says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: run before each block: every Trainer trains one epoch of 3 batches (the code of the block is left as written)
SHORT_MODE = """
import pytorch_lightning as _pl
_init = _pl.Trainer.__init__
def _short(self, *args, **kwargs):
    kwargs.update(max_epochs=1, limit_train_batches=3, enable_progress_bar=False)
    _init(self, *args, **kwargs)
_pl.Trainer.__init__ = _short
"""


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = _python_blocks()
    assert "trainer.fit(model, datamodule=dm)" in blocks[0] and sum("TracInCP" in block for block in blocks) == 1
    # issues 12, 13 and 15: text/HuggingFace, vision transformers, tabular, multi-input, model-agnostic, more methods,
    # tests of explanations; those blocks assert what their text claims, so running them is the check
    for marker in ("BertForSequenceClassification", "PermutationImportanceMonitor", "class ImageAndMeta", "KernelSHAP",
                   "ExcitationBackprop", "input_invariance", "GradientAttentionRollout"):
        assert sum(marker in block for block in blocks) >= 1, marker


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_a_readme_block_runs_as_written(tmp_path, index):
    block = _python_blocks()[index]
    script = tmp_path / "block.py"
    script.write_text(SHORT_MODE + block + "\nprint('BLOCK DONE')\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "BLOCK DONE" in result.stdout
    if index == 0:  # the quick start: its logs exist and the console summaries say what the README promises
        assert list((tmp_path / "lens_logs" / "readme").glob("version_0/events.out.tfevents.*"))
        assert "RandomizationSanityCheck verdicts" in result.stderr
        assert "SubgroupErrorSlices (slices): epoch 0:" in result.stderr
        # one short epoch: the 5 % budget lets the methods take turns, and the summary says which ran
        assert "SaliencyMapCallback: maps of gradient" in result.stderr and "logged at epochs 0" in result.stderr
        report = subprocess.run([sys.executable, "-m", "lightning_lens", "report", "lens_logs", "-o", "r.html"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stderr
        assert "Randomization sanity check" in (tmp_path / "r.html").read_text(encoding="utf-8")
    elif "TracInCP" in block:  # TracIn: the ranked ids are printed, and the offline scores came from the checkpoints
        ids = re.search(r"^\[(\d+(, \d+)*)\]$", result.stdout, flags=re.M)
        assert ids is not None and len(ids.group(1).split(",")) == 10
        assert list((tmp_path / "lens_logs" / "ckpt").glob("*.ckpt"))
