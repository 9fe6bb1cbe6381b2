"""RandomizationSanityCheck inside real Trainer runs: what it logs, probe sharing, failure isolation, the checks at
setup, the due epochs, and that training is unchanged."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import _ddp
import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_lens import loggers, render
from lightning_lens.attribution import Gradient
from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN

VERDICT_VALUE = {"passes": 1.0, "inconclusive": 0.0, "fails": -1.0}


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    train = Subset(SpuriousDigits("train", seed=0), range(96))
    val = Subset(SpuriousDigits("val", seed=0), range(48))
    return DataLoader(train, batch_size=32), DataLoader(val, batch_size=24)


def _module(seed: int = 0, cls: type = LitClassifier) -> LitClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(model=SmallCNN(width=4), lr=3e-3)


def _trainer(tmp_path, callbacks, logger=None, max_epochs: int = 2) -> Trainer:
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger if logger is not None else False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=tmp_path, callbacks=callbacks, num_sanity_val_steps=0)


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


# ---------------------------------------------------------------------------------------------------- what is logged
def test_end_to_end_tensorboard(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient", "guided_backprop"], num_probes=6, grid_probes=2)
    trainer = _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"))
    trainer.fit(_module(), *loaders)
    report = check.last_report
    assert report is not None and report.methods == ["gradient", "guided_backprop", "edge", "random"]
    assert len(check.probes) == 6

    events = _events(trainer.logger.log_dir)
    tags = events.Tags()
    assert {"sanity/cascade", "sanity/similarity"} <= set(tags["images"])
    cascade = events.Images("sanity/cascade")[-1]
    assert cascade.step == trainer.global_step
    # 2 probes x 4 methods rows, 1 + 1 + 6 columns of 48 px cells (plus labels)
    assert cascade.height > 8 * 48 and cascade.width > 8 * 48
    for method in report.methods:
        for metric in ("spearman_abs", "spearman_signed", "ssim", "hog", "topk"):
            (scalar,) = events.Scalars(f"sanity/{method}/{metric}")
            assert scalar.value == pytest.approx(report.final(method, metric), abs=1e-6)
        (verdict,) = events.Scalars(f"sanity/{method}/verdict")
        assert verdict.value == VERDICT_VALUE[report.verdicts[method].outcome]
    assert events.Scalars("sanity/edge/verdict")[0].value == -1.0
    table = events.Tensors("sanity/verdicts/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| method |" in table and "guided_backprop" in table and "edge" in table
    (path,) = glob.glob(os.path.join(trainer.logger.log_dir, "lens", "sanity", "report", "*.json"))
    with open(path) as f:
        saved = json.load(f)
    assert saved["stages"] == report.stages and saved["methods"]["edge"]["verdict"]["outcome"] == "fails"


def test_aliases_log_under_the_registry_name(tmp_path, loaders):
    # issue 11: methods=["IG"] logged sanity/IG/... while SaliencyMapCallback logs saliency/integrated_gradients
    check = RandomizationSanityCheck(methods=[("IG", {"n_steps": 4}), "Saliency"], num_probes=4, controls=False,
                                     grid_probes=0)
    assert check.method_names == ["integrated_gradients", "gradient"]
    trainer = _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=1)
    trainer.fit(_module(), *loaders)
    scalars = set(_events(trainer.logger.log_dir).Tags()["scalars"])
    assert {"sanity/integrated_gradients/verdict", "sanity/gradient/verdict"} <= scalars
    assert not any(tag.startswith(("sanity/IG", "sanity/Saliency")) for tag in scalars)
    assert check.last_report.methods == ["integrated_gradients", "gradient"]


def test_console_summary_one_line_per_method(tmp_path, loaders, caplog):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, grid_probes=0)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        _trainer(tmp_path, [check], max_epochs=1).fit(_module(), *loaders)
    (summary,) = [r.getMessage() for r in caplog.records
                  if r.name == "lightning_lens" and "RandomizationSanityCheck (" in r.getMessage()]
    lines = summary.splitlines()
    assert lines[0] == f"RandomizationSanityCheck (end of fit, 4 probes, {check.last_report.num_stages} stages):"
    assert [line.strip() for line in lines[1:]] == render.verdict_lines(check.last_report)
    assert [line.split()[0].strip(":") for line in lines[1:]] == ["gradient", "edge", "random"]
    assert "edge (control, expected: fails): fails (spearman_signed" in summary


# ------------------------------------------------------------------------------------------- training is unchanged
def test_every_n_epochs_never_changes_training(tmp_path, loaders):
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    plain = _module()
    _trainer(tmp_path / "plain", []).fit(plain, *loaders)
    torch.manual_seed(123)
    checked = _module()
    check = RandomizationSanityCheck(methods=["gradient", ("smoothgrad", {"n_samples": 3})], num_probes=4,
                                     every_n_epochs=1, run_at_fit_end=False, target="randomized_prediction")
    logger = CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path / "checked", [check], logger).fit(checked, *loaders)
    torch.set_rng_state(rng)
    for (name, a), (_, b) in zip(plain.state_dict().items(), checked.state_dict().items()):
        assert torch.equal(a, b), name
    assert check.last_report.target_mode == "randomized_prediction"
    # one check per epoch: two verdict tables as CSV files, the cascade images as PNG files
    tables = sorted(glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "verdicts", "*.csv")))
    assert len(tables) == 2
    with open(tables[-1]) as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["method", "verdict", "expected", "decided by"]
    assert {r[0] for r in rows[1:]} >= {"gradient", "smoothgrad"}
    assert len(glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "cascade", "*.png"))) == 2


# ---------------------------------------------------------------------------------------------------- due epochs
def test_due_epochs_follow_the_base_rule_and_fit_end_does_not_repeat_the_last_check(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, every_n_epochs=2, controls=False,
                                     grid_probes=0, max_overhead=None)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, [check], logger, max_epochs=4)
    trainer.fit(_module(), *loaders)
    per_epoch = trainer.global_step // 4
    tables = glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "verdicts", "*.csv"))
    # epoch 0 (the first), 1 ((1 + 1) % 2 == 0), 3 (the last); the end of fit saw the same weights as epoch 3.
    # Files are named by the logging step, the last training step's index (global_step - 1)
    steps = sorted(int(os.path.basename(p)[len("step_"):].split(".")[0]) for p in tables)
    assert steps == [per_epoch - 1, 2 * per_epoch - 1, 4 * per_epoch - 1]


def test_fit_end_runs_when_no_epoch_was_checked(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, controls=False, grid_probes=0)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, [check], logger, max_epochs=2)
    trainer.fit(_module(), *loaders)
    tables = glob.glob(os.path.join(logger.log_dir, "lens", "sanity", "verdicts", "*.csv"))
    assert len(tables) == 1 and check.last_report is not None


def test_runs_under_validate_with_inference_mode(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, controls=False, grid_probes=0)
    model = _module()
    trainer = _trainer(tmp_path, [check], max_epochs=1)
    trainer.validate(model, loaders[1], verbose=False)
    assert check.last_report is not None and check.last_report.methods == ["gradient"]


# ------------------------------------------------------------------------------------------------------ probes
def test_probes_are_shared_with_a_saliency_callback_asking_for_the_same(tmp_path, loaders):
    saliency = SaliencyMapCallback(methods=["gradient"], num_probes=5, every_n_epochs=1)
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=5, controls=False, grid_probes=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no logger.*")
        _trainer(tmp_path, [saliency, check], max_epochs=1).fit(_module(), *loaders)
    assert check.probes is saliency.probes and len(check.probes) == 5
    assert check.last_report.targets.shape[1] == 5


def test_probes_differ_from_a_saliency_callback_asking_for_others_with_a_warning(tmp_path, loaders):
    saliency = SaliencyMapCallback(methods=["gradient"], num_probes=5, every_n_epochs=1)
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, controls=False, grid_probes=0)
    with pytest.warns(UserWarning, match=r"RandomizationSanityCheck \(num_probes=4.*SaliencyMapCallback"):
        _trainer(tmp_path, [saliency, check], max_epochs=1).fit(_module(), *loaders)
    assert len(saliency.probes) == 5 and len(check.probes) == 4
    assert check.last_report.targets.shape[1] == 4


def test_state_dict_restores_probes_and_switched_off_parts(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, run_at_fit_end=False, every_n_epochs=5,
                                     controls=False, grid_probes=0)
    _trainer(tmp_path, [check], max_epochs=1).fit(_module(), *loaders)
    assert check.last_report is not None  # the first (and last) epoch of a fit always runs
    check.disabled.add("method gradient")
    state = check.state_dict()
    fresh = RandomizationSanityCheck(methods=["gradient"], num_probes=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probes.inputs, check.probes.inputs)
    assert fresh.disabled == {"method gradient"}


def test_no_validation_loop_warns(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"])
    with pytest.warns(UserWarning, match="no probes"):
        _trainer(tmp_path, [check], max_epochs=1).fit(_module(), loaders[0])
    assert check.last_report is None


def test_state_key_tells_configurations_apart():
    assert RandomizationSanityCheck(methods=["gradient"]).state_key != RandomizationSanityCheck().state_key
    assert RandomizationSanityCheck().state_key == RandomizationSanityCheck().state_key


# -------------------------------------------------------------------------------------------- failure isolation
class FailsAfter(Gradient):
    """The gradient, until ``limit`` calls (over all copies: the counter is a class attribute); then it raises."""

    name = "fails_after"
    calls = 0
    limit = 2

    def attribute(self, inputs, target=None, **kwargs):
        type(self).calls += 1
        if type(self).calls > self.limit:
            raise RuntimeError("broken on randomized weights")
        return super().attribute(inputs, target, **kwargs)


def test_a_failing_method_is_left_out_and_the_others_are_logged(tmp_path, loaders):
    module = _module()
    FailsAfter.calls, FailsAfter.limit = 0, 2  # the dry run and the original maps work, the first stage fails
    check = RandomizationSanityCheck(methods=["gradient", FailsAfter(module)], num_probes=4, grid_probes=1)
    trainer = _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"'method fails_after' failed .* RuntimeError: broken on randomized"):
        trainer.fit(module, *loaders)
    assert trainer.current_epoch == 1  # the fit finished
    report = check.last_report
    assert report.methods == ["gradient", "edge", "random"]
    events = _events(trainer.logger.log_dir)
    tags = events.Tags()
    assert {"sanity/cascade", "sanity/similarity"} <= set(tags["images"])
    assert {"sanity/gradient/verdict", "sanity/edge/verdict"} <= set(tags["scalars"])
    assert not any("fails_after" in t for t in tags["scalars"])
    errors = events.Tensors("lens_errors/RandomizationSanityCheck/text_summary")
    assert "broken on randomized weights" in errors[0].tensor_proto.string_val[0].decode()


def test_the_isolated_runs_equal_the_joint_run(tmp_path, loaders):
    """After a failure each method runs alone: the numbers equal one joint run's (same seed, same stages)."""
    from lightning_lens.sanity import cascading_randomization

    module = _module()
    FailsAfter.calls, FailsAfter.limit = 0, 1  # only the dry run works
    check = RandomizationSanityCheck(methods=["gradient", "guided_backprop", FailsAfter(module)], num_probes=4,
                                     grid_probes=0)
    with pytest.warns(RuntimeWarning, match="method fails_after"):
        _trainer(tmp_path, [check], max_epochs=1).fit(module, *loaders)
    isolated = check.last_report
    joint = cascading_randomization(module, check.probes.inputs, check.probes.targets, ["gradient", "guided_backprop"])
    assert isolated.methods == joint.methods == ["gradient", "guided_backprop", "edge", "random"]
    assert isolated.stages == joint.stages
    for method in ("gradient", "guided_backprop", "edge"):  # "random" draws fresh noise on every call
        for metric in joint.results[method].metrics:
            assert torch.allclose(joint.results[method].similarity[metric], isolated.results[method].similarity[metric],
                                  equal_nan=True), (method, metric)
        assert joint.verdicts[method] == isolated.verdicts[method]


