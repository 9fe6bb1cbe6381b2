"""RoutingMonitor end to end: what it logs to TensorBoard, that it leaves training alone, ablation, collapse, errors."""

import logging
import warnings
from pathlib import Path

import _ddp
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_lens._pl import Callback, Trainer, pl
from lightning_lens.callbacks import RoutingMonitor
from lightning_lens.callbacks._gather import dedupe_by_id
from lightning_lens.interpretable_models import MixtureOfExperts
from lightning_lens.interpretable_models.moe import routing_row_keys
from lightning_lens.testing import LitClassifier


LitMoE = LitClassifier  # adds the MoE auxiliary losses to its training loss by itself


def _model(seed: int = 0, prenorm: bool = True, **moe_kwargs) -> LitClassifier:
    """LayerNorm (pre-norm, as in transformers: raw pixels are all >= 0, which biases a fresh router towards one
    expert), then the MoE layer ``model.1``, ReLU, a linear head (``prenorm=False``: Identity instead of LayerNorm)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.LayerNorm(64) if prenorm else nn.Identity(),
                        MixtureOfExperts(64, 32, num_experts=4, k=2, noise_seed=seed, **moe_kwargs), nn.ReLU(),
                        nn.Linear(32, 10))
    return LitMoE(net, num_classes=10, lr=1e-2)


def _trainer(tmp_path, callbacks, max_epochs=2, logger=True):
    tb = TensorBoardLogger(str(tmp_path), name="tb") if logger else False
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=tb, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                   limit_train_batches=6, callbacks=callbacks), tb


def _events(logger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


class RoutingSpy(Callback):
    """Checks the recording flag: off while training, on while validation batches run."""

    def __init__(self) -> None:
        self.train_records, self.val_flags = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = pl_module.model[1]
        self.train_records.append((layer.record_routing, layer.last_routing))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_flags.append(pl_module.model[1].record_routing)


def test_monitor_logs_routing_metrics_figures_and_ablation_to_tensorboard(tmp_path, flat_digits_loaders):
    train, val = flat_digits_loaders()
    monitor = RoutingMonitor(ablation_every_n_epochs=2, class_names=[f"digit {d}" for d in range(10)])
    spy = RoutingSpy()
    model = _model()
    trainer, logger = _trainer(tmp_path, [monitor, spy])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*collapsed.*")  # balanced routing: no collapse warning
        trainer.fit(model, train, val)

    acc = _events(logger)
    scalars, images = acc.Tags()["scalars"], acc.Tags()["images"]
    prefix = "moe/model.1/"
    for name in ("load_cv", "usage_entropy", "max_top1_share", "dead_experts", "drop_rate", "nmi", "mean_purity",
                 "balance_loss", "z_loss", "load/expert_0", "ablation/acc_drop/expert_3"):
        assert prefix + name in scalars, name
    assert len(acc.Scalars(prefix + "nmi")) == 2  # one per validation epoch, none for the sanity check
    assert len(acc.Scalars(prefix + "ablation/acc_drop/expert_0")) == 1  # epoch index 1 only (every 2 epochs)
    stats = monitor.last_statistics["model.1"]
    assert acc.Scalars(prefix + "nmi")[-1].value == pytest.approx(stats.nmi, rel=1e-5)
    loads = [acc.Scalars(f"{prefix}load/expert_{e}")[-1].value for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    assert stats.num_tokens == len(val.dataset)
    assert int(stats.expert_class_counts.sum()) == len(val.dataset)
    assert prefix + "expert_class_counts" in images and prefix + "ablation/acc_drop" in images
    table = acc.Tensors(prefix + "ablation/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "masked expert" in table and "digit" in table

    ablation = monitor.last_ablation["model.1"]
    assert ablation.drop.shape == (4, 10) and int(ablation.support.sum()) == min(512, len(val.dataset))
    # masking experts the model relies on costs accuracy somewhere
    assert ablation.overall_drop.max() > 0

    # recording: off in every training step, on during validation, restored afterwards
    assert spy.train_records and all(flag is False and rec is None for flag, rec in spy.train_records)
    assert spy.val_flags and all(spy.val_flags)
    layer = model.model[1]
    assert layer.record_routing is False and not layer._forward_hooks and layer.masked_experts == frozenset()


def test_monitor_does_not_change_training(tmp_path, flat_digits_loaders):
    params = []
    for callbacks in ([], [RoutingMonitor(ablation_every_n_epochs=1)]):
        pl.seed_everything(0)
        train, val = flat_digits_loaders()
        model = _model()
        trainer, _ = _trainer(tmp_path / str(len(callbacks)), callbacks, logger=False)
        trainer.fit(model, train, val)
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_validate_under_inference_mode_runs_ablation_and_restores_flag(tmp_path, flat_digits_loaders):
    _, val = flat_digits_loaders(batch_size=128)
    model = _model()
    model.model[1].record_routing = True  # a user's own setting survives
    monitor = RoutingMonitor(ablation_every_n_epochs=50, ablation_samples=200)
    trainer, logger = _trainer(tmp_path, [monitor])
    trainer.validate(model, val)
    assert trainer.validate_loop.inference_mode
    assert "model.1" in monitor.last_statistics and "model.1" in monitor.last_ablation
    assert int(monitor.last_ablation["model.1"].support.sum()) == 200
    assert model.model[1].record_routing is True


def test_collapse_warning_and_capacity_drops(tmp_path, flat_digits_loaders):
    _, val = flat_digits_loaders(batch_size=128)
    model = _model(prenorm=False, capacity_factor=1.0)
    layer = model.model[1]
    with torch.no_grad():  # digits are non-negative: every token goes to expert 2 first and expert 0 second
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
        layer.router.weight[0] = 0.5
    monitor = RoutingMonitor(collapse_threshold=0.9, ablation_every_n_epochs=None)
    trainer, logger = _trainer(tmp_path, [monitor])
    with pytest.warns(UserWarning, match=r"expert 2 is the top-1 expert of 100% of the validation tokens"):
        trainer.validate(model, val)
    stats = monitor.last_statistics["model.1"]
    # a batch of n tokens has capacity ceil(1.0 * n * 2 / 4) = n / 2 per expert: experts 2 and 0 each keep half
    assert stats.drop_rate == 0.5 and stats.dead_experts == 2 and stats.load.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert _events(logger).Scalars("moe/model.1/drop_rate")[-1].value == pytest.approx(stats.drop_rate, rel=1e-5)
    assert monitor.last_ablation == {}


@pytest.mark.parametrize("weight,suggested", [(0.0, "0.1"), (0.01, "0.1"), (0.1, "0.3")])
def test_collapse_warning_names_the_balance_weight_that_would_help(tmp_path, flat_digits_loaders, weight, suggested):
    _, val = flat_digits_loaders(batch_size=128)
    model = _model(prenorm=False, balance_loss_weight=weight)
    with torch.no_grad():  # digits are non-negative: every token goes to expert 1 first
        model.model[1].router.weight.zero_()
        model.model[1].router.weight[1] = 1.0
    trainer, _ = _trainer(tmp_path, [RoutingMonitor(ablation_every_n_epochs=None)], logger=False)
    with pytest.warns(UserWarning, match=rf"expert 1 is the top-1 expert of 100% .* raise the layer's "
                                         rf"balance_loss_weight from {weight:g} to {suggested}, and check that the "
                                         r"training loss adds moe_aux_loss\(model\)"):
        trainer.validate(model, val)


class SequenceClassifier(pl.LightningModule):
    """(B, T, D) tokens through an MoE, mean-pooled to class logits; one label per sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.moe = MixtureOfExperts(8, 8, num_experts=3, k=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.moe(x).mean(1))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_sequence_tokens_inherit_the_sequence_label(tmp_path):
    x = torch.randn(20, 5, 8)
    y = (x[:, 0, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    monitor = RoutingMonitor(ablation_every_n_epochs=1)
    trainer, _ = _trainer(tmp_path, [monitor], logger=False)
    trainer.validate(SequenceClassifier(), loader)
    stats = monitor.last_statistics["moe"]
    assert stats.num_tokens == 100 and stats.expert_class_counts.sum(0).tolist() == [5 * int((y == 0).sum()),
                                                                                      5 * int((y == 1).sum())]
    assert monitor.last_ablation["moe"].drop.shape == (3, 2)


def test_dedupe_drops_tokens_of_repeated_samples():
    # columns: sample id, call, position, label, expert, kept; sample 7 repeated, its second call kept apart
    rows = torch.tensor([[7, 0, 0, 1, 2, 1], [7, 0, 1, 1, 0, 1], [3, 0, 0, 0, 1, 1], [7, 0, 0, 1, 2, 1],
                         [7, 1, 0, 1, 3, 1], [-1, 0, 0, 1, 1, 1], [-1, 0, 0, 1, 1, 1]])
    _, out = dedupe_by_id(routing_row_keys(rows), rows)
    assert out.shape[0] == 6 and (out[:, 0] == 7).sum() == 3 and (out[:, 0] == -1).sum() == 2


class TwiceThroughMoE(SequenceClassifier):
    """The same MoE layer applied twice per step (weight sharing)."""

    def forward(self, x):
        return self.head(self.moe(self.moe(x)))

    def validation_step(self, batch, batch_idx):
        return None


def test_every_call_of_a_shared_layer_is_counted(tmp_path):
    x = torch.randn(12, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(12, dtype=torch.long)),
                                         batch_size=5)

    class Forward(Callback):  # the module's validation_step does nothing, so run the forward here
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            pl_module(batch[0])

    monitor = RoutingMonitor(ablation_every_n_epochs=None)
    trainer, _ = _trainer(tmp_path, [monitor, Forward()], logger=False)
    trainer.validate(TwiceThroughMoE(), loader)
    assert monitor.last_statistics["moe"].num_tokens == 24


def test_arguments_and_missing_layers_raise_clear_errors(tmp_path, flat_digits_loaders):
    with pytest.raises(ValueError, match=r"collapse_threshold must be <= 1.0, got 1.5"):
        RoutingMonitor(collapse_threshold=1.5)
    with pytest.raises(TypeError, match="collapse_threshold must be a number"):
        RoutingMonitor(collapse_threshold="0.5")
    with pytest.raises(ValueError, match="ablation_every_n_epochs must be >= 0"):
        RoutingMonitor(ablation_every_n_epochs=-1)
    with pytest.raises(ValueError, match="class_names has 3 names but num_classes=10"):
        RoutingMonitor(num_classes=10, class_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="layers must be a list of strings"):
        RoutingMonitor(layers=[1])
    with pytest.raises(TypeError, match="forward_fn must be a Callable"):
        RoutingMonitor(forward_fn="logits")
    with pytest.raises(TypeError, match="log_figures must be a bool"):
        RoutingMonitor(log_figures=1)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        RoutingMonitor(every_n_epochs=0)
    assert RoutingMonitor(layers="model.1").layer_names == ["model.1"]  # one name is one layer, not its characters
    _, val = flat_digits_loaders()
    plain = LitClassifier(nn.Sequential(nn.Linear(64, 10)), num_classes=10)
    trainer, _ = _trainer(tmp_path, [RoutingMonitor()], logger=False)
    with pytest.raises(ValueError, match="found no MixtureOfExperts layer"):
        trainer.validate(plain, val)
    trainer, _ = _trainer(tmp_path, [RoutingMonitor(layers=["model.3"])], logger=False)
    with pytest.raises(TypeError, match="'model.3', a Linear, not a MixtureOfExperts"):
        trainer.validate(_model(), val)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"target_key": "digit"}, ValueError, "target_key='digit' does not select anything in the batch"),
    ({"index_key": "row"}, ValueError, "index_key='row' does not select anything in the batch"),
    ({"input_key": "pixels"}, ValueError, "input_key='pixels' does not select anything in the batch"),
    ({"num_classes": 5}, ValueError, "the validation batch holds the label 9 but num_classes=5"),
    ({"layers": ["model.7"]}, ValueError, "layers='model.7' is not a module of the model"),
    ({"forward_fn": lambda module, x: module(x).sum(-1)}, ValueError,
     r"forward_fn \(default pl_module\(inputs\)\) returned \(2,\) for 2 inputs with labels of shape \(2,\)"),
])
def test_configuration_errors_stop_the_fit_before_the_first_training_step(tmp_path, flat_digits_loaders, kwargs,
                                                                         error, match):
    """Before: a wrong target_key, index_key or forward_fn surfaced in the first validation epoch, after training."""
    train, val = flat_digits_loaders()
    trainer, _ = _trainer(tmp_path, [RoutingMonitor(**kwargs)], logger=False)
    with pytest.raises(error, match=match):
        trainer.fit(_model(), train, val)
    assert trainer.global_step == 0


