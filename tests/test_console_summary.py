"""End-of-fit console summaries: one message per callback through the ``lightning_lens`` logger, holding the sanity
verdicts (with the deciding metric and its numbers) and the top slices; the verbosity rule; a failing summary never
ends the run."""

from __future__ import annotations

import logging

import pytest
from pytorch_lightning import Trainer, seed_everything

from lightning_lens.callbacks import RandomizationSanityCheck, SubgroupErrorSlices
from lightning_lens.lightning_modules import LitClassifier, SpuriousDigitsDataModule
from lightning_lens.report import format_number


def _fit(tmp_path, callbacks, **kwargs):
    seed_everything(0)
    options = dict(max_epochs=1, limit_train_batches=2)
    options.update(kwargs)
    trainer = Trainer(callbacks=callbacks, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **options)
    trainer.fit(LitClassifier(lr=5e-3), datamodule=SpuriousDigitsDataModule(batch_size=64, eval_batch_size=128))
    return trainer


def _callbacks():
    check = RandomizationSanityCheck(methods=["gradient"], num_probes=4, grid_probes=0)
    slices = SubgroupErrorSlices(metadata_keys=["digit", "shortcut_present", "thickness"], num_images=0)
    return check, slices


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "lightning_lens"]


@pytest.fixture(scope="module")
def summary_run(tmp_path_factory):
    """One short fit with the sanity check and the slices, with the messages it logged."""
    check, slices = _callbacks()
    handler = _ListHandler()
    log = logging.getLogger("lightning_lens")
    log.addHandler(handler)
    try:
        _fit(tmp_path_factory.mktemp("summary"), [check, slices], limit_train_batches=None)  # learns enough for slices
    finally:
        log.removeHandler(handler)
    return check, slices, handler.messages


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_sanity_summary_holds_every_verdict_with_its_deciding_metric_and_numbers(summary_run):
    check, _, messages = summary_run
    (text,) = [m for m in messages if m.startswith("RandomizationSanityCheck verdicts")]
    report = check.last_report
    rule = report.rule
    assert f"deciding metric {rule.metric}" in text.splitlines()[0]
    assert f"passes below {rule.pass_below:g}, fails above {rule.fail_above:g}" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "verdict"])
    assert lines[header].split()[2] == rule.metric  # the deciding metric's column
    rows = {line.split()[0]: line for line in lines[header + 1:]}
    assert list(rows) == ["gradient", "edge", "random"]
    for name, verdict in report.verdicts.items():
        row = rows[name]
        assert verdict.outcome in row
        for number in (verdict.similarity, verdict.floor, verdict.score):
            assert format_number(number) in row
    assert "(control)" in rows["edge"] and "(control)" in rows["random"] and "(control)" not in rows["gradient"]
    expected_edge = "as expected for a control" if report.verdicts["edge"].outcome == "fails" else "expected fails"
    assert expected_edge in rows["edge"]


def test_the_slices_summary_names_the_top_slice_with_its_size_and_accuracy(summary_run):
    _, slices, messages = summary_run
    (text,) = [m for m in messages if m.startswith("SubgroupErrorSlices (slices)")]
    assert slices.last_slices, "the short fit should find at least one slice on SpuriousDigits"
    top = slices.last_slices[0]
    assert f"{top.name} (n={top.size}, accuracy {top.accuracy:.3f})" in text
    assert f"accuracy {slices.last_result['accuracy']:.3f}" in text


def test_each_summary_is_logged_once_at_the_end_of_fit(summary_run):
    _, _, messages = summary_run
    assert sum(m.startswith("RandomizationSanityCheck verdicts") for m in messages) == 1
    assert sum(m.startswith("SubgroupErrorSlices (slices)") for m in messages) == 1
    # the summaries come after the check's own report: the last two messages of the fit
    assert messages[-2].startswith("RandomizationSanityCheck verdicts")
    assert messages[-1].startswith("SubgroupErrorSlices (slices)")


@pytest.mark.parametrize("silence", ["verbose", "lens_logger", "lightning_logger"])
def test_the_verbosity_rule_silences_the_summaries(tmp_path, silence):
    check, slices = _callbacks()
    if silence == "verbose":
        check.verbose = slices.verbose = False
    name = {"lens_logger": "lightning_lens", "lightning_logger": "pytorch_lightning"}.get(silence)
    previous = logging.getLogger(name).level if name else None
    handler = _ListHandler()
    logging.getLogger("lightning_lens").addHandler(handler)
    if name:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        _fit(tmp_path, [check, slices])
    finally:
        logging.getLogger("lightning_lens").removeHandler(handler)
        if name:
            logging.getLogger(name).setLevel(previous)
    assert check.last_report is not None and slices.last_result is not None
    assert check.summary() is not None and slices.summary() is not None  # there was something to say
    assert not any(m.startswith(("RandomizationSanityCheck verdicts", "SubgroupErrorSlices (slices)"))
                   for m in handler.messages)
    if silence == "lightning_logger":  # the lightning_lens logger itself still prints its other lines
        assert any(m.startswith("RandomizationSanityCheck (end of fit") for m in handler.messages)


def test_a_failing_summary_is_reported_and_the_fit_completes(tmp_path):
    class Broken(SubgroupErrorSlices):
        def summary(self):
            raise RuntimeError("summary broke")

    slices = Broken(metadata_keys=["digit"], num_images=0)
    with pytest.warns(RuntimeWarning, match="'console summary' failed .* summary broke"):
        trainer = _fit(tmp_path, [slices])
    assert trainer.state.finished and slices.last_result is not None


def test_verbose_is_validated():
    from lightning_lens.callbacks._base import LensCallback

    with pytest.raises(TypeError, match="verbose"):
        LensCallback(verbose="yes")


def test_every_callback_takes_verbose_in_its_constructor():
    # regression: verbose was an argument of the base only, so `verbose=False` (or YAML) could not reach it
    import inspect

    import lightning_lens.callbacks as callbacks
    from lightning_lens.callbacks._base import LensCallback

    classes = [getattr(callbacks, n) for n in callbacks.__all__]
    lens = [c for c in classes if inspect.isclass(c) and issubclass(c, LensCallback) and c is not LensCallback]
    assert len(lens) >= 10
    for cls in lens:
        assert "verbose" in inspect.signature(cls.__init__).parameters, cls.__name__
    assert callbacks.SubgroupErrorSlices(verbose=False).verbose is False
    assert callbacks.RandomizationSanityCheck(verbose=False).verbose is False
    with pytest.raises(TypeError, match="verbose"):
        callbacks.SaliencyMapCallback(verbose="no")


def test_the_saliency_summary_says_which_epochs_each_method_got(tmp_path):
    # regression: under a budget methods take turns, but the summary claimed every method at every logged epoch
    from lightning_lens.callbacks import SaliencyMapCallback

    saliency = SaliencyMapCallback(methods=["gradient", "smoothgrad"], num_probes=2, time_budget=1e-6)
    _fit(tmp_path, [saliency], max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    # the time budget lets only the longest-waiting method run each epoch: gradient, then smoothgrad
    assert saliency.method_epochs == {"gradient": [0], "smoothgrad": [1]}
    summary = saliency.summary()
    assert "gradient logged at epochs 0" in summary and "smoothgrad logged at epochs 1" in summary