def test_a_failing_rendering_or_logger_does_not_stop_the_other_parts(tmp_path, loaders, monkeypatch):
    def broken_grid(*args, **kwargs):
        raise RuntimeError("grid exploded")

    original_log_image = loggers.log_image

    def rejecting_log_image(trainer, tag, *args, **kwargs):
        if tag == "sanity/similarity":
            raise ValueError("the logger rejects this tag")
        return original_log_image(trainer, tag, *args, **kwargs)

    monkeypatch.setattr(render, "cascade_grid", broken_grid)
    monkeypatch.setattr(loggers, "log_image", rejecting_log_image)
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4)
    trainer = _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), *loaders)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'cascade grid' failed" in m and "grid exploded" in m for m in messages)
    assert any("'similarity figure' failed" in m and "rejects this tag" in m for m in messages)
    tags = _events(trainer.logger.log_dir).Tags()
    assert "sanity/cascade" not in tags["images"] and "sanity/similarity" not in tags["images"]
    assert "sanity/verdicts/text_summary" in tags["tensors"] and "sanity/gradient/verdict" in tags["scalars"]
    assert glob.glob(os.path.join(trainer.logger.log_dir, "lens", "sanity", "report", "*.json"))
    assert trainer.current_epoch == 1


def test_strict_reraises_the_failure(tmp_path, loaders, monkeypatch):
    monkeypatch.setattr(render, "cascade_grid", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("grid exploded")))
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, strict=True)
    with pytest.raises(RuntimeError, match="grid exploded"):
        _trainer(tmp_path, [check], TensorBoardLogger(str(tmp_path), name="tb"), max_epochs=1).fit(_module(), *loaders)


