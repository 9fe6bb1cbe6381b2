"""PermutationImportanceMonitor: logs exactly permutation_importance on its fixed subset of validation rows (read
back from the logs), ranks a planted leak first, works under validate(), refuses bad configurations at setup, and
gives under 2 DDP processes what 1 process gives (with the text path of SaliencyMapCallback)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import _ddp
import numpy as np
import pytest
import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_lens.attribution import GradientXInput
from lightning_lens.attribution.layer import reduce_tokens
from lightning_lens.callbacks import PermutationImportanceMonitor
from lightning_lens.callbacks.permutation_importance import _permutation_ranks
from lightning_lens.datasets import LeakyTabular, SpuriousText
from lightning_lens.importance import permutation_importance
from lightning_lens.testing import LitClassifier, TabularMLP, TinyTextTransformer

SCRIPT = Path(__file__).with_name("permutation_importance_ddp_script.py")


def _trainer(tmp_path, callbacks, loggers, max_epochs=3, **kwargs) -> Trainer:
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   logger=loggers, callbacks=callbacks, num_sanity_val_steps=0, **kwargs)


@pytest.fixture(scope="module")
def tables():
    return LeakyTabular("train", seed=0), LeakyTabular("val", seed=0, eval_leak_mode="consistent")


def _module(n_features: int) -> LitClassifier:
    return LitClassifier(TabularMLP(n_features, 2), num_classes=2, lr=1e-2)


def test_logged_importances_are_the_function_on_the_validation_rows_and_the_leak_rises_first(
        tmp_path, tables, read_tensorboard):
    seed_everything(0)
    train, val = tables
    lit = _module(train.num_features)
    cb = PermutationImportanceMonitor(feature_names=train.feature_names, n_repeats=3, top_k=3, max_overhead=None,
                                      strict=True)
    csv, tb = CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, [cb], [csv, tb]).fit(lit, DataLoader(train, batch_size=32, shuffle=True),
                                            DataLoader(val, batch_size=32))
    files = sorted(glob.glob(os.path.join(csv.log_dir, "lens", "importance", "permutation", "*.json")))
    assert len(files) == 3  # every epoch
    logged = json.loads(Path(files[-1]).read_text())
    assert logged["rows"] == len(val) and logged["metric"] == "accuracy"
    expected = permutation_importance(lit, val.features, val.labels, n_repeats=3, feature_names=train.feature_names,
                                      seed=0)
    np.testing.assert_allclose([f["importances"] for f in logged["features"]], expected.importances)
    assert expected.ranking()[0][0] == "leak"  # the planted feature first
    # the scalar curves: every feature ever in the top 3, the leak among them, rising as training leans on it (on
    # this table the real features carry the label too, so the drop stays a few points of accuracy)
    events = read_tensorboard(tb.log_dir)
    leak = [s.value for s in events.Scalars("importance/leak")]
    assert len(leak) == 3 and leak[-1] == pytest.approx(float(expected.importances_mean[-1]))
    assert leak[-1] > leak[0] > 0.0
    assert "importance/permutation" in events.Tags()["images"]
    assert set(cb.tracked) >= {"leak"}


def test_a_fixed_seeded_subset_of_rows_when_the_validation_set_is_larger_than_max_rows(tmp_path, tables):
    seed_everything(0)
    train, val = tables
    lit = _module(train.num_features)
    cb = PermutationImportanceMonitor(max_rows=40, n_repeats=2, seed=5, max_overhead=None, strict=True)
    _trainer(tmp_path, [cb], CSVLogger(str(tmp_path)), max_epochs=1).fit(
        lit, DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    rows = torch.nonzero(_permutation_ranks(len(val), 5) < 40).squeeze(1)  # in dataset order
    expected = permutation_importance(lit, val.features[rows], val.labels[rows], n_repeats=2, seed=5)
    assert cb.last_rows == 40
    np.testing.assert_allclose(cb.last_result.importances, expected.importances)


def test_validate_in_inference_mode_changes_nothing(tmp_path, tables):
    train, val = tables
    lit = _module(train.num_features)
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    cb = PermutationImportanceMonitor(n_repeats=2, strict=True)
    trainer = _trainer(tmp_path, [cb], CSVLogger(str(tmp_path)), inference_mode=True)
    trainer.validate(lit, DataLoader(val, batch_size=32))
    assert cb.last_rows == len(val) and cb.last_result.importances.shape == (31, 2)
    assert all(torch.equal(before[k], v) for k, v in lit.state_dict().items())
    assert all(p.grad is None for p in lit.parameters())


def test_configuration_errors_are_raised_at_setup(tmp_path, tables):
    train, val = tables
    with pytest.raises(ValueError, match="feature_names holds 2 names for 31 features"):
        _trainer(tmp_path, [PermutationImportanceMonitor(feature_names=["a", "b"])], False).fit(
            _module(31), DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    text = SpuriousText("val", size=16)
    with pytest.raises(TypeError, match=r"no floating-point tensor to permute.*features=\['input_ids'\]"):
        _trainer(tmp_path, [PermutationImportanceMonitor()], False).validate(
            LitClassifier(TinyTextTransformer(len(text.vocabulary), 2), num_classes=2), DataLoader(text, batch_size=8))


def test_token_ids_of_a_text_batch_are_shuffled_per_position_when_selected(tmp_path):
    seed_everything(0)
    text = SpuriousText("val", size=24, seed=0)
    lit = LitClassifier(TinyTextTransformer(len(text.vocabulary), 2, dim=16), num_classes=2)
    cb = PermutationImportanceMonitor(features=["input_ids"], n_repeats=2, top_k=3, max_overhead=None, strict=True)
    csv = CSVLogger(str(tmp_path), name="csv")
    _trainer(tmp_path, [cb], csv, inference_mode=True).validate(lit, DataLoader(text, batch_size=8))
    inputs = {"input_ids": text.input_ids, "attention_mask": text.attention_mask}
    expected = permutation_importance(lit, inputs, text.labels, n_repeats=2, seed=0, features=["input_ids"])
    assert cb.last_rows == len(text)
    assert cb.last_result.feature_names == tuple(f"input_ids/{t}" for t in range(text.input_ids.shape[1]))
    (file,) = glob.glob(os.path.join(csv.log_dir, "lens", "importance", "permutation", "*.json"))
    logged = json.loads(Path(file).read_text())
    np.testing.assert_allclose([f["importances"] for f in logged["features"]], expected.importances)
    assert [f["name"] for f in logged["features"]] == list(expected.feature_names)


class TwoTables(torch.utils.data.Dataset):
    """Dict samples with two float inputs ``a`` (3 columns) and ``b`` (2 columns); the label is ``a[0] > b[1]``."""

    def __init__(self, n: int = 40) -> None:
        gen = torch.Generator().manual_seed(1)
        self.a, self.b = torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)
        self.y = (self.a[:, 0] > self.b[:, 1]).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"a": self.a[i], "b": self.b[i], "label": self.y[i], "index": i}


class TwoTableNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


def test_several_inputs_of_a_dict_batch_are_passed_through(tmp_path):
    seed_everything(0)
    data = TwoTables()
    lit = LitClassifier(TwoTableNet(), num_classes=2, input_key=lambda batch: {"a": batch["a"], "b": batch["b"]})
    cb = PermutationImportanceMonitor(input_key=("a", "b"), n_repeats=2, max_overhead=None, strict=True)
    _trainer(tmp_path, [cb], False, max_epochs=1).fit(lit, DataLoader(data, batch_size=8),
                                                      DataLoader(data, batch_size=16))
    expected = permutation_importance(lit, {"a": data.a, "b": data.b}, data.y, n_repeats=2, seed=0)
    assert cb.last_result.feature_names == ("a/0", "a/1", "a/2", "b/0", "b/1")
    np.testing.assert_allclose(cb.last_result.importances, expected.importances)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"metric": "f1"}, ValueError, "metric must be one of"),
    ({"metric": 3}, TypeError, "metric must be a str or a callable"),
    ({"n_repeats": 0}, ValueError, "n_repeats must be >= 1"),
    ({"feature_names": "leak"}, TypeError, "feature_names must be a list of strings"),
    ({"feature_mask": torch.zeros(3)}, TypeError, "feature_mask must hold integer group ids"),
    ({"feature_mask": {"a": torch.zeros(3)}}, TypeError, "feature_mask must hold integer group ids"),
    ({"features": "input_ids"}, TypeError, "features must be a list"),
    ({"log_prefix": "///"}, ValueError, "log_prefix"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PermutationImportanceMonitor(**kwargs)


def _ddp_model(task: str, state: dict) -> LitClassifier:
    """The model rank zero ended with, rebuilt from its state."""
    net = TabularMLP(31, 2) if task == "tabular" else TinyTextTransformer(len(SpuriousText("val", size=1).vocabulary),
                                                                          2, dim=16)
    lit = LitClassifier(net, num_classes=2)
    lit.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return lit.eval()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tabular", "text"])
def test_two_ddp_processes_give_what_one_process_gives(tmp_path, task):
    reference = _ddp.load_script(SCRIPT).run(1, str(tmp_path / "one"), task)
    ranks = _ddp.run(SCRIPT, tmp_path / "two", "--task", task, devices=2)
    assert [r["rank"] for r in ranks] == [0, 1]
    zero = ranks[0]
    assert zero["probe_indices"] == ranks[1]["probe_indices"] == reference["probe_indices"]
    # 1 and 2 processes train the same model up to the order of the gradient sums (Adam amplifies that rounding
    # for the transformer's near-zero gradients), so their outputs agree to that precision ...
    close = {"rtol": 1e-4, "atol": 1e-5} if task == "tabular" else {"rtol": 1e-2, "atol": 2e-3}
    for name, value in reference["state"].items():
        np.testing.assert_allclose(zero["state"][name], value, **close)
    for name, maps in reference["maps"].items():
        np.testing.assert_allclose(zero["maps"][name], maps, **close)
    # ... and exactly what the pure functions give for rank zero's model on the same probes and rows
    lit = _ddp_model(task, zero["state"])
    if task == "text":
        val = SpuriousText("val", seed=0, size=40)
        rows = torch.tensor(zero["probe_indices"])
        inputs = {"input_ids": val.input_ids[rows], "attention_mask": val.attention_mask[rows]}
        expected = reduce_tokens(GradientXInput(lit, layer="model.token_embedding").attribute(
            inputs, target=val.labels[rows]))
        np.testing.assert_allclose(zero["maps"]["gradient_x_input"], expected.numpy(), rtol=1e-5, atol=1e-7)
        return
    assert zero["rows"] == reference["rows"] == 64
    assert zero["tracked"] == reference["tracked"]
    np.testing.assert_allclose(zero["importance"], reference["importance"], **close)
    assert ranks[1]["importance"] is None  # only rank zero computes
    val = LeakyTabular("val", seed=0, eval_leak_mode="consistent")
    rows = torch.nonzero(_permutation_ranks(len(val), 0) < 64).squeeze(1)
    expected = permutation_importance(lit, val.features[rows], val.labels[rows], metric="neg_log_loss", n_repeats=3,
                                      seed=0)
    np.testing.assert_allclose(zero["importance"], expected.importances, rtol=1e-5, atol=1e-7)
