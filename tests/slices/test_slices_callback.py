"""SubgroupErrorSlices inside Lightning: what it logs, that it never changes training, hooks, state, DDP."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import SubgroupErrorSlices

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("slices_ddp_script", HERE / "slices_ddp_script.py")
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
    csv = CSVLogger(tmp_path, name="csv")
    cb = script.make_callback()
    model = script.PixelReader(lr=0.0)  # a fixed model: the same slice every epoch
    _trainer(tmp_path, [cb], [tb, csv], max_epochs=2, limit_train_batches=2).fit(model, _loader(), _loader())

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
    assert "| 1 | colour=2 & size=1 | metadata |" in table and "error [95% CI]" in table
    image = ea.Images("slices/worst_examples")[-1]
    assert image.width > 64 and image.height >= 64

    json_dir = Path(csv.log_dir) / "lens" / "slices" / "all"
    artifacts = sorted(json_dir.glob("step_*.json"))
    assert len(artifacts) == 2
    payload = json.loads(artifacts[-1].read_text())
    assert payload["n_samples"] == 1001 and payload["slices"][0]["name"] == PLANTED
    assert payload["slices"][0]["indices"] == sorted(top.indices.tolist())
    assert payload["search"]["depth_reached"] == 2 and payload["slices"][0]["tracked_as"] == "colour=2&size=1"
    assert (Path(csv.log_dir) / "lens" / "slices" / "top").is_dir()


def test_no_extra_forward_when_validation_step_returns_logits(tmp_path):
    batches = 16  # ceil(1001 / 64)
    model = script.PixelReader(return_logits=True)
    _trainer(tmp_path, [script.make_callback()]).validate(model, _loader())
    assert model.forward_calls == batches
    model = script.PixelReader(return_logits=False)
    cb = script.make_callback()
    with pytest.warns(UserWarning, match="extra no-grad forward"):
        _trainer(tmp_path, [cb]).validate(model, _loader())
    assert model.forward_calls == 2 * batches
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


def test_every_n_epochs_and_sanity_check_are_skipped(tmp_path):
    csv = CSVLogger(tmp_path, name="csv")
    cb = script.make_callback(every_n_epochs=2, embedding_layer=None)
    _trainer(tmp_path, [cb], csv, max_epochs=3, limit_train_batches=1, num_sanity_val_steps=2).fit(
        script.PixelReader(lr=0.0), _loader(), _loader())
    artifacts = sorted((Path(csv.log_dir) / "lens" / "slices" / "all").glob("*.json"))
    assert [json.loads(p.read_text())["epoch"] for p in artifacts] == [1]


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


def test_constructor_and_setup_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs must be an int >= 1"):
        SubgroupErrorSlices(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_depth must be"):
        SubgroupErrorSlices(max_depth=9)
    with pytest.raises(ValueError, match="embedding_layer='nope' is not a module"):
        _trainer(tmp_path, [SubgroupErrorSlices(embedding_layer="nope")]).validate(script.PixelReader(), _loader())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_find_the_same_slices_as_one(tmp_path):
    one = script.summary(script.run_validate(devices=1, root=str(tmp_path)))
    out = tmp_path / "ddp.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(HERE / "slices_ddp_script.py"), "--devices", "2", "--out", str(out),
                           "--root", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert one["n_samples"] == two["n_samples"] == 1001  # the sample the DistributedSampler repeated is dropped
    assert two["slices"] and two["slices"][0]["name"] == PLANTED
    assert two == one


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
