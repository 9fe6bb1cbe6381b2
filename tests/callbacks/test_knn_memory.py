"""KNNMemoryRefresh inside a real Trainer: a default Trainer (with its sanity pass) works, the memory equals the
encoder's embeddings, configuration errors stop the fit before the first training step, failures do not."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _knn import IndexedDigits, LitKNN
from torch.utils.data import DataLoader

from pytorch_lightning import seed_everything

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import KNNMemoryRefresh
from lightning_lens.interpretable_models import KNNHead


@pytest.fixture
def knn_data(knn_digits):
    train = IndexedDigits(knn_digits.x[knn_digits.train], knn_digits.y[knn_digits.train])
    val = IndexedDigits(knn_digits.x[knn_digits.test], knn_digits.y[knn_digits.test])
    return train, val


def default_trainer(tmp_path, callbacks, **kwargs):
    """A Trainer at Lightning's defaults (num_sanity_val_steps=2 included), only quiet and short."""
    return Trainer(max_epochs=kwargs.pop("max_epochs", 2), accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   callbacks=callbacks, default_root_dir=tmp_path, **kwargs)


def loaders(train, val, batch_size=64):
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=128))


@pytest.mark.parametrize("refresh", ["reencode", "in_place"])
def test_default_trainer_sanity_pass_sees_a_filled_memory(tmp_path, knn_data, refresh):
    # regression: the sanity pass ran before the first refresh and crashed with "the kNN memory is empty"
    seed_everything(0)
    train, val = knn_data
    model = LitKNN(len(train), refresh=refresh)
    cb = KNNMemoryRefresh()
    default_trainer(tmp_path, [cb]).fit(model, *loaders(train, val))
    assert model.sanity_memory_filled == [1.0, 1.0]  # both sanity batches voted against the full training set
    assert model.trained_steps == 2 * 20 and cb.refreshed_at_epoch == 1
    assert bool(model.net.head.filled.all())


def test_in_place_head_trains_from_an_empty_memory_with_a_default_trainer(tmp_path, knn_data):
    # regression: KNNHead(refresh="in_place"), the default, could not take its first training step
    seed_everything(0)
    train, val = knn_data
    model = LitKNN(len(train), refresh="in_place")
    before = [p.detach().clone() for p in model.net.encoder.parameters()]
    with pytest.warns(UserWarning, match="memory is empty, so KNNHead predicts uniform"):
        default_trainer(tmp_path, [], max_epochs=1).fit(model, *loaders(train, val))
    assert model.sanity_memory_filled == [0.0, 0.0]
    # the first batch voted among itself (leave-one-out): a real vote (not the uniform log 10) with a gradient
    assert torch.isfinite(model.first_loss) and abs(float(model.first_loss) - 2.302585) > 0.05
    assert all(not torch.equal(b, p) for b, p in zip(before, model.net.encoder.parameters()))
    assert bool(model.net.head.filled.all())


def test_refresh_writes_the_encoders_embeddings_and_leaves_the_global_rng_alone(tmp_path, knn_data):
    train, _ = knn_data
    model = LitKNN(len(train))
    cb = KNNMemoryRefresh(dataloader=DataLoader(train, batch_size=100))
    state = torch.get_rng_state()
    assert cb.refresh(Trainer(logger=False), model) == len(train)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        expected = F.normalize(model.net.encoder(train.x.view(-1, 1, 8, 8)), dim=1)
    assert torch.allclose(model.net.head.memory_keys, expected, atol=1e-6)
    assert torch.equal(model.net.head.memory_labels, train.y)
    assert model.training  # modes restored


def test_refresh_every_n_epochs(tmp_path, knn_data):
    train, val = knn_data

    class Counting(KNNMemoryRefresh):
        calls: list = []

        def refresh(self, trainer, pl_module):
            self.calls.append(trainer.current_epoch)
            return super().refresh(trainer, pl_module)

    cb = Counting(every_n_epochs=2)
    default_trainer(tmp_path, [cb], max_epochs=5, num_sanity_val_steps=0, limit_train_batches=2,
                    limit_val_batches=1).fit(LitKNN(len(train)), *loaders(train, val))
    assert cb.calls == [0, 2, 4]  # at fit start (epoch 0), then every 2 epochs


