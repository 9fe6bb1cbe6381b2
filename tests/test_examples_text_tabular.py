"""examples/text_classifier.py and examples/tabular.py run end to end in their short ``--fast`` mode and log what they
promise (read back from the TensorBoard event files and the HTML files)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--fast", "--log-dir", str(tmp_path / "logs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _events(log_dir: Path) -> EventAccumulator:
    files = glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    acc = EventAccumulator(files[0], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_text_classifier_example_logs_token_maps(tmp_path):
    out = _run("text_classifier.py", tmp_path)
    assert "the shortcut token has the largest attribution" in out
    images = _events(tmp_path / "logs" / "text_classifier").Tags()["images"]
    assert {"saliency/gradient_x_input", "saliency/integrated_gradients", "saliency/attention_rollout"} <= set(images)
    pages = glob.glob(str(tmp_path / "logs" / "text_classifier_files" / "**" / "*.html"), recursive=True)
    assert len(pages) == 3 and all('class="lens-row"' in Path(p).read_text() for p in pages)


@pytest.mark.slow
def test_tabular_example_logs_importance_maps_and_slices(tmp_path):
    out = _run("tabular.py", tmp_path)
    assert "most important features" in out
    events = _events(tmp_path / "logs" / "tabular")
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert "importance/leak" in scalars and "importance/permutation" in images
    assert {"saliency/gradient_x_input", "saliency/integrated_gradients"} <= images
    assert len(events.Scalars("importance/leak")) == 2  # both epochs
    assert any(tag.startswith("slices/") for tag in scalars | images | set(events.Tags()["tensors"]))
