"""Probe stability (checkpoint resume, sharing, explicit probes), the time budget and the quality-metric scalars."""

from __future__ import annotations


import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_lens.attribution import Gradient
from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.evaluation import pointing_game, relevance_mass_accuracy
from lightning_lens.testing import LitClassifier
from lightning_lens.utils import ProbeSet


def test_checkpoint_resume_keeps_the_probes(tmp_path, saliency_digits, saliency_loaders, trainer_kwargs):
    train, val = saliency_loaders()
    first = SaliencyMapCallback(methods=["gradient"], num_probes=5)
    trainer = Trainer(**trainer_kwargs(max_epochs=1, logger=False, callbacks=[first]))
    model = LitClassifier()
    trainer.fit(model, train, val)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert torch.equal(state["probes"]["inputs"], first.probes.inputs)

    # after resuming, validation data in another order (and with other samples) would draw different probes ...
    other_val = DataLoader(Subset(saliency_digits["val"], range(100, 148)), batch_size=16)
    fresh = SaliencyMapCallback(methods=["gradient"], num_probes=5)
    Trainer(**trainer_kwargs(max_epochs=1, logger=False, callbacks=[fresh])).validate(LitClassifier(), other_val)
    assert not torch.equal(fresh.probes.indices, first.probes.indices)
    # ... but the resumed callback keeps the checkpoint's probes
    resumed = SaliencyMapCallback(methods=["gradient"], num_probes=5)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, logger=False, callbacks=[resumed]))
    trainer.fit(LitClassifier(), train, other_val, ckpt_path=ckpt)
    assert trainer.current_epoch == 2
    assert torch.equal(resumed.probes.inputs, first.probes.inputs)
    assert torch.equal(resumed.probes.indices, first.probes.indices)
    assert torch.equal(resumed.probes.targets, first.probes.targets)
    assert resumed.probes.masks.keys() == first.probes.masks.keys() == {"digit", "square"}
    assert resumed.last_attributions["gradient"].shape == (5, 1, 32, 32)  # and it explained them after resuming


def test_probes_are_spread_over_classes_and_stable_across_epochs(saliency_loaders, trainer_kwargs):
    train, val = saliency_loaders(n_val=96)
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=10)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, logger=False, callbacks=[cb]))
    trainer.fit(LitClassifier(), train, val)
    drawn = cb.probes
    assert sorted(drawn.targets.tolist()) == list(range(10))  # one probe per digit class
    Trainer(**trainer_kwargs(logger=False, callbacks=[cb])).validate(LitClassifier(), val)
    assert cb.probes is drawn


def test_explicit_probes_from_tuple_batches(tmp_path, saliency_digits, trainer_kwargs):
    images = torch.stack([saliency_digits["val"][i]["image"] for i in range(6)])
    labels = torch.tensor([saliency_digits["val"][i]["label"] for i in range(6)])
    probes = ProbeSet(inputs=images, targets=labels)
    val = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=3)
    model = LitClassifier()
    cb = SaliencyMapCallback(methods=["gradient"], probes=probes)
    Trainer(**trainer_kwargs(logger=False, callbacks=[cb])).validate(model, val)
    assert cb.probes is probes
    torch.testing.assert_close(cb.last_attributions["gradient"], Gradient(model).attribute(images, labels))
    # a checkpoint's probes do not replace explicitly passed ones
    cb.load_state_dict({"probes": ProbeSet(inputs=images[:2], targets=labels[:2]).state_dict()})
    assert cb.probes is probes


def test_target_label_without_labels_is_a_clear_error(saliency_digits, trainer_kwargs):
    images = torch.stack([saliency_digits["val"][i]["image"] for i in range(4)])
    labels = torch.tensor([saliency_digits["val"][i]["label"] for i in range(4)])
    cb = SaliencyMapCallback(methods=["gradient"], probes=ProbeSet(inputs=images))
    val = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    with pytest.raises(ValueError, match="target='label'.*no labels.*target_key.*target='prediction'"):
        Trainer(**trainer_kwargs(logger=False, callbacks=[cb])).validate(LitClassifier(), val)


def test_time_budget_skips_methods_with_a_warning_and_rotates_them(
    tmp_path, saliency_loaders, trainer_kwargs, read_tensorboard
):
    train, val = saliency_loaders(n_train=32)
    cb = SaliencyMapCallback(methods=["gradient", "gradcam", "integrated_gradients"], num_probes=2, time_budget=1e-9,
                             method_kwargs={"integrated_gradients": {"n_steps": 4}}, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with pytest.warns(UserWarning, match=r"time_budget=1e-09s was spent.*skipped 2 method\(s\)"):
        Trainer(**trainer_kwargs(max_epochs=3, logger=logger, callbacks=[cb])).fit(LitClassifier(), train, val)
    ea = read_tensorboard(logger.log_dir)
    # one method fits per epoch; the skipped ones go first the next time, so every method is logged in turn
    assert {t: [e.step for e in ea.Images(t)] for t in ea.Tags()["images"]} == {
        "saliency/gradient": [1], "saliency/gradcam": [3], "saliency/integrated_gradients": [5]
    }
    assert [(s.step, s.value) for s in ea.Scalars("saliency/skipped_methods")] == [(1, 2.0), (3, 2.0), (5, 2.0)]


def test_quality_metrics_are_logged_per_method_and_region(tmp_path, saliency_loaders, trainer_kwargs, read_tensorboard):
    _, val = saliency_loaders()
    model = LitClassifier()
    cb = SaliencyMapCallback(methods=["gradient", "gradcam"], num_probes=6,
                             quality_metrics=["relevance_mass", "pointing_game"], mask_regions=["digit"])
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    Trainer(**trainer_kwargs(logger=logger, callbacks=[cb])).validate(model, val)
    ea = read_tensorboard(logger.log_dir)
    masks = cb.probes.masks["digit"]
    for name in ("gradient", "gradcam"):
        maps = cb.last_attributions[name]
        expected = {
            "relevance_mass/digit": relevance_mass_accuracy(maps, masks).value,
            "relevance_mass/digit_chance": relevance_mass_accuracy(maps, masks).chance_level,
            "pointing_game/digit": pointing_game(maps, masks).value,
        }
        for key, value in expected.items():
            (event,) = ea.Scalars(f"quality/{name}/{key}")
            assert event.step == 0
            assert event.value == pytest.approx(value, rel=1e-5)
        assert not [t for t in ea.Tags()["scalars"] if t.startswith(f"quality/{name}/") and "square" in t]


def test_mask_regions_the_probes_lack_is_a_clear_error(saliency_loaders, trainer_kwargs):
    _, val = saliency_loaders()
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=2, quality_metrics=["relevance_mass"],
                             mask_regions=["object"])
    with pytest.raises(ValueError, match=r"mask_regions=\('object',\) names \['object'\].*\['digit', 'square'\]"):
        Trainer(**trainer_kwargs(logger=False, callbacks=[cb])).validate(LitClassifier(), val)
