"""SaliencyMapCallback(quality_metrics=..., output_fn=...) on a model whose output is a dict: the deletion /
insertion curves score the model through output_fn, and the logged values equal compute_quality on the same
model returning plain logits."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_lens.attribution import Gradient
from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.evaluation import compute_quality
from lightning_lens.testing import LitClassifier

METRICS = ["deletion_auc", "deletion_auc_random", "insertion_auc", "relevance_mass"]
OPTIONS = {"deletion": {"n_steps": 4}, "insertion": {"n_steps": 4, "substrate": "zeros"}}


class ScoresInADict(LitClassifier):
    """Returns ``{"scores": logits}``: no ``"logits"`` key, so every model call needs ``output_fn``."""

    def forward(self, *args, **kwargs):
        return {"scores": self.model(*args, **kwargs)}

    def _call(self, x):
        return super()._call(x)["scores"]


def test_quality_metrics_score_a_dict_output_through_output_fn(tmp_path, saliency_loaders, trainer_kwargs,
                                                                 read_tensorboard):
    _, val = saliency_loaders()
    torch.manual_seed(0)
    model = ScoresInADict()
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=4, target="prediction", quality_metrics=METRICS,
                             quality_options=OPTIONS, mask_regions=["square"], output_fn=lambda out: out["scores"],
                             max_overhead=None, strict=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    Trainer(**trainer_kwargs(logger=logger, callbacks=[cb])).validate(model, val)

    plain = LitClassifier()
    plain.load_state_dict(model.state_dict())
    plain.eval()
    x = cb.probes.inputs
    with torch.no_grad():
        predicted = plain(x).argmax(1)
    expected = compute_quality(plain, Gradient(plain), x, None, predicted, {"square": cb.probes.masks["square"]},
                               METRICS, options=OPTIONS, seed=cb.probe_seed)
    events = read_tensorboard(logger.log_dir)
    assert set(expected) >= {"deletion_auc", "deletion_auc_random", "insertion_auc", "relevance_mass/square"}
    for key, value in expected.items():
        (event,) = events.Scalars(f"quality/gradient/{key}")
        assert event.value == pytest.approx(value, rel=1e-5, abs=1e-7)
