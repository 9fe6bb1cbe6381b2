"""SubgroupErrorSlices inside Lightning: what it logs, that it never changes training, hooks, state, DDP, and the
hardening of issue 11 (data problems counted, failures isolated, configuration checked at setup, safe names)."""

import csv
import glob
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import SubgroupErrorSlices
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.loggers import sinks as sinks_module
from lightning_lens.testing import LitClassifier

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("error_slices_ddp_script", HERE / "error_slices_ddp_script.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

PLANTED = "colour=2 & size=1"


def _trainer(tmp_path, callbacks, loggers=False, max_epochs=1, **kwargs):
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=loggers, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                   callbacks=callbacks, **kwargs)


def _loader(n=1001, seed=0, **kwargs):
    return DataLoader(script.PlantedImages(n, seed), batch_size=64, **kwargs)


def _events(logger):
    logger.experiment.flush()
    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_fit_logs_table_curves_worst_accuracy_images_and_json(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    cb = script.make_callback()
    model = script.PixelReader(lr=0.0)  # a fixed model: the same slice every epoch
    _trainer(tmp_path, [cb], [tb, csv_logger], max_epochs=2, limit_train_batches=2).fit(model, _loader(), _loader())

    data = script.PlantedImages()
    top = cb.last_slices[0]
    assert top.name == PLANTED and top.kind == "metadata"
    assert sorted(top.indices.tolist()) == np.flatnonzero(data.planted).tolist()
    errors_in = np.mean([data.label[i] != int(data.images[i, 0, 0, :4].argmax()) for i in top.indices])
    assert top.accuracy == pytest.approx(1 - errors_in)

    ea = _events(tb)
    key = "slices/acc/colour=2&size=1"
    curve = ea.Scalars(key)
    assert len(curve) == 2 and all(e.value == pytest.approx(top.accuracy) for e in curve)
    worst = ea.Scalars("slices/worst_accuracy")
    assert len(worst) == 2 and worst[-1].value == pytest.approx(min(s.accuracy for s in cb.last_slices))
    table = ea.Tensors("slices/top/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| 1 | colour=2 & size=1 | metadata |" in table and "| CI low | CI high |" in table
    assert table.rstrip().endswith("*") and "q: the slice's p-value" in table  # the legend line under the table
    image = ea.Images("slices/worst_examples")[-1]
    assert image.width > 64 and image.height >= 64

    json_dir = Path(csv_logger.log_dir) / "lens" / "slices" / "all"
    artifacts = sorted(json_dir.glob("step_*.json"))
    assert len(artifacts) == 2
    payload = json.loads(artifacts[-1].read_text())
    assert payload["n_samples"] == 1001 and payload["slices"][0]["name"] == PLANTED
    assert payload["slices"][0]["indices"] == sorted(top.indices.tolist())
    assert payload["search"]["depth_reached"] == 2 and payload["slices"][0]["tracked_as"] == "colour=2&size=1"
    assert (Path(csv_logger.log_dir) / "lens" / "slices" / "top").is_dir()


def test_no_extra_forward_when_validation_step_returns_logits(tmp_path):
    batches = 16  # ceil(1001 / 64)
    model = script.PixelReader(return_logits=True)
    _trainer(tmp_path, [script.make_callback()]).validate(model, _loader())
    assert model.forward_calls == batches + 1  # one forward on 2 samples at setup checks the output and the layer
    model = script.PixelReader(return_logits=True)
    _trainer(tmp_path, [script.make_callback(logits_key="logits", embedding_layer=None)]).validate(model, _loader())
    assert model.forward_calls == batches  # logits_key given and no layer to check: no probe either
    model = script.PixelReader(return_logits=False)
    cb = script.make_callback()
    with pytest.warns(UserWarning, match="extra no-grad forward"):
        _trainer(tmp_path, [cb]).validate(model, _loader())
    assert model.forward_calls == 2 * batches + 1
    assert cb.last_slices[0].name == PLANTED


def test_callback_never_changes_training(tmp_path):
    def train(callbacks):
        torch.manual_seed(0)
        model = script.PixelReader(lr=0.05)
        _trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=4).fit(
            model, _loader(shuffle=True, generator=torch.Generator().manual_seed(0)), _loader())
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    with_cb, rng_with = train([script.make_callback()])
    without, rng_without = train([])
    for a, b in zip(with_cb, without):
        assert torch.equal(a, b)
    assert torch.equal(rng_with, rng_without)


def test_hooks_are_removed_after_validation_and_after_an_exception(tmp_path):
    model = script.PixelReader()
    _trainer(tmp_path, [script.make_callback()]).validate(model, _loader())
    assert not model.net[2]._forward_hooks

    class Boom(script.PixelReader):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 2:
                self(batch["image"])  # the hook fires, then the step fails
                raise RuntimeError("boom")
            return super().validation_step(batch, batch_idx)

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [script.make_callback()]).validate(model, _loader())
    assert not model.net[2]._forward_hooks


