"""SaliencyMapCallback under DDP (2 gloo CPU processes, run as a subprocess by saliency_maps_ddp_script.py)."""

from __future__ import annotations

from pathlib import Path

import _ddp
import pytest

SCRIPT = Path(__file__).with_name("saliency_maps_ddp_script.py")


@pytest.mark.slow
def test_ddp_probes_are_the_one_process_probes_and_only_rank_zero_logs(tmp_path, read_tensorboard):
    (single,) = _ddp.run(SCRIPT, tmp_path / "one", devices=1)
    ranks = _ddp.run(SCRIPT, tmp_path / "two")
    assert [r["rank"] for r in ranks] == [0, 1]
    # drawn by global dataset position on every rank: the same 6 probes as one process (not rank 0's shard)
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"] == single["probe_indices"]
    assert len(single["probe_indices"]) == 6
    assert ranks[0]["computed"] == ["gradcam", "gradient"] and ranks[1]["computed"] == []
    ea = read_tensorboard(str(tmp_path / "two" / "tb"))  # exactly one event file: rank 0's
    for name in ("gradient", "gradcam"):
        # 64 digits / 16 per batch / 2 ranks = 2 steps per epoch; logged at Lightning's val step (global_step - 1)
        assert [e.step for e in ea.Images(f"saliency/{name}")] == [1, 3]


@pytest.mark.slow
def test_ddp_a_callable_failing_on_rank_zero_neither_hangs_nor_kills_rank_one(tmp_path, read_tensorboard):
    ranks = _ddp.run(SCRIPT, tmp_path, "--fail-denormalize")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["epochs"] for r in ranks] == [2, 2]  # both ranks finished the fit
    (report, *_) = [w for w in ranks[0]["warnings"] if "denormalize broke on rank 0" in w]
    assert "SaliencyMapCallback: 'denormalize' failed at epoch 0 with RuntimeError" in report
    assert not [w for w in ranks[1]["warnings"] if "failed at epoch" in w]
    # the maps are still logged, without denormalization, every epoch
    ea = read_tensorboard(str(tmp_path / "tb"))
    for name in ("gradient", "gradcam"):
        assert [e.step for e in ea.Images(f"saliency/{name}")] == [1, 3]
    assert ranks[0]["computed"] == ["gradcam", "gradient"]