# ------------------------------------------------------------------------------- configuration errors at setup
class WideOutput(LitClassifier):
    def forward(self, x):
        return super().forward(x).unsqueeze(-1)  # (B, C, 1): not logits


def _fails_before_training(tmp_path, loaders, check, module=None, error=ValueError, match=""):
    module = module if module is not None else _module()
    trainer = _trainer(tmp_path, [check], max_epochs=3)
    with pytest.raises(error, match=match):
        trainer.fit(module, *loaders)
    assert trainer.global_step == 0  # raised before the first training step (not after all of training)


def test_setup_rejects_a_layer_that_does_not_exist(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], layers=["model.features", "model.head"])
    _fails_before_training(tmp_path, loaders, check, match=r"layers='model.head' is not a module of the model")


def test_setup_rejects_a_module_that_cannot_be_deep_copied(tmp_path, loaders):
    module = _module()
    module.lock = threading.Lock()
    _fails_before_training(tmp_path, loaders, RandomizationSanityCheck(methods=["gradient"]), module=module,
                           error=TypeError, match=r"deep copy of the LightningModule.*Make the module deep-copyable")


def test_setup_rejects_labels_that_are_not_class_indices(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], target_key="image")
    _fails_before_training(tmp_path, loaders, check,
                           match=r"target='label'\) needs one integer class index.*set target_key.*target='prediction'")