def test_state_dict_restores_binning_and_tracked_curves(tmp_path):
    cb = script.make_callback()
    _trainer(tmp_path, [cb]).validate(script.PixelReader(), _loader())
    state = json.loads(json.dumps(cb.state_dict()))  # plain JSON-able state
    assert "colour=2&size=1" in state["tracked"] and state["tracked"]["colour=2&size=1"]["first_seen"] == 0

    resumed = script.make_callback()
    resumed.load_state_dict(state)
    assert resumed.finder.binning_.to_dict() == cb.finder.binning_.to_dict()
    # New data whose "shade" distribution differs: the frozen bins keep the old edges.
    _trainer(tmp_path, [resumed]).validate(script.PixelReader(), _loader(n=700, seed=1))
    assert resumed.finder.binning_.to_dict() == cb.finder.binning_.to_dict()
    assert set(cb.tracked) <= set(resumed.tracked)


class CountingSlices(SubgroupErrorSlices):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.collected_epochs = []

    def _collect(self, trainer, *args):
        self.collected_epochs.append(trainer.current_epoch)
        return super()._collect(trainer, *args)


def test_due_epochs_only_collect_and_sanity_check_is_skipped(tmp_path):
    """The base's rule: (epoch + 1) % n == 0, plus the first and last epoch of fit; nothing is collected otherwise."""
    logger = CSVLogger(tmp_path, name="csv")
    cb = CountingSlices(min_support=20, every_n_epochs=3, max_overhead=None)
    _trainer(tmp_path, [cb], logger, max_epochs=5, limit_train_batches=1, num_sanity_val_steps=2).fit(
        script.PixelReader(lr=0.0), _loader(), _loader())
    artifacts = sorted((Path(logger.log_dir) / "lens" / "slices" / "all").glob("*.json"))
    assert [json.loads(p.read_text())["epoch"] for p in artifacts] == [0, 2, 4]
    assert sorted(set(cb.collected_epochs)) == [0, 2, 4]
    assert len(cb.collected_epochs) == 3 * 16  # 16 batches per analysed epoch, none in the sanity pass


def test_worst_accuracy_is_logged_again_in_epochs_not_analysed(tmp_path):
    """Regression: with every_n_epochs=2 a monitor of worst_accuracy crashed the fit in the epochs not analysed."""
    stop = EarlyStopping(monitor="slices/worst_accuracy", mode="max", patience=10, strict=True)
    cb = script.make_callback(every_n_epochs=2, embedding_layer=None, max_overhead=None)
    trainer = _trainer(tmp_path, [cb, stop], max_epochs=4, limit_train_batches=1)
    trainer.fit(script.PixelReader(lr=0.0), _loader(), _loader())
    assert trainer.current_epoch == 4
    assert float(trainer.callback_metrics["slices/worst_accuracy"]) == pytest.approx(cb.last_result["worst_accuracy"])


