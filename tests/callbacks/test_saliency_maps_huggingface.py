"""Issue 12, HuggingFace models in the callbacks: a LightningModule whose forward returns a ``ModelOutput`` (a tiny
``BertForSequenceClassification`` built from a config: random weights, no download), or any other output through
``output_fn=``, is explained and scored through the one ``forward_logits`` path by SaliencyMapCallback and
PermutationImportanceMonitor."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytorch_lightning import LightningModule, Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_lens.attribution import Gradient, GradientXInput, IntegratedGradients
from lightning_lens.attribution.layer import reduce_tokens
from lightning_lens.callbacks import PermutationImportanceMonitor, SaliencyMapCallback
from lightning_lens.callbacks.permutation_importance import _permutation_ranks
from lightning_lens.datasets import LeakyTabular, SpuriousText
from lightning_lens.importance import permutation_importance
from lightning_lens.testing import TabularMLP

transformers = pytest.importorskip("transformers")

VOCAB = len(SpuriousText("val", size=1).vocabulary)
EMBEDDING = "model.bert.embeddings.word_embeddings"


class LitBert(LightningModule):
    """A tiny BertForSequenceClassification; forward returns its ModelOutput, as a HuggingFace user writes it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=2, attn_implementation="eager",
        )
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch["input_ids"], batch["attention_mask"])
        self.log("val/acc", (out.logits.argmax(1) == batch["label"]).float().mean(), batch_size=len(out.logits))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class ScoresDict(LitBert):
    """forward returns a dict without ``"logits"``: only ``output_fn`` can tell where the scores are."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return {"scores": self.model(input_ids=input_ids, attention_mask=attention_mask).logits}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"])["scores"], batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass


def scores(out: dict) -> torch.Tensor:
    return out["scores"]


def _loaders():
    data = SpuriousText("train", seed=0, size=64)
    train = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(SpuriousText("val", seed=0, size=16), batch_size=8)
    return data, train, val


def _trainer(tmp_path, callbacks, logger=None, **kwargs) -> Trainer:
    return Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                   logger=logger if logger is not None else CSVLogger(str(tmp_path)), callbacks=callbacks, **kwargs)


def test_bert_model_output_token_maps_are_logged_and_equal_layer_attribution(tmp_path, read_tensorboard):
    seed_everything(0)
    data, train, val = _loaders()
    lit = LitBert()
    cb = SaliencyMapCallback(methods=["gradient_x_input", ("integrated_gradients", {"n_steps": 8})], layer=EMBEDDING,
                             tokenizer=data, num_probes=4, target="prediction", max_overhead=None, strict=True)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, [cb], logger=tb, limit_train_batches=3).fit(lit, train, val)

    inputs = dict(cb.probes.inputs)
    lit.eval()
    with torch.no_grad():
        pred = lit(**inputs).logits.argmax(1)
    torch.testing.assert_close(cb.last_targets, pred)
    expected = {
        "gradient_x_input": GradientXInput(lit, layer=EMBEDDING).attribute(inputs, target=pred),
        "integrated_gradients": IntegratedGradients(lit, layer=EMBEDDING, n_steps=8).attribute(inputs, target=pred),
    }
    for name, attributions in expected.items():
        assert attributions.shape == (4, 24, 16)
        torch.testing.assert_close(cb.last_attributions[name], reduce_tokens(attributions), rtol=1e-4, atol=1e-6)
    events = read_tensorboard(tb.log_dir)
    assert {"saliency/gradient_x_input", "saliency/integrated_gradients"} <= set(events.Tags()["images"])
    assert events.Images("saliency/integrated_gradients")[-1].width > 200
    assert "saliency/integrated_gradients/mean_abs" in events.Tags()["scalars"]


def test_bert_maps_under_validate_in_inference_mode_leave_the_model_untouched(tmp_path):
    _, _, val = _loaders()
    lit = LitBert()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    cb = SaliencyMapCallback(methods=["gradient", "smoothgrad"], method_kwargs={"smoothgrad": {"n_samples": 3}},
                             layer=EMBEDDING, num_probes=3, strict=True)
    _trainer(tmp_path, [cb], inference_mode=True).validate(lit, val)
    maps = cb.last_attributions["gradient"]
    assert maps.shape == (3, 24) and bool(torch.isfinite(maps).all()) and bool((maps != 0).any())
    assert all(p.grad is None for p in lit.parameters())
    assert all(torch.equal(before[k], v) for k, v in lit.state_dict().items())


def test_output_fn_picks_the_scores_of_any_output(tmp_path):
    seed_everything(0)
    _, train, val = _loaders()
    lit = ScoresDict()
    cb = SaliencyMapCallback(methods=["gradient"], layer=EMBEDDING, num_probes=2, output_fn=scores,
                             max_overhead=None, strict=True)
    _trainer(tmp_path, [cb], limit_train_batches=2).fit(lit, train, val)
    inputs = dict(cb.probes.inputs)
    lit.eval()
    expected = Gradient(lit, layer=EMBEDDING, output_fn=scores).attribute(inputs, target=cb.probes.targets)
    torch.testing.assert_close(cb.last_attributions["gradient"], reduce_tokens(expected))


def test_an_output_without_logits_and_no_output_fn_stops_the_fit_naming_output_fn(tmp_path):
    _, train, val = _loaders()
    lit = ScoresDict()
    before = [p.detach().clone() for p in lit.parameters()]
    with pytest.raises(ValueError, match=r"output_fn=.*'scores'"):
        _trainer(tmp_path, [SaliencyMapCallback(methods=["gradient"], layer=EMBEDDING, num_probes=2)]).fit(
            lit, train, val)
    assert all(torch.equal(a, b) for a, b in zip(before, lit.parameters()))


def test_output_fn_must_be_callable():
    with pytest.raises(TypeError, match="output_fn must be a function"):
        SaliencyMapCallback(output_fn="logits")
    with pytest.raises(TypeError, match="output_fn must be a function"):
        PermutationImportanceMonitor(output_fn=3)


# ---------------------------------------------------------------------------------------- permutation importance
class LitTabularOutput(LightningModule):
    """A tabular MLP whose forward returns a HuggingFace-style ``SequenceClassifierOutput`` (or a plain dict)."""

    def __init__(self, n_features: int, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TabularMLP(n_features, 2)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.model(x)
        if self.as_dict:
            return {"scores": logits}
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self(x)
        return out["scores"] if self.as_dict else out.logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self._logits(batch["features"]), batch["label"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_permutation_importance_monitor_scores_model_outputs(tmp_path, as_dict):
    seed_everything(0)
    train, val = LeakyTabular("train"), LeakyTabular("val")
    lit = LitTabularOutput(train.num_features, as_dict=as_dict)
    output_fn = scores if as_dict else None
    cb = PermutationImportanceMonitor(feature_names=train.feature_names, n_repeats=2, max_rows=64, output_fn=output_fn,
                                      max_overhead=None, strict=True, input_key="features", target_key="label")
    _trainer(tmp_path, [cb], limit_train_batches=2).fit(lit, DataLoader(train, batch_size=32),
                                                        DataLoader(val, batch_size=32))
    assert cb.last_result is not None and cb.last_rows == 64
    lit.eval()
    kept = torch.nonzero(_permutation_ranks(len(val), 0) < 64).squeeze(1)  # the monitor's fixed subset
    expected = permutation_importance(lit, val.features[kept], val.labels[kept], n_repeats=2,
                                      feature_names=train.feature_names, seed=0, output_fn=output_fn)
    torch.testing.assert_close(torch.as_tensor(cb.last_result.importances_mean),
                               torch.as_tensor(expected.importances_mean))


def test_permutation_importance_monitor_names_output_fn_for_an_unusable_output(tmp_path):
    train, val = LeakyTabular("train"), LeakyTabular("val")
    lit = LitTabularOutput(train.num_features, as_dict=True)
    cb = PermutationImportanceMonitor(input_key="features", target_key="label")
    with pytest.raises(TypeError, match="output_fn"):
        _trainer(tmp_path, [cb], limit_train_batches=1).fit(lit, DataLoader(train, batch_size=32),
                                                            DataLoader(val, batch_size=32))