def test_setup_rejects_integers_that_are_not_classes_of_the_model(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], target_key="index")  # dataset indices, not labels
    _fails_before_training(tmp_path, loaders, check,
                           match=r"labels such as \[10, 11, 12\] are not class indices of the model's 10 outputs")


def test_setup_rejects_a_missing_input_key(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], input_key="pixels")
    _fails_before_training(tmp_path, loaders, check, match=r"input_key='pixels' does not select anything")


def test_setup_rejects_an_output_that_is_not_logits(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"])
    _fails_before_training(tmp_path, loaders, check, module=_module(cls=WideOutput),
                           match=r"logits of shape \(batch, classes\)")


def test_setup_rejects_an_unknown_method(tmp_path, loaders):
    try:
        check = RandomizationSanityCheck(methods=["gradient", "saliency_magic"])
    except ValueError as err:  # resolved at construction: even earlier
        assert "saliency_magic" in str(err) and "integrated_gradients" in str(err)  # lists the available names
        return
    _fails_before_training(tmp_path, loaders, check, match=r"saliency_magic.*available: .*integrated_gradients")


def test_setup_rejects_a_method_that_fails_on_two_examples(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient", ("integrated_gradients", {"baseline": torch.zeros(5)})])
    _fails_before_training(tmp_path, loaders, check, match=r"'integrated_gradients' failed on 2 validation examples")


def test_setup_passes_and_training_runs_for_a_valid_configuration(tmp_path, loaders):
    check = RandomizationSanityCheck(methods=["gradient"], layers=["model.features", "model.classifier"],
                                     num_probes=4, grid_probes=0, controls=False)
    trainer = _trainer(tmp_path, [check], max_epochs=1)
    trainer.fit(_module(), *loaders)
    assert check.last_report.stages == ["model.classifier", "model.features"]


# ------------------------------------------------------------------------------------------------ constructor
def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        RandomizationSanityCheck(num_probes=1)
    with pytest.raises(ValueError, match="nothing to run"):
        RandomizationSanityCheck(every_n_epochs=None, run_at_fit_end=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        RandomizationSanityCheck(mode="sequential")
    with pytest.raises(ValueError, match="target must be one of"):
        RandomizationSanityCheck(target="labels")
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        RandomizationSanityCheck(every_n_epochs=0)
    with pytest.raises(TypeError, match="rule must be a VerdictRule"):
        RandomizationSanityCheck(rule={"fail_above": 0.4})
    with pytest.raises(ValueError, match="unknown"):
        RandomizationSanityCheck(metrics=["ssim", "psnr"])
    with pytest.raises(TypeError, match="layers must be a list of strings"):
        RandomizationSanityCheck(layers="model.features")
    with pytest.raises(ValueError, match="layers must name at least one module"):
        RandomizationSanityCheck(layers=[])
    with pytest.raises(TypeError, match="strict must be a bool"):
        RandomizationSanityCheck(strict=1)
    with pytest.raises(ValueError, match="max_overhead"):
        RandomizationSanityCheck(max_overhead=0)
    with pytest.raises(TypeError, match="grid_probes must be an int"):
        RandomizationSanityCheck(grid_probes=2.0)


# ------------------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = Path(__file__).with_name("randomization_check_ddp_script.py")


@pytest.mark.slow
def test_ddp_a_method_failing_on_rank_zero_neither_hangs_nor_kills_rank_one(tmp_path):
    (single,) = _ddp.run(DDP_SCRIPT, tmp_path / "one", devices=1)
    ranks = _ddp.run(DDP_SCRIPT, tmp_path / "two", "--fail-on-rank-zero")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["epochs"] for r in ranks] == [2, 2]  # both ranks finished the fit
    # the probes are drawn by global dataset position: the same on both ranks and in one process
    assert ranks[0]["probe_indices"] == ranks[1]["probe_indices"] == single["probe_indices"]
    # rank 0 checked (without the failing method) and reported the failure; rank 1 neither checks nor warns
    assert ranks[0]["reported"] == single["reported"] == ["gradient", "edge", "random"]
    assert ranks[1]["reported"] is None and not ranks[1]["warnings"]
    (failure, *_) = [w for w in ranks[0]["warnings"] if "the method broke on rank 0" in w]
    assert "RandomizationSanityCheck: 'method fails_on_rank_zero' failed at epoch 0 with RuntimeError" in failure
    events = _events(str(tmp_path / "two" / "tb" / "version_0"))
    # 64 digits / 16 per batch / 2 ranks = 2 steps per epoch; logged at Lightning's val step (global_step - 1)
    assert [e.step for e in events.Scalars("sanity/gradient/verdict")] == [1, 3]
