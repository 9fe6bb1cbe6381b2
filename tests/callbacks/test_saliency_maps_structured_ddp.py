"""SaliencyMapCallback's text, tabular and HuggingFace (ModelOutput) paths under 2-process DDP (gloo) in
``trainer.validate()`` give exactly what one process gives (saliency_maps_structured_ddp_script.py). The same paths
during fit are compared in test_permutation_importance.py (training differs there by the order of gradient sums)."""

from __future__ import annotations

from pathlib import Path

import _ddp
import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("saliency_maps_structured_ddp_script.py")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["text", "tabular", "bert"])
def test_two_processes_draw_the_probes_and_log_the_maps_of_one_process(tmp_path, task, read_tensorboard):
    if task == "bert":
        pytest.importorskip("transformers")
    reference = _ddp.load_script(SCRIPT).run(1, str(tmp_path / "one"), task)
    ranks = _ddp.run(SCRIPT, tmp_path / "two", "--task", task)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"] == reference["probe_indices"]
    assert len(reference["probe_indices"]) == 5
    assert sorted(ranks[0]["maps"]) == sorted(reference["maps"]) and len(reference["maps"]) == 2
    assert ranks[1]["maps"] == {}  # only rank zero computes and logs
    for name, maps in reference["maps"].items():
        np.testing.assert_allclose(ranks[0]["maps"][name], maps, rtol=1e-6, atol=1e-8)
        assert np.abs(np.asarray(maps)).max() > 0
    assert not any(ranks[0]["grads"]) and not any(ranks[1]["grads"])
    images = read_tensorboard(str(tmp_path / "two" / "tb")).Tags()["images"]  # rank zero's event file only
    assert {f"saliency/{name}" for name in reference["maps"]} <= set(images)