def test_due_epochs_and_summary_line(tmp_path, flat_digits_loaders, caplog):
    train, val = flat_digits_loaders()
    monitor = RoutingMonitor(every_n_epochs=2, ablation_every_n_epochs=2, max_overhead=None)
    trainer, logger = _trainer(tmp_path, [monitor], max_epochs=4)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        trainer.fit(_model(), train, val)
    acc = _events(logger)
    epoch_steps = [e.step for e in acc.Scalars("val/loss")]  # one per validation epoch
    assert [epoch_steps.index(e.step) for e in acc.Scalars("moe/model.1/nmi")] == [0, 1, 3]
    assert [epoch_steps.index(e.step) for e in acc.Scalars("moe/model.1/ablation/acc_drop/expert_0")] == [1, 3]
    lines = [r.getMessage() for r in caplog.records if "RoutingMonitor" in r.getMessage()]
    stats = monitor.last_statistics["model.1"]
    assert len(lines) == 1 and lines[0].startswith("RoutingMonitor (epoch 3): model.1: load_cv ")
    assert f"nmi {stats.nmi:.2f}" in lines[0] and "largest accuracy drop" in lines[0]


def test_a_failing_ablation_is_reported_and_the_statistics_are_still_logged(tmp_path, flat_digits_loaders):
    def forward(module, x):
        if x.shape[0] > 2:  # passes the dry run on two samples, fails in the ablation
            raise RuntimeError("forward_fn broke")
        return module(x)

    train, val = flat_digits_loaders()
    monitor = RoutingMonitor(ablation_every_n_epochs=1, forward_fn=forward, max_overhead=None)
    trainer, logger = _trainer(tmp_path, [monitor], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_model(), train, val)
    assert trainer.current_epoch == 3  # trained to the end
    failures = [str(w.message) for w in caught if "forward_fn broke" in str(w.message)]
    assert failures[0].startswith("RoutingMonitor: 'ablation' failed at epoch 0 with RuntimeError: forward_fn broke")
    assert "switched off after 3 failures" in failures[-1] and monitor.disabled == {"ablation"}
    assert monitor.last_ablation == {}
    assert len(_events(logger).Scalars("moe/model.1/nmi")) == 3  # the rest of the monitor kept running