def test_worst_accuracy_drives_early_stopping_and_checkpointing(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="slices/worst_accuracy", mode="max")
    stop = EarlyStopping(monitor="slices/worst_accuracy", mode="max", patience=0)
    cb = script.make_callback(embedding_layer=None)
    trainer = Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_train_batches=1,
                      callbacks=[cb, ckpt, stop])
    trainer.fit(script.PixelReader(lr=0.0), _loader(), _loader())
    assert trainer.current_epoch == 2  # no improvement after the first epoch: stopped
    assert float(ckpt.best_model_score) == pytest.approx(cb.last_result["worst_accuracy"])


def test_tuple_batches_with_metadata_fn_and_positional_ids(tmp_path):
    ds = script.PlantedImages()
    tuples = [(ds.images[i], int(ds.label[i]), int(ds.colour[i]), int(ds.size[i])) for i in range(len(ds))]
    cb = SubgroupErrorSlices(min_support=20, metadata_fn=lambda b: {"colour": b[2], "size": b[3]}, num_images=4)
    tb = TensorBoardLogger(tmp_path, name="tb")
    _trainer(tmp_path, [cb], tb).validate(script.PixelReader(), DataLoader(tuples, batch_size=50))
    assert cb.last_slices[0].name == PLANTED
    assert sorted(cb.last_slices[0].indices.tolist()) == np.flatnonzero(ds.planted).tolist()
    assert _events(tb).Images("slices/worst_examples")  # from the reservoir: tuple items have no index key


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        SubgroupErrorSlices(every_n_epochs=0)
    with pytest.raises(TypeError, match="every_n_epochs must be an int"):
        SubgroupErrorSlices(every_n_epochs=1.5)
    with pytest.raises(ValueError, match="max_depth must be <= 4"):
        SubgroupErrorSlices(max_depth=9)
    with pytest.raises(TypeError, match="max_depth must be an int"):
        SubgroupErrorSlices(max_depth="2")
    with pytest.raises(TypeError, match="metadata_fn must be a Callable"):
        SubgroupErrorSlices(metadata_fn={"colour": [1]})
    with pytest.raises(TypeError, match="metadata_keys must be a list of strings"):
        SubgroupErrorSlices(metadata_keys=[1, 2])
    with pytest.raises(TypeError, match="embedding_layer must be a str or Module"):
        SubgroupErrorSlices(embedding_layer=3)
    with pytest.raises(TypeError, match="denormalize must be a callable or a"):
        SubgroupErrorSlices(denormalize="imagenet")
    with pytest.raises(ValueError, match="log_prefix='../..' has no usable characters"):
        SubgroupErrorSlices(log_prefix="../..")
    with pytest.raises(TypeError, match="unknown argument n_cluster=3"):
        SubgroupErrorSlices(n_cluster=3)


def test_max_seconds_errors_name_max_seconds():
    """Regression: SubgroupErrorSlices(max_seconds=0) said "time_budget must be ...", an argument it does not have."""
    with pytest.raises(ValueError, match=r"^max_seconds must be > 0"):
        SubgroupErrorSlices(max_seconds=0)
    with pytest.raises(TypeError, match=r"^max_seconds must be a number"):
        SubgroupErrorSlices(max_seconds="30s")
    with pytest.raises(TypeError, match=r"time_budget=2: pass the search's time budget as max_seconds="):
        SubgroupErrorSlices(time_budget=2)
    assert SubgroupErrorSlices(max_seconds=None).finder.time_budget is None
    assert SubgroupErrorSlices(max_seconds=2).finder.time_budget == 2.0


def test_one_metadata_key_as_a_string_is_one_key(tmp_path):
    """Regression: metadata_keys="colour" was split into the keys 'c', 'o', 'l', ..."""
    cb = SubgroupErrorSlices(min_support=20, metadata_keys="colour")
    _trainer(tmp_path, [cb]).validate(script.PixelReader(), _loader())
    assert cb.accessor.metadata_keys == ["colour"]
    assert cb.last_slices and cb.last_slices[0].name == "colour=2"
    assert {p.attribute for s in cb.last_slices for p in s.predicates} == {"colour"}


