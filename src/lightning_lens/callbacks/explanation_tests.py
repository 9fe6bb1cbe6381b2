r"""
Explanation tests
^^^^^^^^^^^^^^^^^

At the end of fit, run tests of the attribution methods on the trained model besides the randomization cascade:
input invariance (Kindermans et al.: :func:`lightning_lens.sanity.input_invariance`) and fragility (Ghorbani et al.
2019: :func:`lightning_lens.evaluation.explanation_fragility`), on a few validation probes, and log the verdicts.
ROAR (:func:`lightning_lens.evaluation.remove_and_retrain`) retrains models and is never run by a callback.

Tags written (``<method>`` is the logged name of a method):

=============================================  =====================================================================
``explanations/input_invariance``              table (verdict, largest relative difference, similarities) and figure
``explanations/input_invariance/<method>/verdict``  scalar: +1 passes, 0 inconclusive, -1 fails
``explanations/fragility``                     table (attack and random rows) and figure (per-probe intersections)
``explanations/fragility/<method>/topk_attack``  scalar, and ``.../topk_random``, ``.../verdict``
``explanations/report``                        JSON with both reports
=============================================  =====================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from typing_extensions import override

from lightning_lens._pl import pl
from lightning_lens.callbacks._base import log
from lightning_lens.callbacks._probes import ProbeCallback, ProbeCollector
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.batch import Key
from lightning_lens.utils.checks import check_choice, check_float, check_int, check_str_list

__all__ = ["ExplanationTestsCallback"]

TESTS = ("input_invariance", "fragility")
_TARGETS = ("label", "prediction")
_VERDICT_VALUE = {"passes": 1.0, "inconclusive": 0.0, "fails": -1.0}
_DRY_RUN_PROBES = 2


class ExplanationTestsCallback(ProbeCallback):
    """Test the attribution methods on the trained model at the end of fit: input invariance and fragility.

    The probes are drawn once from the validation data (shared with other lightning-lens callbacks asking for the
    same ``num_probes`` and ``probe_seed``). Both tests work on private deep copies of the LightningModule: training,
    the module's state, its modes and the global RNG are untouched. Before the first training step both tests run
    once on two validation examples, so a model whose first layer cannot compensate the shift, a method that does not
    resolve or a fragility method that cannot be attacked stop the run with an error naming the argument.

    Args:
        tests: which tests to run: ``"input_invariance"`` and/or ``"fragility"``.
        methods: the methods of the input-invariance test (registry names, ``(name, kwargs)`` pairs, a dict).
        shift, shift_baselines: see :func:`~lightning_lens.sanity.input_invariance`.
        fragility_method: ``"gradient"`` or ``"gradient_x_input"`` (the attack differentiates the explanation).
        epsilon, fragility_steps, top_k: the attack's L-infinity radius, iterations and top-k size.
        num_probes, probe_seed, probes: the probes (at least 2).
        target: explain the probes' ``"label"`` or the model's ``"prediction"``.
        seed: seed of the fragility test's random control.
        input_key, target_key, index_key: where inputs, labels and ids are in batches.
        max_overhead, strict, verbose: see :class:`~lightning_lens.callbacks._base.LensCallback`.

    Example:
        >>> callback = ExplanationTestsCallback(tests=["input_invariance"], methods=["gradient", "gradient_x_input"])
        >>> callback.tests
        ('input_invariance',)
    """

    def __init__(
        self,
        tests: Sequence[str] = TESTS,
        methods: Union[Sequence[Any], Mapping[str, Any]] = ("gradient", "gradient_x_input", "integrated_gradients"),
        shift: Union[float, Sequence[float]] = -1.0,
        shift_baselines: Union[bool, Sequence[str]] = False,
        fragility_method: str = "gradient",
        epsilon: float = 0.1,
        fragility_steps: int = 10,
        top_k: Union[int, float] = 0.1,
        num_probes: int = 8,
        probe_seed: int = 0,
        probes: Optional[ProbeSet] = None,
        target: Literal["label", "prediction"] = "label",
        seed: int = 0,
        input_key: Key = None,
        target_key: Key = None,
        index_key: Key = None,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_epochs=None, max_overhead=max_overhead, strict=strict, verbose=verbose)
        from lightning_lens.attribution.registry import canonical_name
        from lightning_lens.sanity._common import normalize_methods

        self.tests = check_str_list(tests, "tests")
        if not self.tests:
            raise ValueError(f"tests must name at least one of {list(TESTS)}")
        for name in self.tests:
            check_choice(name, "tests", TESTS)
        self._method_specs = normalize_methods(methods)
        if isinstance(shift, bool) or not isinstance(shift, (int, float, Sequence)) or isinstance(shift, str):
            raise TypeError(f"shift must be a float or one float per channel, got {shift!r}")
        self.shift = shift
        self.shift_baselines = shift_baselines
        if not isinstance(fragility_method, str) or canonical_name(fragility_method) not in ("gradient",
                                                                                              "gradient_x_input"):
            raise ValueError(f"fragility_method must be 'gradient' or 'gradient_x_input' (the attack differentiates"
                             f" the explanation), got {fragility_method!r}")
        self.fragility_method = canonical_name(fragility_method)
        self.epsilon = check_float(epsilon, "epsilon", minimum=0.0, open_min=True)
        self.fragility_steps = check_int(fragility_steps, "fragility_steps", minimum=1)
        self.top_k = top_k
        self.num_probes = check_int(num_probes, "num_probes", minimum=2)
        self.probe_seed = check_int(probe_seed, "probe_seed")
        self.target = check_choice(target, "target", _TARGETS)
        self.seed = check_int(seed, "seed")
        self._accessor = BatchAccessor(input_key=input_key, target_key=target_key, index_key=index_key)
        self._collector = ProbeCollector(self.num_probes, self._accessor, self.probe_seed, probes, owner=self)
        self.last_reports: dict[str, Any] = {}

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        return {"tests": list(self.tests), "methods": [n for n, _ in self._method_specs],
                "num_probes": self.num_probes, "probe_seed": self.probe_seed}

    # ----------------------------------------------------------------------------------------------------------- setup
    @override
    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        """Run the tests once on two validation examples (cheap settings) before the first training step."""
        source = self._collector.probes if self._collector.explicit else batch
        if source is None:
            return
        if isinstance(source, ProbeSet):
            inputs, labels = source.inputs[:_DRY_RUN_PROBES], source.targets
        else:
            try:
                inputs, labels = self._accessor.inputs(source), self._accessor.targets(source)
            except (KeyError, TypeError) as err:
                raise ValueError(f"ExplanationTestsCallback: {err.args[0] if err.args else err}") from err
        inputs = inputs[:_DRY_RUN_PROBES].detach().clone()
        target = self._target(labels, inputs.shape[0])
        if "input_invariance" in self.tests:
            try:
                self._invariance(pl_module, inputs, target)
            except (TypeError, ValueError) as err:
                raise type(err)(f"ExplanationTestsCallback(methods / shift / shift_baselines): {err}") from err
        if "fragility" in self.tests:
            try:
                self._fragility(pl_module, inputs, target, n_steps=1)
            except (TypeError, ValueError) as err:
                raise type(err)(f"ExplanationTestsCallback(epsilon / top_k / fragility_method): {err}") from err

    def _target(self, labels: Optional[torch.Tensor], count: int) -> Optional[torch.Tensor]:
        if self.target == "prediction":
            return None
        if labels is None or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError("ExplanationTestsCallback(target='label') needs one integer class index per example; set"
                             " target_key to where the labels are, or use target='prediction'")
        return labels[:count].long()

    # ----------------------------------------------------------------------------------------------- the pure parts
    def _invariance(self, module: torch.nn.Module, inputs: torch.Tensor, target: Optional[torch.Tensor]) -> Any:
        from lightning_lens.sanity import input_invariance

        return input_invariance(module, inputs, target, dict(self._method_specs), shift=self.shift,
                                shift_baselines=self.shift_baselines, keep_maps=False)

    def _fragility(self, module: torch.nn.Module, inputs: torch.Tensor, target: Optional[torch.Tensor],
                   n_steps: Optional[int] = None) -> Any:
        from lightning_lens.evaluation import explanation_fragility

        return explanation_fragility(module, inputs, target, self.fragility_method, self.epsilon,
                                     n_steps=n_steps or self.fragility_steps, top_k=self.top_k, seed=self.seed)

    # ----------------------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        probes = self._collector.finalize(trainer)  # every rank (a collective for streamed data)
        if not trainer.is_global_zero:
            return
        if probes is None:
            self.warn_once("no probes", "ExplanationTestsCallback: no probes at the end of fit (no validation data);"
                                        " pass probes=ProbeSet(...) or add a validation dataloader")
            return
        start = time.perf_counter()
        device = next(pl_module.parameters()).device
        inputs = probes.inputs.to(device)
        target = self._target(probes.targets, inputs.shape[0])
        target = None if target is None else target.to(device)
        runs = {"input_invariance": self._invariance, "fragility": self._fragility}
        for name in self.tests:
            report = self.run_part(trainer, name, runs[name], pl_module, inputs, target,
                                   hint="fix the test's options or leave it out of tests")
            if report is not None:
                self.last_reports[name] = report
        self.record_run_cost(time.perf_counter() - start)
        if self.last_reports:
            self._log(trainer)

    @override
    def summary(self) -> Optional[str]:
        from lightning_lens.render.sanity import comparison_verdict_lines

        if not self.last_reports:
            return None
        lines = ["ExplanationTestsCallback:"]
        for name, report in self.last_reports.items():
            lines += [f"  {name}: {line}" for line in comparison_verdict_lines(report)]
        return "\n".join(lines)

    def _log(self, trainer: "pl.Trainer") -> None:
        from lightning_lens import loggers
        from lightning_lens.render.sanity import comparison_verdict_lines, fragility_figure, invariance_figure

        for name, report in self.last_reports.items():
            log.info("ExplanationTestsCallback %s:\n  %s", name, "\n  ".join(comparison_verdict_lines(report)))
        if not trainer.loggers:
            self.warn_once("no logger", "ExplanationTestsCallback has no logger to write to; the reports are still"
                                        " available as `.last_reports`")
            return
        step = loggers.logging_step(trainer)
        figures = {"input_invariance": invariance_figure, "fragility": fragility_figure}

        def scalars() -> None:
            values: dict[str, float] = {}
            for test, report in self.last_reports.items():
                for method, verdict in report.verdicts.items():
                    tag = f"explanations/{test}/{loggers.sanitize_tag(method) or 'method'}"
                    values[f"{tag}/verdict"] = _VERDICT_VALUE[verdict.outcome]
                    if test == "fragility":
                        for key in ("topk_attack", "topk_random"):
                            value = report.means()[key]
                            if math.isfinite(value):
                                values[f"{tag}/{key}"] = value
            loggers.log_scalars(trainer, values, step=step)

        for test, report in self.last_reports.items():
            columns, rows = report.to_table()
            self.run_part(trainer, f"{test} table", loggers.log_table, trainer, f"explanations/{test}", columns, rows,
                          step=step)
            self.run_part(trainer, f"{test} figure", lambda r=report, t=test: loggers.log_figure(
                trainer, f"explanations/{t}", figures[t](r), step=step))
        self.run_part(trainer, "scalars", scalars)
        self.run_part(trainer, "report JSON", lambda: loggers.log_json(
            trainer, "explanations/report", {k: r.to_dict() for k, r in self.last_reports.items()}, step=step))