DDP_SCRIPT = Path(__file__).with_name("routing_monitor_ddp_script.py")


@pytest.mark.slow
def test_ddp_two_processes_report_the_same_routing_as_one(tmp_path):
    one = _ddp.load_script(DDP_SCRIPT).run_validate(devices=1, root=str(tmp_path / "one"))
    ranks = _ddp.run(DDP_SCRIPT, tmp_path / "two")
    assert one["num_tokens"] == 539  # the repeated sample is dropped
    # the 200 ablation samples are the same 200 as in one process (before: the first 200 of each rank, 400 in all)
    assert sum(one["support"]) == 200 and one["support"] == ranks[0]["support"]
    for rank in ranks:  # every rank gathered everything and computed the same numbers
        assert {k: v for k, v in rank.items() if k != "rank"} == {k: v for k, v in one.items() if k != "rank"}
    event_files = list((tmp_path / "two").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1  # only rank zero logs
    logged = _ddp.read_scalars(str(event_files[0].parent))
    assert logged["moe/model.1/nmi"] == pytest.approx(one["nmi"], rel=1e-5)
    one_logged = _ddp.read_scalars(str(next((tmp_path / "one").rglob("events.out.tfevents.*")).parent))
    tags = [t for t in one_logged if t.startswith("moe/")]
    assert len(tags) == 21 and set(tags) == {t for t in logged if t.startswith("moe/")}
    for tag in tags:  # the same logged numbers
        assert logged[tag] == pytest.approx(one_logged[tag], rel=1e-6, abs=1e-9), tag


@pytest.mark.slow
def test_ddp_a_failure_on_one_rank_neither_hangs_nor_kills_the_other(tmp_path):
    """Rank 1's forward_fn raises in the ablation: both ranks finish, skip the ablation together and still log the
    routing of a 1-process run (batches without sample indices: rank-safe position ids)."""
    one = _ddp.load_script(DDP_SCRIPT).run_validate(devices=1, root=str(tmp_path / "one"), tuples=True)
    out = tmp_path / "ddp"
    proc = _ddp.launch(DDP_SCRIPT, "--devices", "2", "--out", str(out), "--root", str(tmp_path / "two"), "--tuples",
                       "--fail-rank", "1", cwd=tmp_path, quiet=False)  # the failure is read from stderr
    assert "'ablation' failed at epoch 0 with RuntimeError: rank 1 broke" in proc.stderr
    ranks = _ddp.read_results(out)
    for rank in ranks:
        assert rank["support"] is None  # skipped on both ranks
        assert rank["num_tokens"] == one["num_tokens"] == 539 and rank["nmi"] == one["nmi"]
        assert rank["expert_class_counts"] == one["expert_class_counts"]