class StepCounter(script.PixelReader):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trained_steps = 0

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        return super().training_step(batch, batch_idx)


class FeatureMap(StepCounter):
    def forward(self, x):
        self.forward_calls += 1
        return x  # (B, 1, 4, 4): not classification logits

    def validation_step(self, batch, batch_idx):
        return None


@pytest.mark.parametrize(
    ("kwargs", "model", "error", "message"),
    [
        (dict(metadata_keys=["colour", "nope"]), StepCounter, ValueError, r"metadata_keys names 'nope'.*metadata_fn="),
        (dict(metadata_keys="image"), StepCounter, ValueError, r"metadata_keys names \['image'\], which hold no"),
        (dict(embedding_layer="net.9"), StepCounter, ValueError, r"embedding_layer='net.9' is not a module"),
        (dict(input_key="pixels"), StepCounter, ValueError, r"input_key='pixels' does not select anything"),
        (dict(target_key="y"), StepCounter, ValueError, r"target_key='y' does not select anything"),
        (dict(index_key="position"), StepCounter, ValueError, r"index_key='position' does not select anything"),
        (dict(target_key=lambda b: torch.nn.functional.one_hot(b["label"], 4)), StepCounter, ValueError,
         r"target_key selects labels of shape \(64, 4\).*one class index per sample"),
        (dict(metadata_fn=lambda b: {"g": [0]}), StepCounter, ValueError, r"metadata 'g' has 1 values for a batch"),
        (dict(metadata_fn=lambda b: 1 / 0), StepCounter, ValueError, r"metadata_fn raised ZeroDivisionError"),
        (dict(denormalize=([0.5, 0.5], [0.2, 0.2])), StepCounter, ValueError,
         r"denormalize=.* failed on a validation image of shape \(1, 4, 4\).*one value per channel \(1\)"),
        (dict(embedding_layer="net.0"), StepCounter, ValueError, None),  # Flatten gives (2, 16): fine, no error
        (dict(), FeatureMap, ValueError, r"needs classification logits.*a tensor of shape \(2, 1, 4, 4\).*logits_key"),
    ],
)
def test_configuration_errors_are_raised_before_the_first_training_step(tmp_path, kwargs, model, error, message):
    cb = SubgroupErrorSlices(min_support=20, **kwargs)
    module = model()
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    if message is None:
        trainer.fit(module, _loader(), _loader())
        assert module.trained_steps == 2
        return
    with pytest.raises(error, match=message):
        trainer.fit(module, _loader(), _loader())
    assert module.trained_steps == 0


def test_nothing_to_slice_on_is_a_configuration_error(tmp_path):
    ds = script.PlantedImages()
    tuples = [(ds.images[i], int(ds.label[i])) for i in range(len(ds))]
    module = StepCounter()
    with pytest.raises(ValueError, match="nothing to slice on.*metadata_fn= or embedding_layer="):
        _trainer(tmp_path, [SubgroupErrorSlices()]).fit(module, DataLoader(tuples, batch_size=50),
                                                         DataLoader(tuples, batch_size=50))
    assert module.trained_steps == 0


def test_validation_step_logits_need_no_working_forward(tmp_path):
    """A model whose forward takes the whole batch: with logits_key given, the setup check does not need it."""

    class BatchForward(script.PixelReader):
        def forward(self, batch):
            return super().forward(batch["image"])

        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch)}

    with pytest.raises(ValueError, match=r"model\(inputs\) failed on 2 validation samples.*logits_key='logits'"):
        _trainer(tmp_path, [SubgroupErrorSlices(min_support=20)]).validate(BatchForward(), _loader())
    cb = SubgroupErrorSlices(min_support=20, logits_key="logits")
    _trainer(tmp_path, [cb]).validate(BatchForward(), _loader())
    assert cb.last_slices[0].name == PLANTED


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env():
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


