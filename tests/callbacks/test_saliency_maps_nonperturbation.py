"""SaliencyMapCallback never changes the training it observes: seeded fits with and without it end bit-identical."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier, SmallCNN


def _demo_model() -> nn.Module:
    return SmallCNN(in_channels=1, num_classes=10)


def _model_with_batchnorm_and_dropout() -> nn.Module:
    """The demo CNN plus BatchNorm (running statistics) and Dropout (global RNG): both betray a train-mode forward."""
    net = SmallCNN(in_channels=1, num_classes=10, width=8)
    net.features.insert(1, nn.BatchNorm2d(8))
    net.classifier.insert(3, nn.Dropout(0.3))
    return net


def _fit(saliency_digits, tmp_path, callbacks, make_model):
    seed_everything(0)
    model = LitClassifier(model=make_model())
    train = DataLoader(Subset(saliency_digits["train"], range(96)), batch_size=32, shuffle=True, num_workers=0)
    val = DataLoader(Subset(saliency_digits["val"], range(64)), batch_size=32, num_workers=0)
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(tmp_path)),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, train, val)
    return model, torch.get_rng_state()


@pytest.mark.parametrize(
    ("make_model", "num_probes"), [(_demo_model, 4), (_model_with_batchnorm_and_dropout, 2)], ids=["demo", "bn_dropout"]
)
def test_fits_with_and_without_the_callback_end_bit_identical(saliency_digits, tmp_path, make_model, num_probes):
    plain, rng_plain = _fit(saliency_digits, tmp_path / "plain", [], make_model)
    # the default methods and settings (gradient, SmoothGrad, IG, Grad-CAM), fewer probes, every method every epoch
    cb = SaliencyMapCallback(num_probes=num_probes, max_overhead=None)
    observed, rng_observed = _fit(saliency_digits, tmp_path / "observed", [cb], make_model)

    assert sorted(cb.last_attributions) == sorted(cb.method_names) == sorted(
        ["gradient", "smoothgrad", "integrated_gradients", "gradcam"]
    )
    assert len(cb.probes) == num_probes
    plain_state, observed_state = plain.state_dict(), observed.state_dict()
    assert plain_state.keys() == observed_state.keys()
    for key in plain_state:  # parameters and buffers (BatchNorm running statistics)
        assert torch.equal(plain_state[key], observed_state[key]), key
    assert torch.equal(rng_plain, rng_observed)  # the global RNG advanced identically
    for a, b in zip(plain.parameters(), observed.parameters()):  # the last step's gradients, untouched
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)
    assert observed.training == plain.training
    assert [m.training for m in observed.modules()] == [m.training for m in plain.modules()]
