"""examples/vit_digits.py runs end to end in its ``--fast`` mode and logs rollout, gradient rollout and token-grid CAM
maps and their relevance mass on the square (read back from the TensorBoard event file)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_vit_digits_example_logs_rollout_and_token_cam_maps(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [sys.executable, str(EXAMPLES / "vit_digits.py"), "--fast", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Relevance mass on the square" in proc.stdout
    files = glob.glob(str(tmp_path / "logs" / "vit_digits" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    events = EventAccumulator(files[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    methods = {"attention_rollout", "gradient_rollout", "gradcam", "hirescam_tokens"}
    assert {f"saliency/{m}" for m in methods} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    for m in methods:
        assert {f"quality/{m}/relevance_mass/square", f"quality/{m}/relevance_mass/square_chance"} <= scalars
        values = [e.value for e in events.Scalars(f"quality/{m}/relevance_mass/square")]
        assert values and all(0.0 <= v <= 1.0 for v in values)