@pytest.mark.slow
def test_ddp_two_processes_count_and_find_the_same_slices_as_one(tmp_path):
    """Two gloo ranks count their own rows and all-reduce the counts: the same slices (names, members, q-values) as
    one process, while each rank sends a fraction of what gathering its rows would (the binning, PCA and clusters
    are fitted on a sample of FIT_ROWS of the 1001 rows)."""
    one = script.summary(script.run_validate(devices=1, root=str(tmp_path), fit_rows=script.FIT_ROWS))
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(HERE / "error_slices_ddp_script.py"), "--devices", "2",
                           "--out", str(out), "--root", str(tmp_path)], cwd=tmp_path, env=_ddp_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert one["n_samples"] == two["n_samples"] == 1001  # the sample the DistributedSampler repeated is dropped
    assert two["slices"] and two["slices"][0]["name"] == PLANTED
    assert two == one
    for rank in (0, 1):
        sent = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert sent["sent"]["all_reduce"] > 0  # the counts
        assert sum(sent["sent"].values()) < sent["row_bytes"] / 3, sent  # before: every row went to every rank


def test_binary_logits_from_a_dict_output(tmp_path):
    class ZeroVsRest(torch.utils.data.Dataset):
        def __init__(self):
            self.base = script.PlantedImages()

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            item = self.base[i]
            return dict(item, label=int(item["label"] == 0))

    class PixelZero(script.PixelReader):
        def forward(self, x):
            return 10 * (x.flatten(1)[:, 0] - 0.5)  # (B,) binary logits: "class 0 is shown"

        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch["image"])}

    cb = SubgroupErrorSlices(min_support=20)
    _trainer(tmp_path, [cb]).validate(PixelZero(), DataLoader(ZeroVsRest(), batch_size=64))
    assert cb.last_slices[0].name == PLANTED
    data = ZeroVsRest()
    preds = np.array([float(data[i]["image"][0, 0, 0]) > 0.5 for i in range(len(data))])
    truth = np.array([data[i]["label"] for i in range(len(data))]) == 1
    assert cb.last_result["worst_accuracy"] == pytest.approx(cb.last_slices[0].accuracy)
    assert cb.last_slices[0].accuracy == pytest.approx((preds == truth)[data.base.planted].mean())


