"""SaliencyMapCallback checks its configuration at setup, on one validation batch, before the first training step.

Every error names the argument and the fix, and the LightningModule has taken no training step when it is raised.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier, SmallCNN


class Counting(LitClassifier):
    """LitClassifier that counts its training steps."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trained_steps = 0

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        return super().training_step(batch, batch_idx)


class OddOutput(LightningModule):
    """Trains a linear model on SpuriousDigits; ``forward`` returns a dict or one binary logit."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10 if output == "dict" else 1))
        self.trained_steps = 0

    def forward(self, x):
        z = self.net(x)
        return {"scores": z} if self.output == "dict" else z  # a mapping without "logits": needs output_fn

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        z = self.net(batch["image"])
        if self.output == "dict":
            return F.cross_entropy(z, batch["label"])
        return F.binary_cross_entropy_with_logits(z[:, 0], (batch["label"] % 2).float())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn_with_pooled_head() -> nn.Module:
    net = SmallCNN(width=4)
    net.features.append(nn.AdaptiveAvgPool2d(1))
    net.classifier[1] = nn.Linear(8, 64)
    return net


def _fit(cb, model, loaders, trainer_kwargs, **kwargs):
    trainer = Trainer(**trainer_kwargs(max_epochs=1, logger=False, callbacks=[cb], **kwargs))
    trainer.fit(model, *loaders)
    return trainer


CASES = [
    # (callback kwargs, model, data, error, message)
    ({"input_key": "pixels"}, "cnn", "images", ValueError, r"input_key='pixels' does not select anything.*'image'"),
    ({"target_key": "y"}, "cnn", "images", ValueError, r"target_key='y' does not select anything"),
    ({"denormalize": ([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])}, "cnn", "images", ValueError,
     r"denormalize=\(mean, std\) gives 3 values each, but the inputs have 1 channel\(s\): pass one value each"),
    ({"methods": ["gradcam"], "method_kwargs": {"gradcam": {"layer": "model.nope"}}}, "cnn", "images", ValueError,
     r"methods\[0\] \('gradcam'\).*layer='model.nope' is not a module of the model"),
    ({"methods": ["gradient", "gradcam"], "method_kwargs": {"gradcam": {"layer": "model.classifier.1"}}}, "cnn",
     "images", ValueError, r"methods\[1\] \('gradcam'\) failed on 2 validation sample\(s\) at setup.*method_kwargs"),
    ({"methods": ["gradcam"], "method_kwargs": {"gradcam": {"layer": "model.features.10"}}}, "pooled", "images",
     ValueError, r"methods\[0\] \('gradcam'\) uses a layer whose output has shape \(1, 8, 1, 1\).*larger than 1x1"),
    ({"methods": ["gradient", "gradcam"]}, "mlp", "flat", ValueError,
     r"methods\[1\]='gradcam' needs a layer with a spatial .* the model has none .*remove it from methods"),
    ({"methods": ["gradient"]}, "dict", "images", ValueError,
     r"forward returns dict for 2 inputs, which gives no \(batch, classes\) logits.*keys \['scores'\].*Give the"
     r" callback output_fn="),
    ({"methods": ["gradient"]}, "binary", "images", ValueError,
     r"target='label'.*the labels hold class [1-9], but the model returns 1 logit\(s\) per example \(one logit: a"
     r" binary model\); use target='prediction'"),
    ({"methods": ["gradient"], "input_key": lambda b: (b["image"] * 255).long()}, "cnn", "images", TypeError,
     r"input_key selects inputs of dtype torch.int64.*floating point"),
    ({"methods": ["gradient"], "input_key": lambda b: b["x"].reshape(-1, 8, 8)}, "mlp", "flat", ValueError,
     r"forward failed on the inputs input_key selects \(shape \(2, 8, 8\).*mat1 and mat2"),
    ({"methods": ["gradient"], "quality_metrics": ["deletion_auc"], "quality_options": {"deletion": {"n_stepz": 4}}},
     "cnn", "images", ValueError, r"quality_metrics=\['deletion_auc'\] failed for 'gradient'.*quality_options"),
]


@pytest.mark.parametrize(("kwargs", "model", "data", "error", "match"), CASES,
                         ids=["input_key", "target_key", "denormalize", "layer_missing", "layer_not_spatial",
                              "layer_1x1", "gradcam_on_mlp", "dict_output", "binary_logit", "integer_inputs",
                              "input_shape", "quality_options"])
def test_configuration_errors_are_raised_before_the_first_training_step(
    kwargs, model, data, error, match, saliency_loaders, flat_digits_loaders, trainer_kwargs
):
    module = {
        "cnn": lambda: Counting(model=SmallCNN(width=4)),
        "pooled": lambda: Counting(model=cnn_with_pooled_head()),
        "mlp": lambda: Counting(model=mlp()),
        "dict": lambda: OddOutput("dict"),
        "binary": lambda: OddOutput("binary"),
    }[model]()
    loaders = saliency_loaders(n_train=32, n_val=16) if data == "images" else flat_digits_loaders(batch_size=32)
    cb = SaliencyMapCallback(num_probes=2, **kwargs)
    with pytest.raises(error, match=match):
        _fit(cb, module, loaders, trainer_kwargs, limit_train_batches=2, limit_val_batches=1)
    assert module.trained_steps == 0


def test_default_methods_leave_gradcam_out_on_an_mlp(tmp_path, flat_digits_loaders, trainer_kwargs, read_tensorboard,
                                                      caplog):
    model = Counting(model=mlp())
    cb = SaliencyMapCallback(num_probes=4, max_overhead=None)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        Trainer(**trainer_kwargs(max_epochs=2, logger=logger, callbacks=[cb], limit_train_batches=2)).fit(
            model, *flat_digits_loaders(batch_size=32))
    assert model.trained_steps == 4
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert "no layer with a spatial" in line and "gradcam" in line
    assert cb.method_names == ["gradient", "smoothgrad", "integrated_gradients"]
    ea = read_tensorboard(logger.log_dir)
    assert sorted(ea.Tags()["images"]) == ["saliency/gradient", "saliency/integrated_gradients", "saliency/smoothgrad"]
    # 64 features are drawn as 8x8 images: the maps keep the inputs' shape
    assert cb.last_attributions["gradient"].shape == (4, 64)


def test_a_callable_denormalize_is_checked_against_the_inputs_but_only_reported(saliency_loaders, trainer_kwargs):
    model = Counting(model=SmallCNN(width=4))
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=2, denormalize=lambda x: x[:1, :4], max_overhead=None)
    match = (r"'denormalize' failed at epoch 0 with ValueError: denormalize returned \(1, 4, 32\) for an input of shape"
             r" \(1, 32, 32\).*Fix: denormalize must")
    with pytest.warns(RuntimeWarning, match=match):
        _fit(cb, model, saliency_loaders(n_train=32, n_val=16), trainer_kwargs)
    assert model.trained_steps == 2
    assert cb.last_attributions["gradient"].shape == (2, 1, 32, 32)


def test_the_dry_run_estimates_each_methods_cost(saliency_loaders, trainer_kwargs):
    cb = SaliencyMapCallback(methods=["gradient", "smoothgrad"], method_kwargs={"smoothgrad": {"n_samples": 8}},
                             num_probes=4, max_overhead=None)
    _fit(cb, Counting(model=SmallCNN(width=4)), saliency_loaders(n_train=16, n_val=16), trainer_kwargs)
    assert set(cb._estimates) == {"gradient", "smoothgrad"}
    assert all(seconds > 0 for seconds in cb._estimates.values())
