"""SaliencyMapCallback's constructor: LightningCLI YAML configuration and argument validation."""

from __future__ import annotations

import functools

import pytest
import torch
from pytorch_lightning.cli import LightningCLI

from lightning_lens.attribution import Gradient, IntegratedGradients, SmoothGrad, VarGrad, available_methods
from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier

CONFIG = """
trainer:
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_lens.callbacks.SaliencyMapCallback
      init_args:
        methods: [gradient, gradcam, integrated_gradients]
        method_kwargs:
          integrated_gradients: {n_steps: 16}
        num_probes: 8
        every_n_epochs: 3
        target: prediction
        input_key: image
        denormalize: [[0.5], [0.25]]
        time_budget: 5.0
        layout: methods_x_probes
        quality_metrics: [relevance_mass]
        mask_regions: [square]
"""


def test_lightning_cli_yaml_configures_the_callback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cli = LightningCLI(LitClassifier, run=False, args=["--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SaliencyMapCallback)]
    assert cb.method_names == ["gradient", "gradcam", "integrated_gradients"]
    assert cb.method_kwargs == {"integrated_gradients": {"n_steps": 16}}
    assert (cb.num_probes, cb.every_n_epochs, cb.target, cb.layout) == (8, 3, "prediction", "methods_x_probes")
    assert cb.denormalize == ((0.5,), (0.25,))
    assert cb.time_budget == 5.0
    assert cb.quality_metrics == ("relevance_mass",)
    assert cb.mask_regions == ("square",)
    assert cb._accessor.input_key == "image"
    # the configuration serializes back (what LightningCLI's SaveConfigCallback writes)
    dumped = cli.parser.dump(cli.config)
    assert "denormalize:\n" in dumped and "Unable to serialize" not in dumped


def test_lightning_cli_rejects_a_target_outside_the_choices(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("target: prediction", "target: logits"))
    with pytest.raises(SystemExit):
        LightningCLI(LitClassifier, run=False, args=["--config", str(path)])
    assert "target" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ["gradient", "grad_cam_pp"]}, ValueError, r"methods\[1\]='grad_cam_pp'.*available: \[.*'gradcam'"),
        ({"methods": "gradient"}, TypeError, r"did you mean methods=\['gradient'\]"),
        ({"methods": []}, ValueError, "methods is empty"),
        ({"methods": ["gradient", "gradient"]}, ValueError, r"\['gradient'\] more than once"),
        ({"methods": [42]}, TypeError, r"methods\[0\]"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs must be >= 1"),
        ({"every_n_epochs": 1.5}, TypeError, "every_n_epochs must be an int"),
        ({"num_probes": 0}, ValueError, "num_probes must be >= 1"),
        ({"target": "logits"}, ValueError, r"target must be one of \['label', 'prediction'\]"),
        ({"layout": "grid"}, ValueError, "layout must be one of"),
        ({"time_budget": 0}, ValueError, "time_budget must be > 0"),
        ({"time_budget": "1s"}, TypeError, "time_budget must be a number"),
        ({"method_kwargs": {"smoothgrad": {"n_samples": 4}}, "methods": ["gradient"]}, ValueError,
         r"method_kwargs has an entry for 'smoothgrad'"),
        ({"method_kwargs": {"gradient": 3}, "methods": ["gradient"]}, TypeError, r"method_kwargs\['gradient'\]"),
        ({"quality_metrics": ["iou"]}, ValueError, r"quality_metrics names unknown metric\(s\) \['iou'\]"),
        ({"quality_metrics": "relevance_mass"}, TypeError, "quality_metrics must be a list of strings"),
        ({"denormalize": "imagenet"}, TypeError, "denormalize must be a callable"),
        ({"input_key": 1.5}, TypeError, "input_key must be an int, a str, a callable or None"),
        ({"probes": torch.zeros(2, 1, 4, 4)}, TypeError, "probes must be a lightning_lens.utils.ProbeSet"),
        ({"log_scalars": "yes"}, TypeError, "log_scalars must be a bool"),
    ],
)
def test_bad_arguments_raise_errors_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SaliencyMapCallback(**kwargs)


def test_method_objects_classes_and_aliases_are_accepted():
    model = LitClassifier()
    sg = SmoothGrad(model.model, n_samples=3)  # bound to a submodule of the LightningModule: fine
    cb = SaliencyMapCallback(methods=[sg, Gradient, "ig", functools.partial(VarGrad, n_samples=2)])
    assert cb.method_names == ["smoothgrad", "gradient", "integrated_gradients", "vargrad"]
    cb._bind_methods(model)
    bound = dict(cb._methods)
    assert bound["smoothgrad"] is sg
    assert isinstance(bound["gradient"], Gradient) and bound["gradient"].model is model
    assert isinstance(bound["integrated_gradients"], IntegratedGradients)
    assert isinstance(bound["vargrad"], VarGrad) and bound["vargrad"].n_samples == 2
    assert "ig" not in available_methods()  # an alias the registry resolves, logged under the registry name


def test_a_method_bound_to_another_model_is_refused():
    cb = SaliencyMapCallback(methods=[Gradient(LitClassifier())])
    with pytest.raises(ValueError, match="not part of the LightningModule"):
        cb._bind_methods(LitClassifier())


def test_state_key_distinguishes_instances():
    a = SaliencyMapCallback(methods=["gradient"])
    b = SaliencyMapCallback(methods=["gradcam"])
    assert a.state_key != b.state_key
    assert a.state_key == SaliencyMapCallback(methods=["gradient"]).state_key
