"""examples/dp_explanations.py in its --fast mode (the CI run): DP-SGD with Opacus at epsilon 1 and 8 and a
non-private run, maps logged for each, the table written as CSV and markdown."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
from pathlib import Path

import pytest

pytest.importorskip("opacus")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dp_explanations.py"


@pytest.mark.slow
def test_fast_mode_trains_each_privacy_level_and_writes_the_table(tmp_path, caplog):
    spec = importlib.util.spec_from_file_location("dp_explanations", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # in this process: no second interpreter start-up
    with caplog.at_level(logging.INFO, logger="dp_explanations"):
        example.main(["--fast", "--out-dir", str(tmp_path)])
    assert "spearman_vs_non_private" in caplog.text  # the table, through logging
    with open(tmp_path / "dp_table.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["non_private", "eps_8", "eps_1"]
    assert float(rows["non_private"]["spearman_vs_non_private"]) == pytest.approx(1.0)
    for name, target in (("eps_8", 8.0), ("eps_1", 1.0)):
        spent = float(rows[name]["epsilon_spent"])
        assert 0 < spent <= target * 1.01  # the accountant's epsilon reaches the target, not beyond
        assert float(rows[name]["noise_multiplier"]) > 0
        assert -1.0 <= float(rows[name]["spearman_vs_non_private"]) < 1.0
    assert float(rows["eps_1"]["noise_multiplier"]) > float(rows["eps_8"]["noise_multiplier"])
    for row in rows.values():
        assert 0.0 <= float(row["mass_on_digit"]) <= 1.0 and 0.0 <= float(row["mass_on_square"]) <= 1.0
        assert not math.isnan(float(row["loss_membership_auc"]))
        # the saliency callback logged maps for every run
        assert list((tmp_path / row["run"] / "version_0").glob("events.out.tfevents.*")), row["run"]
    assert (tmp_path / "dp_table.md").read_text().startswith("| run |")
