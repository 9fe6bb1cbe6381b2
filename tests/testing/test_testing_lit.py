"""LitClassifier: dict and tuple batches, logged metrics, returned logits, learning on SpuriousDigits, CLI config."""

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_lens._pl import Trainer
from lightning_lens.datasets import SpuriousDigits
from lightning_lens.testing import LitClassifier, SmallCNN


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def test_learns_spurious_digits_above_chance(tmp_path):
    torch.manual_seed(0)
    train = SpuriousDigits("train", seed=0)
    val = SpuriousDigits("val", seed=0, eval_shortcut_mode="absent")
    lit = LitClassifier(model=SmallCNN(width=4), lr=3e-3)
    val_loader = DataLoader(Subset(val, range(192)), batch_size=96)
    trainer = _trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), num_sanity_val_steps=0, log_every_n_steps=4)
    before = trainer.validate(lit, val_loader, verbose=False)[0]
    trainer.fit(lit, DataLoader(train, batch_size=64, shuffle=True), val_loader)
    after = trainer.callback_metrics
    assert before["val/acc"] < 0.3
    assert after["val/acc"] > 0.5, after  # chance is 0.1; digits alone (no square in val) must carry it
    assert after["val/loss"] < before["val/loss"]
    assert "train/loss_step" in after and "train/loss_epoch" in after
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {"val/acc", "val/loss", "train/loss_step", "train/loss_epoch"} <= set(logged.split(","))


def test_validation_and_test_step_return_loss_and_logits():
    lit = LitClassifier(num_classes=10)
    batch = next(iter(DataLoader(SpuriousDigits("val", seed=1), batch_size=5)))
    lit.log = lambda *args, **kwargs: None  # outside a Trainer: only the return value matters here
    for step in (lit.validation_step, lit.test_step):
        out = step(batch, 0)
        assert set(out) == {"loss", "logits"}
        assert out["logits"].shape == (5, 10)
        assert torch.allclose(out["logits"], lit(batch["image"]))
        assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(out["logits"], batch["label"]))


def test_tuple_batches_and_custom_keys(tmp_path):
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    lit = LitClassifier()
    metrics = _trainer(tmp_path).validate(lit, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)[0]
    assert set(metrics) == {"val/loss", "val/acc"}
    dict_batch = {"pixels": x, "cls": y}
    custom = LitClassifier(input_key="pixels", target_key="cls")
    custom.log = lambda *args, **kwargs: None
    assert custom.validation_step(dict_batch, 0)["logits"].shape == (8, 10)
    assert torch.equal(custom.predict_step(dict_batch, 0), custom(x))


def test_clear_errors():
    with pytest.raises(ValueError, match="optimizer"):
        LitClassifier(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        LitClassifier(lr=0)
    with pytest.raises(TypeError, match="model"):
        LitClassifier(model="SmallCNN")
    lit = LitClassifier(model=SmallCNN(num_classes=4), num_classes=10)
    lit.log = lambda *args, **kwargs: None
    with pytest.raises(ValueError, match="num_classes"):
        lit.training_step((torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)), 0)
    with pytest.raises(ValueError, match="target_key"):
        LitClassifier().training_step({"image": torch.zeros(2, 1, 32, 32)}, 0)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers(name):
    opt = LitClassifier(optimizer=name, lr=0.05, weight_decay=0.01).configure_optimizers()
    assert type(opt).__name__.lower() == name
    assert opt.defaults["lr"] == 0.05 and opt.defaults["weight_decay"] == 0.01


def test_configurable_from_lightning_cli(monkeypatch):
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli"])  # only the args below

    cli = LightningCLI(
        LitClassifier,
        run=False,
        seed_everything_default=False,
        save_config_callback=None,
        args=[
            "--model.lr=0.01",
            "--model.optimizer=sgd",
            "--model.model=lightning_lens.testing.SmallCNN",
            "--model.model.init_args.width=8",
            "--model.model.init_args.num_classes=4",
            "--model.num_classes=4",
            "--trainer.logger=false",
        ],
    )
    assert cli.model.lr == 0.01 and cli.model.optimizer_name == "sgd"
    assert cli.model.model.features[0].out_channels == 8
    assert cli.model(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
