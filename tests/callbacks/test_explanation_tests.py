"""ExplanationTestsCallback in real Trainer runs: the tests at the end of fit, what is logged, the setup checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import ExplanationTestsCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    train = Subset(SpuriousDigits("train", seed=0), range(64))
    val = Subset(SpuriousDigits("val", seed=0), range(32))
    return DataLoader(train, batch_size=32), DataLoader(val, batch_size=16)


def _module(seed: int = 0) -> LitClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LitClassifier(model=SmallCNN(width=4), lr=3e-3)


def _trainer(tmp_path, callbacks, logger=None) -> Trainer:
    return Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger if logger is not None else False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, callbacks=callbacks, num_sanity_val_steps=0)


def test_end_to_end_logs_the_verdicts_and_reads_back(tmp_path, loaders, read_tensorboard):
    callback = ExplanationTestsCallback(
        methods={"gradient": "gradient", "gradient_x_input": "gradient_x_input",
                 "ig_shifted": ("integrated_gradients", {"n_steps": 8})},
        shift_baselines=["ig_shifted"], num_probes=4, epsilon=0.1, fragility_steps=3, top_k=0.05)
    module = _module()
    reference = _module()
    trainer = _trainer(tmp_path, [callback], TensorBoardLogger(str(tmp_path), name="tb"))
    trainer.fit(module, *loaders)
    # training is unchanged by the callback
    plain = _trainer(tmp_path / "plain", [])
    plain.fit(reference, *loaders)
    for (k, v), (_, w) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(v, w), k

    invariance = callback.last_reports["input_invariance"]
    fragility = callback.last_reports["fragility"]
    assert {n: v.outcome for n, v in invariance.verdicts.items()} == {
        "gradient": "passes", "gradient_x_input": "fails", "ig_shifted": "passes"}
    assert bool(fragility.label_kept_attack.all())

    events = read_tensorboard(trainer.logger.log_dir)
    tags = events.Tags()
    assert {"explanations/input_invariance", "explanations/fragility"} <= set(tags["images"])
    for method, verdict in invariance.verdicts.items():
        (scalar,) = events.Scalars(f"explanations/input_invariance/{method}/verdict")
        assert scalar.value == {"passes": 1.0, "fails": -1.0, "inconclusive": 0.0}[verdict.outcome]
    (attack,) = events.Scalars("explanations/fragility/gradient/topk_attack")
    assert attack.value == pytest.approx(fragility.means()["topk_attack"], abs=1e-6)
    table = events.Tensors("explanations/input_invariance/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "gradient_x_input" in table and "fails" in table
    reports = list((tmp_path / "tb").rglob("*.json"))
    assert reports, "the JSON report is written next to the event file"
    saved = json.loads(reports[0].read_text())
    assert saved["input_invariance"]["verdicts"]["gradient_x_input"]["outcome"] == "fails"
    assert math.isclose(saved["fragility"]["means"]["topk_random"], fragility.means()["topk_random"], abs_tol=1e-9)


class _Normalizing(LitClassifier):
    def forward(self, x):
        return self.model((x - 0.5) / 0.5)


def test_setup_refuses_a_model_whose_shift_cannot_be_compensated(tmp_path, loaders):
    callback = ExplanationTestsCallback(tests=["input_invariance"], methods=["gradient"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = _Normalizing(model=SmallCNN(width=2))
    with pytest.raises(ValueError, match="ExplanationTestsCallback.*does not receive the inputs unchanged"):
        _trainer(tmp_path, [callback]).fit(module, *loaders)


def test_constructor_checks():
    with pytest.raises(ValueError, match="tests must be one of"):
        ExplanationTestsCallback(tests=["roar"])
    with pytest.raises(ValueError, match="fragility_method must be"):
        ExplanationTestsCallback(fragility_method="gradcam")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        ExplanationTestsCallback(epsilon=0)
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        ExplanationTestsCallback(num_probes=1)
    with pytest.raises(TypeError, match="shift must be"):
        ExplanationTestsCallback(shift="one")
