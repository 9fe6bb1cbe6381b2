"""PrivacyAuditCallback: what it logs (read back, equal to the pure engine and to scikit-learn), the leak warning,
non-perturbation, trainer.validate(), configuration errors, and 2-process DDP equal to 1 process."""

from __future__ import annotations

from pathlib import Path

import _ddp
from _data import FlippedDigits
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from lightning_lens._pl import Trainer
from lightning_lens.callbacks import PrivacyAuditCallback
from lightning_lens.privacy import membership_statistics

DDP_SCRIPT = Path(__file__).with_name("privacy_audit_ddp_script.py")
script = _ddp.load_script(DDP_SCRIPT)
make_module = script.make_module


@pytest.fixture(scope="module")
def digits():
    return {"train": FlippedDigits(40, 0.0), "val": FlippedDigits(60, 0.0, "val")}


def fit(callbacks, digits, tmp_path, max_epochs=2, module=None, shuffle=False, generator=True, **trainer_kwargs):
    kwargs = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  default_root_dir=str(tmp_path), callbacks=callbacks)
    kwargs.update(trainer_kwargs)
    trainer = Trainer(**kwargs)
    module = module if module is not None else make_module()
    gen = torch.Generator().manual_seed(0) if generator else None
    trainer.fit(module, DataLoader(digits["train"], batch_size=10, shuffle=shuffle, generator=gen),
                DataLoader(digits["val"], batch_size=20))
    return trainer, module


