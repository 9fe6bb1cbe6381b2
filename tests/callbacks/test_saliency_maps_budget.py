"""SaliencyMapCallback's time limits: ``time_budget`` per logged epoch and ``max_overhead`` of the fit.

The methods here sleep a known time, so their cost is controlled: each method's cost is estimated from its last run
(or, before it first ran, from the setup dry run), a method that would exceed what is left is deferred, and deferred
methods run first the next time.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from pytorch_lightning import Trainer

from lightning_lens.callbacks import SaliencyMapCallback
from lightning_lens.testing import LitClassifier, SmallCNN


class Sleepy:
    """An attribution method that takes ``seconds`` per call, whatever the number of inputs."""

    def __init__(self, name: str, seconds: float, calls: list) -> None:
        self.name, self.seconds, self.calls = name, seconds, calls

    def attribute(self, inputs, target=None):
        self.calls.append(self.name)
        time.sleep(self.seconds)
        return torch.ones_like(inputs)


class Timed(SaliencyMapCallback):
    """Records, per logged epoch, the methods that ran and the wall time of the callback's epoch-end work."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs: list[tuple[list[str], float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        super().on_validation_epoch_end(trainer, pl_module)
        if self.is_due(trainer):
            self.epochs.append((list(self.last_attributions), time.perf_counter() - start))


@pytest.fixture(autouse=True, scope="module")
def _rendering_warmed_up():
    """Draw one grid first, so that the first grid of a test does not also pay for importing the renderer."""
    from lightning_lens import render

    render.image_grid([[render.heatmap(torch.rand(1, 8, 8))]], row_labels=["warm-up"], cell_size=8)


def _fit(cb, saliency_loaders, trainer_kwargs, epochs):
    trainer = Trainer(**trainer_kwargs(max_epochs=epochs, logger=False, callbacks=[cb], num_sanity_val_steps=0))
    trainer.fit(LitClassifier(model=SmallCNN(width=4)), *saliency_loaders(n_train=32, n_val=16))


def test_time_budget_defers_what_would_exceed_it_and_rotates(saliency_loaders, trainer_kwargs):
    calls: list[str] = []
    # two methods (1.2 s) fit in 1.5 s with room for the grids, three (1.8 s) do not
    methods = [Sleepy(name, 0.6, calls) for name in ("a", "b", "c")]
    cb = Timed(methods=methods, num_probes=2, time_budget=1.5, max_overhead=None, log_scalars=False, cell_size=8)
    with pytest.warns(UserWarning, match=r"time_budget=1.5s was spent .* skipped 1 method\(s\) at epoch 0"):
        _fit(cb, saliency_loaders, trainer_kwargs, epochs=3)
    # the setup dry run measured each method; the deferred one goes first the next time
    assert [sorted(ran) for ran, _ in cb.epochs] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert calls[3:] == ["a", "b", "c", "a", "b", "c"]  # after the dry run's a, b, c: in waiting order
    for _, seconds in cb.epochs:
        assert seconds <= 1.5 + 0.6  # within time_budget plus one method's cost


def test_a_method_dearer_than_the_time_budget_runs_alone_in_its_turn(saliency_loaders, trainer_kwargs):
    calls: list[str] = []
    cb = Timed(methods=[Sleepy("fast", 0.01, calls), Sleepy("slow", 0.6, calls)], num_probes=2, time_budget=0.3,
               max_overhead=None, log_scalars=False, cell_size=8)
    with pytest.warns(UserWarning, match=r"skipped 1 method\(s\) at epoch 0 .*\['slow'\]"):
        _fit(cb, saliency_loaders, trainer_kwargs, epochs=4)
    # the slow method is not started once time is short (the dry run costed it at 0.6 s); when it has waited
    # longest it runs first, and the fast one waits instead of running past the budget
    assert [ran for ran, _ in cb.epochs] == [["fast"], ["slow"], ["fast"], ["slow"]]
    assert all(seconds <= 0.3 + 0.6 for _, seconds in cb.epochs)  # time_budget plus one method's cost


