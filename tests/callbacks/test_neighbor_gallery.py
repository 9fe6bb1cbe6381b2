"""NeighborGallery inside a real Trainer: what it logs (read back from TensorBoard), that it equals the pure evaluation,
that it leaves the model's state alone, rank-safe ids, configuration errors before the first step, failure
isolation, and 2 DDP processes against 1."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import _ddp
import pytest
import torch
from _knn import IndexedDigits, LitKNN
from pytorch_lightning import seed_everything
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import KNNMemoryRefresh, NeighborGallery
from lightning_lens.interpretable_models.knn_evaluation import evaluate_knn, knn_linear_probe
from lightning_lens.utils import ProbeSet


@pytest.fixture
def knn_data(knn_digits):
    train = IndexedDigits(knn_digits.x[knn_digits.train], knn_digits.y[knn_digits.train])
    val = IndexedDigits(knn_digits.x[knn_digits.test], knn_digits.y[knn_digits.test])
    return train, val


def quiet_trainer(tmp_path, callbacks, logger=False, **kwargs):
    return Trainer(max_epochs=kwargs.pop("max_epochs", 2), accelerator="cpu", devices=1, logger=logger,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   callbacks=callbacks, default_root_dir=tmp_path, **kwargs)


def train_loader(train):
    return DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def filled_model(train):
    """An untrained encoder whose memory holds the whole training set (a kNN on random features: ~0.9 on digits)."""
    model = LitKNN(len(train)).eval()
    with torch.no_grad():
        model.net.head.write(model.net.encoder(train.x.view(-1, 1, 8, 8)), train.y, torch.arange(len(train)))
    return model


def test_gallery_and_metrics_end_to_end(tmp_path, knn_data, read_tensorboard):
    seed_everything(0)
    train, val = knn_data
    model = LitKNN(len(train))
    gallery = NeighborGallery(num_probes=4, k=3, max_overhead=None)
    logger = TensorBoardLogger(tmp_path, name="knn")
    trainer = quiet_trainer(tmp_path, [KNNMemoryRefresh(), gallery], logger=logger)  # default sanity pass
    trainer.fit(model, train_loader(train), DataLoader(val, batch_size=128))
    ea = read_tensorboard(logger.log_dir)
    assert [e.step for e in ea.Images("knn/gallery")] == [e.step for e in ea.Scalars("knn/accuracy")]
    assert len(ea.Images("knn/gallery")) == 2
    for tag in ("knn/linear_probe_accuracy", "knn/neighbor_label_agreement", "knn/mean_credibility",
                "knn/memory/filled_fraction", "knn/probe_mean_credibility"):
        assert tag in ea.Tags()["scalars"], tag
    assert ea.Scalars("knn/accuracy")[-1].value > 0.8
    assert ea.Scalars("knn/memory/filled_fraction")[-1].value == 1.0
    assert ea.Scalars("knn/eval_samples")[-1].value == len(val)
    assert gallery.last_neighbors.indices.shape == (4, 3)
    # the gallery's probes are fixed: another validation run shows the same ones
    first = gallery.probes.indices.clone()
    trainer.validate(model, DataLoader(val, batch_size=128), verbose=False)
    assert torch.equal(gallery.probes.indices, first)


def test_callback_leaves_the_model_state_bit_identical(tmp_path, knn_data):
    # regression: the gallery calibrated the head in place, writing its calibration_scores buffer into the checkpoint
    train, val = knn_data

    def fit(callbacks):
        seed_everything(0)
        model = LitKNN(len(train))
        quiet_trainer(tmp_path, callbacks).fit(model, train_loader(train), DataLoader(val, batch_size=128))
        return model

    gallery = NeighborGallery(num_probes=2, max_overhead=None)
    with_gallery, without = fit([KNNMemoryRefresh(), gallery]), fit([KNNMemoryRefresh()])
    a, b = with_gallery.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert with_gallery.net.head.calibration_scores.numel() == 0
    assert gallery.calibration_scores is not None and gallery.calibration_scores.numel() == len(val) // 2


def test_metrics_equal_the_pure_evaluation_on_the_first_rows(tmp_path, knn_data):
    train, val = knn_data
    model = filled_model(train)
    gallery = NeighborGallery(num_probes=2, max_eval_samples=100, train_dataset=train)
    # no index key: rows are identified by their position in the validation set
    tuples = IndexedDigits(val.x, val.y, with_index=False)
    quiet_trainer(tmp_path, [gallery]).validate(model, DataLoader(tuples, batch_size=32), verbose=False)
    with torch.no_grad():
        emb = model.net.encoder(val.x[:100].view(-1, 1, 8, 8))
    expected = evaluate_knn(model.net.head, emb, val.y[:100])
    expected.metrics["linear_probe_accuracy"] = knn_linear_probe(
        model.net.head, emb[expected.test_rows], val.y[:100][expected.test_rows])
    got = {k: v for k, v in gallery.last_metrics.items() if k != "probe_mean_credibility"}
    assert got.keys() == expected.metrics.keys()
    for k, v in expected.metrics.items():
        assert got[k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    assert got["eval_samples"] == 100


def test_nonfinite_embeddings_are_left_out_and_counted(tmp_path, knn_data):
    train, val = knn_data
    model = filled_model(train)

    def embed(m, x):
        emb = m.net.encoder(x)
        return torch.where((x.flatten(1).sum(1) > 22)[:, None], torch.full_like(emb, float("nan")), emb)

    bad = int((val.x.sum(1) > 22).sum())
    assert 0 < bad < len(val)
    gallery = NeighborGallery(num_probes=2, train_dataset=train, embed=embed, linear_probe=False)
    with pytest.warns(UserWarning, match=f"{bad} validation embeddings held NaN or inf"):
        quiet_trainer(tmp_path, [gallery]).validate(model, DataLoader(val, batch_size=64), verbose=False)
    assert gallery.excluded_nonfinite == bad
    assert gallery.last_metrics["eval_samples"] == len(val) - bad
    assert all(math.isfinite(v) for k, v in gallery.last_metrics.items() if not k.startswith("memory/"))


def _fit_expecting(tmp_path, knn_data, gallery, match, val=None, model=None):
    train, default_val = knn_data
    model = model or LitKNN(len(train))
    with pytest.raises(ValueError, match=match):
        quiet_trainer(tmp_path, [KNNMemoryRefresh(), gallery]).fit(
            model, train_loader(train), DataLoader(val or default_val, batch_size=64))
    assert model.trained_steps == 0


def test_configuration_errors_stop_the_fit_before_the_first_training_step(tmp_path, knn_data):
    _fit_expecting(tmp_path, knn_data, NeighborGallery(denormalize=lambda x: x.view(-1)[:5]),
                   "cannot show a validation input")
    _fit_expecting(tmp_path, knn_data, NeighborGallery(embed=lambda m, x: x.flatten(1)),
                   r"embed must return \(batch, embedding_dim=32\)")
    _fit_expecting(tmp_path, knn_data, NeighborGallery(index_key="sample"), "index_key='sample'")
    _fit_expecting(tmp_path, knn_data, NeighborGallery(target_key=lambda b: None), "needs labels .* set target_key")
    train, val = knn_data
    with pytest.raises(ValueError, match=r"pass NeighborGallery\(train_dataset=...\)"):
        quiet_trainer(tmp_path, [NeighborGallery()]).validate(filled_model(train), DataLoader(val, batch_size=64))


def test_argument_errors():
    with pytest.raises(TypeError, match="k must be an int"):
        NeighborGallery(k=2.0)
    with pytest.raises(ValueError, match="max_eval_samples must be >= 2"):
        NeighborGallery(max_eval_samples=1)
    with pytest.raises(TypeError, match="linear_probe must be a bool"):
        NeighborGallery(linear_probe="yes")
    with pytest.raises(TypeError, match="denormalize must be a callable"):
        NeighborGallery(denormalize="imagenet")
    with pytest.raises(TypeError, match="train_dataset must be indexable"):
        NeighborGallery(train_dataset=42)
    with pytest.raises(ValueError, match="log_prefix must contain"):
        NeighborGallery(log_prefix="../..")
    with pytest.raises(ValueError, match="max_overhead"):
        NeighborGallery(max_overhead=0)


def test_a_failing_gallery_is_reported_and_the_rest_still_logs(tmp_path, knn_data):
    train, val = knn_data
    seen = []

    def denormalize(x):  # works for the dry run, fails in the gallery
        seen.append(1)
        if len(seen) > 2:
            raise RuntimeError("colour map missing")
        return x

    gallery = NeighborGallery(num_probes=2, denormalize=denormalize, max_overhead=None, max_failures=2)
    model = LitKNN(len(train))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [KNNMemoryRefresh(), gallery], max_epochs=3).fit(
            model, train_loader(train), DataLoader(val, batch_size=128))
    reports = [str(w.message) for w in caught if "colour map missing" in str(w.message)]
    assert len(reports) == 2 and reports[0].startswith("NeighborGallery: 'gallery' failed at epoch 0 with RuntimeError")
    assert "switched off after 2 failures" in reports[1]
    assert model.trained_steps == 60
    assert gallery.disabled == {"gallery"}  # switched off after 2 failures; the metrics went on
    assert gallery.last_metrics["accuracy"] > 0.8 and gallery.last_neighbors is None
    seen.clear()
    strict = NeighborGallery(num_probes=2, denormalize=denormalize, strict=True)
    with pytest.raises(RuntimeError, match="colour map missing"):
        quiet_trainer(tmp_path, [KNNMemoryRefresh(), strict], max_epochs=1).fit(
            LitKNN(len(train)), train_loader(train), DataLoader(val, batch_size=128))


def test_state_key_and_state_round_trip(knn_data):
    assert NeighborGallery(log_prefix="a").state_key != NeighborGallery(log_prefix="b").state_key
    assert NeighborGallery(log_prefix="../knn").log_prefix == "knn"
    train, val = knn_data
    probes = ProbeSet(inputs=val.x[:3].view(-1, 1, 8, 8), targets=val.y[:3], indices=torch.arange(3))
    state = NeighborGallery(probes=probes).state_dict()
    restored = NeighborGallery()
    restored.load_state_dict(state)
    assert torch.equal(restored.probes.inputs, probes.inputs) and state["version"] == 2


@pytest.mark.slow
def test_ddp_two_processes_evaluate_the_same_rows_as_one(tmp_path):
    # regression: without an index key, ids were batch_idx * batch_size on every rank: they collided across ranks
    # and de-duplication silently dropped half of the rows
    script_path = Path(__file__).with_name("neighbor_gallery_ddp_script.py")
    script = _ddp.load_script(script_path)
    one = script.run_validate(devices=1, root=str(tmp_path / "one"))
    ranks = _ddp.run(script_path, tmp_path / "two")
    assert one["metrics"]["eval_samples"] == script.NUM_VAL  # every row, the repeated one once
    assert ranks[0]["neighbors"] == one["neighbors"]  # the same gallery rows
    assert ranks[0]["metrics"].keys() == one["metrics"].keys()
    for key, value in one["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, abs=1e-5), key
    assert ranks[1]["metrics"] == {}  # only rank zero evaluates and logs