# ------------------------------------------------------------------------------------------- data problems, failures
class WithNaN(script.PlantedImages):
    """PlantedImages whose sample 7 has a NaN pixel (its logits and loss are NaN)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images[7, 0, 2, 2] = float("nan")


def _metrics(logger):
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_nan_validation_sample_is_excluded_and_counted(tmp_path):
    """Regression: one NaN validation sample aborted the fit with "ValueError: losses contain NaN or inf"."""
    logger = CSVLogger(tmp_path, name="csv")
    cb = script.make_callback(strict=True)  # strict: any exception would surface here
    trainer = _trainer(tmp_path, [cb], logger, max_epochs=2, limit_train_batches=2)
    trainer.fit(script.PixelReader(lr=0.0), _loader(), DataLoader(WithNaN(), batch_size=64))
    assert trainer.current_epoch == 2
    excluded = [float(r["slices/excluded"]) for r in _metrics(logger) if r.get("slices/excluded")]
    assert excluded == [1.0, 1.0]
    assert cb.last_result["excluded"] == 1 and cb.last_result["n_samples"] == 1000
    assert cb.last_result["excluded_by_reason"] == {"non-finite inputs": 1}
    payload = json.loads(sorted((Path(logger.log_dir) / "lens" / "slices" / "all").glob("*.json"))[-1].read_text())
    assert payload["excluded"] == {"total": 1, "non-finite inputs": 1} and payload["n_samples"] == 1000
    assert 7 not in {i for s in payload["slices"] for i in s["indices"]}
    table = (sorted((Path(logger.log_dir) / "lens" / "slices" / "top").glob("*.csv"))[-1]).read_text()
    assert "excluded: non-finite inputs, logits, loss or embedding" in table
    assert cb.last_slices[0].name == PLANTED


def test_a_failing_search_costs_only_that_epoch(tmp_path):
    cb = script.make_callback()
    calls = []
    find_steps = cb.finder.find_steps  # the callback runs the search as steps (sums and gathers between ranks)

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("search broke")
        return find_steps(*args, **kwargs)

    cb.finder.find_steps = failing_once
    trainer = _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    with pytest.warns(RuntimeWarning, match=r"SubgroupErrorSlices: 'search' failed at epoch 0 with RuntimeError"):
        trainer.fit(script.PixelReader(lr=0.0), _loader(), _loader())
    assert trainer.current_epoch == 2 and len(calls) == 2
    assert cb.last_result["epoch"] == 1 and cb.last_slices[0].name == PLANTED
    assert cb.tracker.first_seen("colour=2&size=1") == 1  # the failed epoch left no state behind
    strict = script.make_callback(strict=True)
    strict.finder.find_steps = lambda *a, **k: 1 / 0
    with pytest.raises(ZeroDivisionError):
        _trainer(tmp_path, [strict]).validate(script.PixelReader(), _loader())


def test_a_failing_denormalize_costs_only_the_image_grid(tmp_path):
    calls = []

    def denormalize(image):  # fine at the setup check, broken afterwards
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("bad denormalize")
        return image

    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = script.make_callback(denormalize=denormalize)
    with pytest.warns(RuntimeWarning, match=r"'worst examples' failed at epoch .* Fix: check denormalize"):
        _trainer(tmp_path, [cb], tb).validate(script.PixelReader(), _loader())
    ea = _events(tb)
    assert "slices/worst_examples" not in ea.Tags()["images"]
    table = ea.Tensors("slices/top/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| 1 | colour=2 & size=1 | metadata |" in table
    assert cb.last_result["worst_accuracy"] == pytest.approx(cb.last_slices[0].accuracy)


def test_a_summary_of_the_top_slices_is_logged_at_the_end_of_fit(tmp_path, caplog):
    cb = script.make_callback(embedding_layer=None)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(script.PixelReader(lr=0.0), _loader(),
                                                                          _loader())
    lines = [r.getMessage() for r in caplog.records if "SubgroupErrorSlices (slices)" in r.getMessage()]
    top = cb.last_slices[0]
    assert len(lines) == 1
    assert lines[0].startswith(f"SubgroupErrorSlices (slices): epoch 0: 1001 samples, accuracy "
                               f"{cb.last_result['accuracy']:.3f}; {len(cb.last_slices)} slice")
    assert f"{PLANTED} (n={top.size}, accuracy {top.accuracy:.3f})" in lines[0]


# ------------------------------------------------------------------------------------------------- state and names
def test_two_instances_keep_their_own_state_in_a_checkpoint(tmp_path):
    """Regression: two SubgroupErrorSlices with different prefixes shared one checkpoint key (one state was lost)."""
    colour = SubgroupErrorSlices(min_support=20, metadata_keys="colour", log_prefix="by_colour")
    size = SubgroupErrorSlices(min_support=20, metadata_keys="size", log_prefix="by_size")
    assert colour.state_key != size.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_train_batches=1,
                      callbacks=[colour, size, ckpt])
    trainer.fit(script.PixelReader(lr=0.0), _loader(), _loader())
    states = torch.load(ckpt.last_model_path, weights_only=False)["callbacks"]
    assert set(states[colour.state_key]["tracked"]) == {"colour=2"}
    assert set(states[size.state_key]["tracked"]) == set(size.tracked) and "colour=2" not in size.tracked

    colour2 = SubgroupErrorSlices(min_support=20, metadata_keys="colour", log_prefix="by_colour")
    size2 = SubgroupErrorSlices(min_support=20, metadata_keys="size", log_prefix="by_size")
    resumed = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      limit_train_batches=1, callbacks=[size2, colour2])
    resumed.fit(script.PixelReader(lr=0.0), _loader(), _loader(), ckpt_path=ckpt.last_model_path)
    assert colour2.tracked == colour.tracked and size2.tracked == size.tracked
    assert colour2.finder.binning_.to_dict() == colour.finder.binning_.to_dict()


def _all_files(folder):
    paths = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return {os.path.realpath(p) for p in paths if os.path.isfile(p)}


def test_a_crafted_log_prefix_writes_nothing_outside_the_log_dir(tmp_path):
    """Regression: SubgroupErrorSlices(log_prefix="../../x") wrote its files outside the logger's log_dir."""
    root = tmp_path / "deep" / "er"
    logger = CSVLogger(root, name="csv")
    with pytest.warns(UserWarning, match=r"logs under 'x' \(log_prefix='../../x' sanitised"):
        cb = script.make_callback(log_prefix="../../x")
    _trainer(tmp_path, [cb], logger).validate(script.PixelReader(), _loader())
    log_dir = os.path.realpath(logger.log_dir)
    written = _all_files(tmp_path)
    assert written and all(p.startswith(log_dir + os.sep) for p in written), sorted(written)
    assert (Path(log_dir) / "lens" / "x" / "all").is_dir() and (Path(log_dir) / "lens" / "x" / "top").is_dir()
    assert "x/worst_accuracy" in _metrics(logger)[0]