def test_max_overhead_defers_methods_within_the_first_and_last_epoch(saliency_loaders, trainer_kwargs, caplog):
    calls: list[str] = []
    methods = [Sleepy(name, 0.2, calls) for name in ("a", "b", "c")]
    cb = Timed(methods=methods, num_probes=2, max_overhead=0.05, log_scalars=False, cell_size=8)
    with caplog.at_level(logging.INFO, logger="lightning_lens"):
        _fit(cb, saliency_loaders, trainer_kwargs, epochs=4)
    # 0.6 s of dry run already exceed 5 % of this fit: the first and the last epoch still log, one method each, the
    # one that waited longest; the epochs in between are skipped
    assert [ran for ran, _ in cb.epochs] == [["a"], ["b"]]
    assert cb.skipped_for_budget == [1, 2]
    messages = [r.getMessage() for r in caplog.records]
    assert any("deferred ['b', 'c'] at epoch 0 to stay within max_overhead=0.05" in m for m in messages)
    assert any("epoch 1 skipped to stay within max_overhead=0.05" in m for m in messages)


class SlowTraining(LitClassifier):
    """Training steps of a known length (0.1 s each), so the budget's training time is controlled too."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.1)
        return super().training_step(batch, batch_idx)


def test_between_the_first_and_last_epoch_no_method_runs_past_max_overhead(saliency_loaders, trainer_kwargs):
    calls: list[str] = []
    # 2 training steps per epoch (0.2 s), 4 epochs: about 0.8 s of training, so max_overhead=1.0 allows ~0.8 s; the
    # dry run spends ~0.5 s. The dear method "b" (0.5 s) is deferred at epoch 0, then waits longest: in the optional
    # epochs it no longer fits and must not run first anyway (before: it did, spending ~1.5 s against ~0.8 s)
    cb = Timed(methods=[Sleepy("a", 0.005, calls), Sleepy("b", 0.5, calls)], num_probes=2, max_overhead=1.0,
               log_scalars=False, cell_size=8)
    trainer = Trainer(**trainer_kwargs(max_epochs=4, logger=False, callbacks=[cb], num_sanity_val_steps=0))
    trainer.fit(SlowTraining(model=SmallCNN(width=4)), *saliency_loaders(n_train=32, n_val=16))
    ran = [methods for methods, _ in cb.epochs]
    assert ran[0] == ["a"] and "b" in ran[-1]  # the first and the last epoch log; "b" gets its turn at the end
    assert all(methods == ["a"] for methods in ran[1:-1])  # in between only what fits
    assert calls.count("b") == 2  # the dry run and the last epoch


def test_epochs_before_the_last_keep_the_last_epochs_full_run_free():
    """The last epoch's maps are the ones that matter: before it, the allowance leaves the cost of *every* method
    (each at its last measured cost with its grid), not just of the last run, which may have been one method."""
    from types import SimpleNamespace

    from lightning_lens.callbacks._base import OverheadBudget

    cb = SaliencyMapCallback(methods=["gradient", "smoothgrad", "integrated_gradients"], num_probes=2)
    cb._methods = [(name, object()) for name in cb.method_names]
    cb.part_seconds = {"method:gradient": 0.1, "method:smoothgrad": 0.3, "render:gradient": 0.05}
    cb._estimates = {"integrated_gradients": 0.4}  # not run yet: the dry run's estimate
    cb.record_run_cost(0.15)  # the last run: gradient alone
    # every method with a grid (one not drawn yet costs like the dearest drawn): 0.15 + 0.35 + 0.45
    assert cb.last_epoch_reserve() == pytest.approx(0.95)
    group = OverheadBudget(None)
    group.start(now=0.0)
    cb.budget = OverheadBudget(0.5)
    cb.budget.join(group, now=0.0)
    cb.budget.spend(0.2)
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=1, max_epochs=4)
    import time as clock

    start = clock.perf_counter() - 1.2  # 1 s of training (plus the 0.2 s spent), 2 of 4 epochs: 2 s projected
    cb.budget.started = group.started = start
    # 0.5 x 2 s = 1 s of budget - 0.2 s spent - 0.95 s reserved for the last epoch: nothing left for this epoch
    assert cb._overhead_allowance(trainer) == 0.0
    trainer.current_epoch = 3  # the last epoch: all that is left, 0.5 x 1 s of training - 0.2 s spent
    assert cb._overhead_allowance(trainer) == pytest.approx(0.3, abs=0.02)