def test_resume_keeps_the_checkpointed_memory(tmp_path, knn_data):
    # a resumed fit must not re-encode at fit start: the straight run votes with the memory of epoch 0 until epoch 3
    train, val = knn_data

    def fit(max_epochs, ckpt_path=None, checkpoint=False):
        seed_everything(0)
        model = LitKNN(len(train))
        callbacks = [KNNMemoryRefresh(every_n_epochs=3)]
        if checkpoint:
            from pytorch_lightning.callbacks import ModelCheckpoint

            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer = Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=checkpoint, callbacks=callbacks, default_root_dir=tmp_path,
                          limit_train_batches=5, limit_val_batches=1)
        loader = DataLoader(train, batch_size=64)  # unshuffled: the data order does not depend on resuming
        trainer.fit(model, loader, DataLoader(val, batch_size=128), ckpt_path=ckpt_path)
        return model

    straight = fit(3)
    fit(2, checkpoint=True)
    resumed = fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _fit_expecting(tmp_path, model, cb, train, val, match, error=ValueError):
    with pytest.raises(error, match=match):
        default_trainer(tmp_path, [cb]).fit(model, *loaders(train, val))
    assert model.trained_steps == 0


def test_configuration_errors_stop_the_fit_before_the_first_training_step(tmp_path, knn_data):
    train, val = knn_data
    n = len(train)
    _fit_expecting(tmp_path, LitKNN(n), KNNMemoryRefresh(embed=lambda m, x: m.net.encoder(x)[:, :7]), train, val,
                   r"embed must return \(batch, embedding_dim=32\)")
    _fit_expecting(tmp_path, LitKNN(n), KNNMemoryRefresh(index_key="idx"), train, val, "index_key='idx'")
    unindexed = IndexedDigits(train.x, train.y, with_index=False)
    model = LitKNN(n)
    _fit_expecting(tmp_path, model, KNNMemoryRefresh(), unindexed, val, "dataset indices .* set index_key")
    _fit_expecting(tmp_path, LitKNN(n - 1), KNNMemoryRefresh(), train, val, f"set memory_size={n}")
    queue = LitKNN(n)
    queue.net.head = KNNHead(32, 10, memory_size=64, refresh="queue")
    _fit_expecting(tmp_path, queue, KNNMemoryRefresh(), train, val, "refresh='queue'")
    headless = LitKNN(n)
    headless.net.head = torch.nn.Identity()
    _fit_expecting(tmp_path, headless, KNNMemoryRefresh(), train, val, "exactly one KNNHead")


def test_argument_errors():
    with pytest.raises(TypeError, match="every_n_epochs must be an int"):
        KNNMemoryRefresh(every_n_epochs=1.5)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0"):
        KNNMemoryRefresh(every_n_epochs=-1)
    with pytest.raises(TypeError, match="dataloader must be a DataLoader"):
        KNNMemoryRefresh(dataloader=[1, 2])
    with pytest.raises(TypeError, match="embed must be a callable"):
        KNNMemoryRefresh(embed="encoder")
    with pytest.raises(TypeError, match="index_key must be"):
        KNNMemoryRefresh(index_key=1.0)


def test_a_failing_refresh_is_reported_and_training_continues(tmp_path, knn_data):
    train, val = knn_data
    model = LitKNN(len(train))
    calls = []

    def embed(m, x):  # fails from the second refresh (epoch 1) on
        if x.shape[0] > 2:
            calls.append(1)
            if len(calls) > len(train) // 64 + 1:
                raise RuntimeError("encoder out of memory")
        return m.net.encoder(x)

    cb = KNNMemoryRefresh(embed=embed)
    with pytest.warns(RuntimeWarning, match="KNNMemoryRefresh: 'refresh' failed at epoch 1 with RuntimeError"):
        default_trainer(tmp_path, [cb], max_epochs=2).fit(model, *loaders(train, val))
    assert model.trained_steps == 40 and cb.refreshed_at_epoch == 0  # the stale memory from fit start stayed in use
    with pytest.raises(RuntimeError, match="encoder out of memory"):
        calls.clear()
        default_trainer(tmp_path, [KNNMemoryRefresh(embed=embed, strict=True)]).fit(LitKNN(len(train)),
                                                                                     *loaders(train, val))


def test_state_key_budget_default_and_state_round_trip():
    cb = KNNMemoryRefresh()
    assert cb.budget.max_overhead is None  # the refresh is training, not monitoring
    assert cb.state_key == "KNNMemoryRefresh{}"
    cb.refreshed_at_epoch = 3
    other = KNNMemoryRefresh()
    other.load_state_dict(cb.state_dict())
    assert other.refreshed_at_epoch == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KNNMemoryRefresh(max_overhead=0.05)