def test_a_crafted_prefix_does_not_break_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sinks_module, "_warned", set())
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-test")
    try:
        with pytest.warns(UserWarning, match="sanitised"):
            cb = script.make_callback(log_prefix="../../x:y <b>/..", strict=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(tmp_path, [cb], logger).validate(script.PixelReader(), _loader())
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    assert not [str(w.message) for w in caught if "failed to log" in str(w.message)]
    assert cb.log_prefix == "x_y_b_"
    assert glob.glob(os.path.join(run_dir, "media", "table", "x_y_b_", "top_*.table.json"))
    assert glob.glob(os.path.join(run_dir, "lens", "x_y_b_", "all", "step_*.json"))


@pytest.mark.slow
def test_ddp_search_failing_on_rank_zero_neither_hangs_nor_kills_and_unindexed_ids_match_one_process(tmp_path):
    """Rank 0's search raises at epoch 0: both ranks finish the fit; epoch 1's slices, on data without an index key
    (ids from SampleIds), equal those of one process."""
    one = script.summary(script.run_validate(devices=1, root=str(tmp_path), indexed=False))
    out = tmp_path / "fit.json"
    proc = subprocess.run([sys.executable, str(HERE / "error_slices_ddp_script.py"), "--devices", "2", "--mode",
                           "fit-fail", "--out", str(out), "--root", str(tmp_path)], cwd=tmp_path, env=_ddp_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads(Path(f"{out}.rank0").read_text())
    rank1 = json.loads(Path(f"{out}.rank1").read_text())
    assert rank0["epochs"] == rank1["epochs"] == 2  # both ranks trained to the end
    assert len(rank0["search_failures"]) == 1 and "the search broke on rank 0" in rank0["search_failures"][0]
    assert rank1["search_failures"] == []
    assert rank0["last_result"] == rank1["last_result"] and rank0["last_result"]["epoch"] == 1
    assert rank0["worst_logged"] == rank1["worst_logged"] == pytest.approx(one["worst_accuracy"])
    assert one["n_samples"] == 1001 and one["slices"][0]["name"] == PLANTED
    assert rank0["summary"] == one


# ------------------------------------------------------------------------------------------------ end to end
SPURIOUS_EPOCHS = 30


def test_callback_names_the_planted_groups_of_spurious_digits(tmp_path):
    """End to end on SpuriousDigits: a shortcut that half the validation images lack, and a subgroup mislabeled in
    training.

    Training: every image carries the class-position square; the thick 3s (``digit=3 & thickness=2``) are labeled 8.
    Validation: true labels, and only half of the images carry the square (at the class position). A model that
    learned the shortcut and the wrong labels errs on ``shortcut_present=0`` and on the 3s; the callback must name
    both. A small MLP keeps the run to seconds.
    """
    options = dict(seed=0, train_shortcut_fraction=1.0, eval_shortcut_mode="consistent", eval_shortcut_fraction=0.5,
                   mislabel_group={"digit": 3, "thickness": 2}, mislabel_as=8, split_fractions=(0.55, 0.4, 0.05))
    train, val = SpuriousDigits("train", **options), SpuriousDigits("val", **options)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 128), nn.ReLU(), nn.Linear(128, 10))
    model = LitClassifier(mlp, lr=3e-3)
    cb = SubgroupErrorSlices(min_support=10, embedding_layer="model.2", every_n_epochs=SPURIOUS_EPOCHS,
                             num_images=8, metadata_keys=["digit", "thickness", "shortcut_present"])
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = Trainer(max_epochs=SPURIOUS_EPOCHS, accelerator="cpu", devices=1, logger=[tb, csv_logger],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, check_val_every_n_epoch=SPURIOUS_EPOCHS, num_sanity_val_steps=0,
                      callbacks=[cb])
    # Training batches are plain (image, label) tuples; validation batches are the dicts that carry the metadata.
    train_loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    trainer.fit(model, train_loader, DataLoader(val, batch_size=256))

    slices = cb.last_slices
    names = [s.name + " " + " ".join(d["text"] for d in s.description) for s in slices[:3]]
    # The mislabeled digit leads, and the reported digit-3 slices hold the planted group.
    top = slices[0]
    assert "digit=3" in [p.text for p in top.predicates], [s.name for s in slices]
    assert top.accuracy < 0.6 and top.q_value <= 0.05
    group = np.flatnonzero((val.metadata["digit"] == 3) & (val.metadata["thickness"] == 2))
    covered = np.concatenate([s.indices for s in slices if "digit=3" in [p.text for p in s.predicates]])
    assert np.isin(group, covered).mean() >= 0.9
    # The missing shortcut is named, as a predicate or as the description of a cluster.
    assert any("shortcut_present=0" in n for n in names), names

    # What a user sees: the table, the curves, the examples and the JSON.
    ea = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    table = ea.Tensors("slices/top/text_summary")[0].tensor_proto.string_val[0].decode()
    assert top.name in table
    assert ea.Scalars("slices/worst_accuracy")[0].value <= top.accuracy + 1e-6
    assert ea.Images("slices/worst_examples")
    artifact = next((Path(csv_logger.log_dir) / "lens" / "slices" / "all").glob("*.json"))
    assert json.loads(artifact.read_text())["slices"][0]["name"] == top.name


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_repeats_are_dropped_by_position_and_shared_samples_by_gathered_ids(shuffle):
    """Under DDP each rank drops the DistributedSampler's padding repeats by their position (past the dataset's end),
    shuffled or not; without a DistributedSampler the ids alone are gathered and each sample is kept once, on the
    first rank that has it. Driven as two shards of the analysis."""
    from torch.utils.data import DistributedSampler

    from lightning_lens.callbacks.error_slices import _drop_repeats
    from lightning_lens.slices.shards import run_sharded

    dataset = list(range(7))  # 7 samples on 2 ranks: one padding repeat
    samplers = [DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=shuffle, seed=3) for r in (0, 1)]
    shards = []
    for rank, sampler in enumerate(samplers):
        ids = np.array(list(sampler))
        shards.append({"id": ids, "position": np.arange(ids.size) * 2 + rank, "loss": ids * 0.5, "meta": {}})
    kept = run_sharded([_drop_repeats(dict(s), 2, r, samplers[r]) for r, s in enumerate(shards)])
    ids = np.concatenate([k["id"] for k in kept])
    assert sorted(ids.tolist()) == list(range(7))  # the repeat is gone, nothing else
    assert all(np.array_equal(k["loss"], k["id"] * 0.5) for k in kept)  # columns stay aligned
    # No DistributedSampler: both ranks saw every sample; rank 0 keeps them all, rank 1 none
    everything = {"id": np.arange(7), "position": np.arange(7), "loss": np.zeros(7), "meta": {}}
    kept = run_sharded([_drop_repeats(dict(everything), 2, r, None) for r in (0, 1)])
    assert kept[0]["id"].tolist() == list(range(7)) and kept[1]["id"].size == 0
