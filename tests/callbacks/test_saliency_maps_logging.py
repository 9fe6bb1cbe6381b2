"""End-to-end: what SaliencyMapCallback logs, read back from TensorBoard event files, a W&B offline run and CSVLogger."""

from __future__ import annotations

import csv
import glob
import io
import os

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_lens.attribution import Gradient, IntegratedGradients
from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier

STEPS_PER_EPOCH = 6  # 96 training digits in batches of 16


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return (imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def _predictions(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        probs = model.eval()(inputs).softmax(dim=1)
    return probs.argmax(dim=1), probs


def test_tensorboard_holds_a_grid_and_scalars_per_method_per_logged_epoch(
    tmp_path, saliency_loaders, saliency_fast, trainer_kwargs, read_tensorboard
):
    torch.manual_seed(0)
    train, val = saliency_loaders()
    cb = SaliencyMapCallback(**saliency_fast, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    model = LitClassifier()
    Trainer(**trainer_kwargs(max_epochs=2, logger=logger, callbacks=[cb])).fit(model, train, val)

    ea = read_tensorboard(logger.log_dir)
    # one per epoch, at the step Lightning logs val/* at (one less than global_step then); nothing from the sanity check
    steps = [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    assert sorted(ea.Tags()["images"]) == sorted(f"saliency/{m}" for m in saliency_fast["methods"])
    for name in saliency_fast["methods"]:
        events = ea.Images(f"saliency/{name}")
        assert [e.step for e in events] == steps
        for key in ("mean_abs", "top10_mass"):
            assert [s.step for s in ea.Scalars(f"saliency/{name}/{key}")] == steps
        assert f"saliency/{name}/seconds" not in ea.Tags()["scalars"]  # timing is off by default (log_timing)
        assert all(s.value > 0 for s in ea.Scalars(f"saliency/{name}/mean_abs"))
        assert all(0.1 - 1e-6 <= s.value <= 1.0 for s in ea.Scalars(f"saliency/{name}/top10_mass"))

        # the last image is exactly the grid of the maps the callback computed at that step
        preds, probs = _predictions(model, cb.probes.inputs)
        expected, _ = cb._method_grid(name, cb.probes, cb.probes.inputs, cb.last_attributions[name], preds, probs)
        logged = _png(events[-1].encoded_image_string)
        assert (events[-1].height, events[-1].width) == expected.shape[:2]
        np.testing.assert_array_equal(logged, expected)

    # the logged top10_mass is the share of |a| in the top 10% pixels of each map, averaged over probes
    a = cb.last_attributions["gradient"].abs().sum(dim=1).flatten(1)
    share = a.topk(a.shape[1] // 10 + 1, dim=1).values.sum(dim=1) / a.sum(dim=1)
    assert ea.Scalars("saliency/gradient/top10_mass")[-1].value == pytest.approx(float(share.mean()), rel=1e-5)
    assert ea.Scalars("saliency/gradient/mean_abs")[-1].value == pytest.approx(
        float(cb.last_attributions["gradient"].abs().mean()), rel=1e-5
    )


def test_every_n_epochs_and_the_methods_x_probes_layout(tmp_path, saliency_loaders, trainer_kwargs, read_tensorboard):
    train, val = saliency_loaders()
    cb = SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=3, every_n_epochs=2, layout="methods_x_probes",
                             log_scalars=False, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    Trainer(**trainer_kwargs(max_epochs=5, logger=logger, callbacks=[cb])).fit(LitClassifier(), train, val)

    ea = read_tensorboard(logger.log_dir)
    assert ea.Tags()["images"] == ["saliency/methods_x_probes"]
    # epochs 0 (the first), 1 and 3 ((epoch + 1) % 2 == 0) and 4 (the last)
    assert [e.step for e in ea.Images("saliency/methods_x_probes")] == [
        (e + 1) * STEPS_PER_EPOCH - 1 for e in (0, 1, 3, 4)
    ]
    assert not [t for t in ea.Tags()["scalars"] if t.startswith("saliency/")]
    image = _png(ea.Images("saliency/methods_x_probes")[0].encoded_image_string)
    # 3 rows (input, gradient, gradcam) x 3 probe columns of 96-pixel cells, plus labels, the title and the colour scale
    assert 3 * 96 < image.shape[0] < 4 * 96 + 150 and 3 * 96 < image.shape[1]


class InferenceModeSpy(Callback):
    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.enabled.append(torch.is_inference_mode_enabled())


def test_validate_under_inference_mode_logs_maps_of_the_labels(
    tmp_path, saliency_loaders, trainer_kwargs, read_tensorboard
):
    _, val = saliency_loaders()
    model = LitClassifier()
    cb = SaliencyMapCallback(methods=["gradient", "smoothgrad", "integrated_gradients", "gradcam"],
                             method_kwargs={"smoothgrad": {"n_samples": 4}}, num_probes=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    seen = InferenceModeSpy()
    Trainer(**trainer_kwargs(logger=logger, callbacks=[seen, cb])).validate(model, val)
    assert seen.enabled == [True]  # Lightning's default: validate() runs the epoch-end hooks under inference mode

    ea = read_tensorboard(logger.log_dir)
    for name in cb.method_names:
        assert [e.step for e in ea.Images(f"saliency/{name}")] == [0]
    probes = cb.probes
    assert not probes.inputs.is_inference()
    assert torch.equal(cb.last_targets, probes.targets)
    # the callback's maps are the methods' maps of the labelled class, with the model in eval mode
    torch.testing.assert_close(cb.last_attributions["gradient"], Gradient(model).attribute(probes.inputs, probes.targets))
    torch.testing.assert_close(
        cb.last_attributions["integrated_gradients"],
        IntegratedGradients(model).attribute(probes.inputs, probes.targets),
    )
    assert all(cb.last_attributions[name].abs().sum() > 0 for name in ("gradient", "smoothgrad", "integrated_gradients"))
    assert all(p.grad is None for p in model.parameters())


def test_target_prediction_explains_the_predicted_class(tmp_path, saliency_loaders, trainer_kwargs):
    _, val = saliency_loaders()
    model = LitClassifier()
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=6, target="prediction")
    Trainer(**trainer_kwargs(logger=False, callbacks=[cb])).validate(model, val)
    preds, _ = _predictions(model, cb.probes.inputs)
    assert torch.equal(cb.last_targets, preds)
    assert not torch.equal(preds, cb.probes.targets)  # an untrained model: the two settings really differ here
    torch.testing.assert_close(cb.last_attributions["gradient"], Gradient(model).attribute(cb.probes.inputs, None))


def test_wandb_offline_run_holds_the_images(tmp_path, saliency_loaders, trainer_kwargs, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train, val = saliency_loaders(n_train=32)
    cb = SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=3, max_overhead=None)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lens-tests")
    try:
        Trainer(**trainer_kwargs(max_epochs=2, logger=logger, callbacks=[cb])).fit(LitClassifier(), train, val)
    finally:
        wandb.finish()
    runs = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*"))
    assert len(runs) == 1
    media = os.path.join(runs[0], "files", "media", "images")
    for name in ("gradient", "gradcam"):
        # one file per logged epoch, named <key>_<wandb's own row counter>_<hash>.png
        files = glob.glob(os.path.join(media, "saliency", f"{name}_*.png"))
        assert len(files) == 2, files
        for path in files:
            with open(path, "rb") as f:
                assert _png(f.read()).shape[0] > 3 * 32  # three probe rows of at least 32 pixels


def test_csv_logger_gets_png_files_and_scalar_columns(tmp_path, saliency_loaders, trainer_kwargs):
    train, val = saliency_loaders(n_train=32)
    cb = SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=3, max_overhead=None)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    Trainer(**trainer_kwargs(max_epochs=2, logger=logger, callbacks=[cb])).fit(LitClassifier(), train, val)

    for name in ("gradient", "gradcam"):
        files = sorted(glob.glob(os.path.join(logger.log_dir, "lens", "saliency", name, "step_*.png")))
        assert [os.path.basename(f) for f in files] == ["step_0000001.png", "step_0000003.png"]
        with open(files[-1], "rb") as f:
            assert _png(f.read()).ndim == 3
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("saliency/gradient/mean_abs")]
    assert [int(r["step"]) for r in logged] == [1, 3]