def test_end_to_end_logs_read_back_equal_the_engine_and_warn_on_a_leak(digits, tmp_path, read_tensorboard):
    callback = PrivacyAuditCallback(num_samples=30, warn_auc=0.55, batch_size=7, max_overhead=None, strict=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    with pytest.warns(UserWarning, match="threshold attack on loss .* leak membership"):
        trainer, module = fit([callback], digits, tmp_path, max_epochs=12, logger=logger)
    assert [h["epoch"] for h in callback.history] == list(range(12))
    stats = callback.last_statistics
    members, non_members = stats["members"]["positions"], stats["non_members"]["positions"]
    assert len(members) == len(non_members) == 30 and torch.equal(members, members.sort().values)
    # the statistics are the engine's on those dataset positions, with the final weights
    for group, data, positions in (("members", digits["train"], members), ("non_members", digits["val"], non_members)):
        expected = membership_statistics(module, data.images[positions], data.labels[positions])
        for name, values in expected.items():
            assert torch.allclose(stats[group][name], values, rtol=1e-5, atol=1e-9), (group, name)
    labels = [1] * 30 + [0] * 30
    for name, attack in callback.last_attacks.items():
        values = torch.cat([stats["members"][name], stats["non_members"][name]])
        assert attack.auc == pytest.approx(roc_auc_score(labels, (-values).numpy()), abs=1e-12)
    assert callback.last_attacks["loss"].auc > 0.55  # 40 training digits, 12 epochs: the loss leaks
    ea = read_tensorboard(logger.log_dir)
    for name in ("loss", "gradient_norm", "gradient_variance"):
        curve = ea.Scalars(f"privacy/{name}/auc")
        assert len(curve) == 12
        assert [e.value for e in curve] == pytest.approx([h[name] for h in callback.history], abs=1e-6)
        assert ea.Scalars(f"privacy/{name}/tpr_at_fpr")[-1].value == pytest.approx(
            callback.last_attacks[name].tpr_at_fpr, abs=1e-6)
    assert any("privacy/attacks" in tag for tag in ea.Tags()["tensors"])


def test_training_is_not_perturbed(digits, tmp_path):
    """Bit-identical weights and global RNG with and without the callback: dropout and the unseeded shuffling draw
    from the global RNG, so any draw would show."""

    def run(callbacks):
        torch.manual_seed(0)
        module = make_module(dropout=0.3)
        trainer, module = fit(callbacks, digits, tmp_path, max_epochs=3, module=module, shuffle=True, generator=False)
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state(), module

    plain, plain_rng, _ = run([])
    callback = PrivacyAuditCallback(num_samples=16, statistics=["loss", "gradient_variance"],
                                    method=("smoothgrad", {"n_samples": 3}), max_overhead=None, strict=True)
    watched, watched_rng, module = run([callback])
    assert len(callback.history) == 3
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(plain_rng, watched_rng)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_validate_audits_with_given_training_data(digits, tmp_path):
    callback = PrivacyAuditCallback(num_samples=10, train_dataset=digits["train"], strict=True)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.validate(make_module(), DataLoader(digits["val"], batch_size=20), verbose=False)
    assert len(callback.history) == 1 and set(callback.last_attacks) == {"loss", "gradient_norm", "gradient_variance"}


def test_score_reaches_the_statistics(digits, tmp_path):
    callback = PrivacyAuditCallback(num_samples=10, train_dataset=digits["train"], score="logit", strict=True)
    assert PrivacyAuditCallback().score == "probability"
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    module = make_module()
    trainer.validate(module, DataLoader(digits["val"], batch_size=20), verbose=False)
    positions = callback.last_statistics["members"]["positions"]
    x, y = digits["train"].images[positions], digits["train"].labels[positions]
    logit = membership_statistics(module, x, y, score="logit")
    probability = membership_statistics(module, x, y)
    got = callback.last_statistics["members"]["gradient_variance"]
    assert torch.allclose(got, logit["gradient_variance"], rtol=1e-5, atol=1e-12)
    assert not torch.allclose(got, probability["gradient_variance"], rtol=1e-2)


def test_validate_without_training_data_warns_and_does_nothing(digits, tmp_path):
    callback = PrivacyAuditCallback(num_samples=10, strict=True)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    with pytest.warns(UserWarning, match="pass train_dataset="):
        trainer.validate(make_module(), DataLoader(digits["val"], batch_size=20), verbose=False)
    assert callback.history == []


def test_configuration_errors_stop_the_fit_before_training(digits, tmp_path):
    callback = PrivacyAuditCallback(target_key="no_such_key")
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="PrivacyAuditCallback cannot compute"):
        fit([callback], digits, tmp_path, module=module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"statistics": "loss"}, TypeError, "statistics"),
        ({"statistics": ["entropy"]}, ValueError, "statistics"),
        ({"method": "no_such_method"}, ValueError, "unknown attribution method"),
        ({"warn_auc": 1.5}, ValueError, "warn_auc"),
        ({"score": "softmax"}, ValueError, "score must be one of"),
        ({"score": None}, TypeError, "score"),
        ({"num_samples": 1}, ValueError, "num_samples"),
        ({"train_dataset": 3}, TypeError, "train_dataset"),
        ({"log_prefix": "//"}, ValueError, "log_prefix"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        PrivacyAuditCallback(**kwargs)


def test_ddp_two_processes_audit_the_same_as_one(tmp_path):
    one = script.run_fit(devices=1, root=str(tmp_path / "one"))
    ranks = _ddp.run(DDP_SCRIPT, tmp_path / "two")
    two = ranks[0]
    assert ranks[1]["history"] is None  # rank one computed its share and handed it over
    assert [h["epoch"] for h in two["history"]] == [h["epoch"] for h in one["history"]] == [0, 1]
    for group in ("members", "non_members"):
        assert two["statistics"][group]["positions"] == one["statistics"][group]["positions"]
        assert len(set(two["statistics"][group]["positions"])) == script.NUM_AUDITED
        for name in ("loss", "gradient_norm", "gradient_variance"):
            assert torch.allclose(torch.tensor(two["statistics"][group][name]),
                                  torch.tensor(one["statistics"][group][name]), rtol=1e-4, atol=1e-9), (group, name)
    for h1, h2 in zip(one["history"], two["history"]):
        for name in ("loss", "gradient_norm", "gradient_variance"):
            assert h2[name] == pytest.approx(h1[name], abs=1e-9), name
