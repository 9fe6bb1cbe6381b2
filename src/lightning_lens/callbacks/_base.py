"""``LensCallback``: the one base of every lightning-lens callback.

It owns what each callback would otherwise write again, and what makes a monitoring callback safe to leave on:

* **failure isolation** — every hook a subclass defines is wrapped: an exception inside the callback's own work
  (attribution, rendering, a user callable such as ``denormalize``, a logger rejecting a tag) is caught at the
  callback's boundary, reported once (a warning naming the callback, the epoch, the exception and the fix when known,
  plus a text entry in the loggers) and training continues. :meth:`run_part` isolates one part (one method, the
  rendering, the table) so that only that part is disabled after ``max_failures`` failures in a row. ``strict=True``
  re-raises, for tests and debugging. ``setup``/``on_fit_start`` are not wrapped: configuration errors must stop the
  run before the first training step.
* **the due-epoch rule** — :meth:`is_due`: every ``every_n_epochs``-th epoch of fit counted from one
  (``(epoch + 1) % n == 0``), always the first and the last epoch of the fit, always under ``trainer.validate()``,
  never during Lightning's sanity pass; epochs in between are skipped when the overhead budget is spent.
* **the overhead budget** — ``max_overhead`` (a fraction of fit time, default 5 %): the time of every wrapped hook is
  counted as the callback's own, the rest of the fit's wall time as training; a due epoch runs only if the cost of
  its work (estimated from the last run) and of the last epoch's run (reserved) fits the budget of the projected fit.
* **collective decisions under DDP** — the due decision is rank zero's, broadcast; :meth:`run_part` with
  ``collective=True`` all-reduces success so that every rank skips the collectives that follow a failure on any rank.
  Collectives never run inside a guarded part: parts compute locally, the base's helpers communicate.
* **a dry run at setup** — :meth:`check_setup` is called once at ``on_fit_start`` (or the start of
  ``trainer.validate()``) with one validation batch on the module's device, before the first training step:
  subclasses resolve their methods, layers and keys there and raise ``TypeError``/``ValueError`` naming the argument.
  The batch is read once and shared by the callbacks of the trainer; the dry run's time counts against
  ``max_overhead`` (it is the callback's own work), so a dear check leaves less room for the epochs in between.
* ``state_key`` from :meth:`_state_key_fields`, and ``warn_once``.
* **a console summary at the end of fit** — :meth:`summary` (a subclass builds its text with the pure functions of
  :mod:`lightning_lens.report.summaries`) is logged once through the ``lightning_lens`` logger on rank zero, after
  the subclass's own ``on_fit_end``. The rule: it is logged when ``verbose`` is true and both the ``lightning_lens``
  logger and Lightning's own logger (``pytorch_lightning``) print INFO lines, so silencing Lightning's console output
  the way its documentation shows (``logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)``) silences the
  summaries too.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar

import torch

from lightning_lens import evaluation, loggers, render, report  # noqa: F401
from lightning_lens._pl import Callback, pl
from lightning_lens.utils.checks import check_bool, check_int

# The packages the callbacks' hooks use are imported with the callbacks, not inside the first hook of a fit: a first
# import there would be counted as the callback's overhead (~0.1 s when Python cannot cache bytecode).
loggers.sinks.warm_up()

__all__ = ["GROUP_OVERHEAD_FACTOR", "LensCallback", "OverheadBudget", "check_displayable", "first_validation_batch", "log",
           "summaries_enabled"]

#: the package's console logger. Like Lightning's own, it prints INFO lines to stderr unless the application has set
#: up logging itself (a handler on the root logger); silence it with
#: ``logging.getLogger("lightning_lens").setLevel(logging.WARNING)``.
log = logging.getLogger("lightning_lens")
if not logging.getLogger().handlers and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

T = TypeVar("T")

#: hooks that are wrapped for failure isolation and time accounting when a subclass defines them
_GUARDED_HOOKS = (
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_sanity_check_start",
    "on_sanity_check_end",
    "on_fit_end",
    "on_exception",
    "teardown",
    "on_save_checkpoint",
    "on_before_optimizer_step",
)


class OverheadBudget:
    """Keeps a callback's cumulative time within ``max_overhead`` of the training time it observes.

    Pure bookkeeping, no Lightning: ``start()`` when the fit starts, ``spend(seconds)`` for the callback's own time,
    ``allows(epoch, max_epochs, cost)`` before optional work. The training time is the wall time since ``start`` minus
    the callbacks' own time. Work is allowed when the time spent so far, plus ``cost``, plus ``reserve`` (the cost of
    a run that must still happen, e.g. at the last epoch) stays within ``max_overhead`` of the projected training time
    of the whole fit (``max_epochs`` known) or of the training time so far (unknown).

    Several callbacks of one trainer also share a **group** budget (:meth:`join`): their time together stays within
    :data:`GROUP_OVERHEAD_FACTOR` times the largest ``max_overhead`` among them (never more than the sum of their
    budgets), so one callback alone may use its 5 % and any number of them together 10 %. Each member declares what
    it must still spend whatever the budget says (its run at the last epoch, a check at the end of fit) with
    :meth:`reserve`; optional work of one member leaves room for the others' reserves.

    Example:
        >>> budget = OverheadBudget(0.05)
        >>> budget.start(now=0.0)
        >>> budget.spend(0.5)
        >>> budget.allows(epoch=9, max_epochs=10, cost=0.5, now=20.5)  # 20 s of training so far: 1 s is the budget
        True
        >>> budget.allows(epoch=9, max_epochs=10, cost=0.6, now=20.5)
        False
        >>> group = OverheadBudget(None)
        >>> group.start(now=0.0)
        >>> a, b = OverheadBudget(0.05), OverheadBudget(0.05)
        >>> for member in (a, b):
        ...     member.join(group, now=0.0)
        >>> a.spend(0.9)
        >>> b.reserve(0.8)  # b must still run at the last epoch
        >>> a.allows(epoch=9, max_epochs=10, cost=0.1, now=20.9)  # a's own 5 % allows it, the group's 10 % does not
        False
    """

    def __init__(self, max_overhead: Optional[float]) -> None:
        if max_overhead is not None:
            if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)):
                raise TypeError(f"max_overhead must be a fraction of fit time or None, got {max_overhead!r}")
            if not 0 < max_overhead <= 10:
                raise ValueError(
                    f"max_overhead must be a positive fraction of fit time (0.05 = 5 %) or None, got {max_overhead}"
                )
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.started: Optional[float] = None
        self.spent = 0.0
        self.group: Optional[OverheadBudget] = None
        # on a group: every member's spending (the training time excludes it) and the members' budgets and reserves
        self.spent_by_all = 0.0
        self.members: list[OverheadBudget] = []
        self.reserved: dict[int, float] = {}

    def start(self, now: Optional[float] = None) -> None:
        self.started = time.perf_counter() if now is None else now
        self.spent = 0.0
        self.spent_by_all = 0.0
        self.reserved = {}

    def join(self, group: "OverheadBudget", now: Optional[float] = None) -> None:
        """Start this budget as a member of ``group`` (see the class docstring)."""
        self.start(now)
        self.group = group
        group.members.append(self)
        limits = [m.max_overhead for m in group.members if m.max_overhead is not None]
        group.max_overhead = min(sum(limits), GROUP_OVERHEAD_FACTOR * max(limits)) if limits else None

    def spend(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        self.spent += seconds
        if self.group is not None:
            self.group.spent_by_all += seconds
            if self.max_overhead is not None:  # an unlimited member's time is not charged to the others
                self.group.spent += seconds

    def reserve(self, seconds: float) -> None:
        """What this member must still spend whatever the budget says (0 once it is spent)."""
        if self.group is not None:
            self.group.reserved[id(self)] = max(0.0, float(seconds))

    def training_seconds(self, now: Optional[float] = None) -> float:
        if self.started is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        spent = self.group.spent_by_all if self.group is not None else self.spent
        return max(0.0, now - self.started - spent)

    def left(
        self, epoch: int, max_epochs: Optional[int], reserve: float = 0.0, now: Optional[float] = None
    ) -> Optional[float]:
        """Seconds of optional work this budget (and its group) still allows after ``reserve``; None: no limit."""
        if self.max_overhead is None or self.started is None:
            return None
        trained = self.training_seconds(now)
        projected = trained
        if max_epochs is not None and max_epochs > epoch + 1 and epoch >= 0:
            projected = trained / (epoch + 1) * max_epochs
        left = self.max_overhead * projected - self.spent - reserve
        group = self.group
        if group is not None and group.max_overhead is not None:
            others = sum(v for k, v in group.reserved.items() if k != id(self))
            left = min(left, group.max_overhead * projected - group.spent - others - reserve)
        return left

    def allows(
        self,
        epoch: int,
        max_epochs: Optional[int],
        cost: float,
        reserve: float = 0.0,
        now: Optional[float] = None,
    ) -> bool:
        left = self.left(epoch, max_epochs, reserve, now)
        return left is None or cost <= left


#: lightning-lens callbacks of one trainer together use at most this many times the largest ``max_overhead`` among
#: them (and never more than the sum of their budgets): one callback 5 %, two or more together 10 % by default.
GROUP_OVERHEAD_FACTOR = 2.0

#: the group budget of each trainer's lightning-lens callbacks (see :class:`OverheadBudget`), created by the first
#: member's ``setup`` of each fit
_GROUP_BUDGETS: "weakref.WeakKeyDictionary[Any, OverheadBudget]" = weakref.WeakKeyDictionary()


def _join_group(trainer: Any, budget: OverheadBudget) -> None:
    try:
        group = _GROUP_BUDGETS.get(trainer)
    except TypeError:  # a trainer that cannot be weakly referenced (a test double): a group of its own
        group = None
    if group is None or budget in group.members:  # the first member of this fit, or a new fit
        group = OverheadBudget(None)
        group.start()
        try:
            _GROUP_BUDGETS[trainer] = group
        except TypeError:
            pass
    budget.join(group)


class LensCallback(Callback):
    """Base of the lightning-lens callbacks (see the module docstring).

    Args:
        every_n_epochs: run the periodic work every n-th epoch of fit (None: never during fit).
        max_overhead: the callback's time as a fraction of fit time it may use (None: no limit). The first and the
            last epoch of a fit always run; epochs in between are skipped when the budget is spent, with a log line.
        strict: re-raise exceptions from the callback's own work instead of reporting them and continuing.
        max_failures: failures in a row after which a part (one method, the rendering) is switched off.
        verbose: log :meth:`summary` at the end of fit (see the module docstring for the rule); also settable later as
            ``callback.verbose = False``.
    """

    #: ``Callback.state_key`` fields; subclasses override :meth:`_state_key_fields`.
    def __init__(
        self,
        *,
        every_n_epochs: Optional[int] = 1,
        max_overhead: Optional[float] = 0.05,
        strict: bool = False,
        max_failures: int = 3,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.verbose = check_bool(verbose, "verbose")
        self.run_epochs: list[int] = []  # epochs of fit whose periodic work was due (for the summary)
        self._summary_logged = False
        self.every_n_epochs = None if every_n_epochs is None else check_int(every_n_epochs, "every_n_epochs", 1)
        self.budget = OverheadBudget(max_overhead)
        self.strict = check_bool(strict, "strict")
        self.max_failures = check_int(max_failures, "max_failures", minimum=1)
        self.failures: dict[str, int] = {}  # part -> failures in a row
        self.disabled: set[str] = set()
        self.skipped_for_budget: list[int] = []  # epochs skipped to stay within max_overhead
        self.part_seconds: dict[str, float] = {}  # part -> seconds of its last successful run
        self._reported: set[tuple[str, str]] = set()
        self._warned: set[str] = set()
        self._depth = 0
        self._due: Optional[tuple[Any, int, bool]] = None
        self._first_epoch: Optional[int] = None
        self._run_cost = 0.0  # seconds of the last due epoch's work
        self._at_last = False  # the due epoch being decided is the fit's last
        self._dry_run_done = False

    # ------------------------------------------------------------------------------------------------ subclass wrapping
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _GUARDED_HOOKS:
            fn = cls.__dict__.get(hook)
            if fn is not None and not getattr(fn, "_lens_guarded", False):
                setattr(cls, hook, _guard_hook(fn, hook))
        fn = cls.__dict__.get("on_fit_end")
        if fn is not None and not getattr(fn, "_lens_summary_after", False):
            setattr(cls, "on_fit_end", _summary_after(fn))
        for hook in ("setup", "on_fit_start", "on_validation_start"):  # the base's part runs first, even when a subclass forgets super()
            fn = cls.__dict__.get(hook)
            if fn is not None and not getattr(fn, "_lens_base_first", False):
                setattr(cls, hook, _base_first(fn, getattr(LensCallback, hook)))

    # --------------------------------------------------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return type(self).__name__

    def _state_key_fields(self) -> dict[str, Any]:
        """Fields that tell two instances of the callback apart in a checkpoint."""
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_fields())

    # ------------------------------------------------------------------------------------------------------ setup hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._first_epoch = None
            self._due = None
            self.run_epochs = []
            self._summary_logged = False
            _join_group(trainer, self.budget)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._dry_run(trainer, pl_module)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "validate":
            self._dry_run(trainer, pl_module)

    def check_setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        """Check the configuration against the model and one validation batch (``None`` when there is no validation
        data). Raise ``TypeError``/``ValueError`` naming the argument and the fix; anything else is reported as a
        warning and the callback carries on."""

    def _dry_run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._dry_run_done:
            return
        self._dry_run_done = True
        start = time.perf_counter()
        try:
            batch = first_validation_batch(trainer, pl_module)
            self.check_setup(trainer, pl_module, batch)
        except (TypeError, ValueError):
            raise
        except Exception as err:
            if self.strict:
                raise
            self.warn_once(
                "dry_run",
                f"{self.name}: the check of its configuration on one validation batch failed with"
                f" {type(err).__name__}: {err}. Training continues; the callback will report failures as they occur.",
            )
        finally:  # the dry run is the callback's own work: it counts against max_overhead like any hook
            if not any(isinstance(cb, LensCallback) and not cb._dry_run_done for cb in getattr(trainer, "callbacks", ())):
                _FIRST_BATCHES.pop(trainer, None)  # the last dry run of this trainer: do not hold the batch
            self.budget.spend(time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------------------ due epochs
    def is_due(self, trainer: "pl.Trainer") -> bool:
        """Whether the periodic work runs in this epoch (see the module docstring). A collective under DDP: call it
        on every rank (the answer is cached per epoch, so calling it from several hooks costs one broadcast)."""
        if trainer.sanity_checking:
            return False
        fn = trainer.state.fn
        epoch = int(trainer.current_epoch)
        if self._due is not None and self._due[0] == fn and self._due[1] == epoch:
            return self._due[2]
        decision = self._decide(trainer, fn, epoch)
        if trainer.world_size > 1:
            decision = bool(trainer.strategy.broadcast(decision, src=0))
        self._due = (fn, epoch, decision)
        if decision and fn == "fit" and epoch not in self.run_epochs:
            self.run_epochs.append(epoch)
        return decision

    def _decide(self, trainer: "pl.Trainer", fn: Any, epoch: int) -> bool:
        if fn != "fit":
            return fn == "validate"
        if self.every_n_epochs is None:
            return False
        if self._first_epoch is None:
            self._first_epoch = epoch
        last = _last_epoch(trainer)
        self._at_last = last is not None and epoch >= last
        if epoch == self._first_epoch or self._at_last:
            return True
        if (epoch + 1) % self.every_n_epochs != 0:
            return False
        reserve = self.last_epoch_reserve() if last is not None and epoch < last else 0.0
        if self.budget.allows(epoch, None if last is None else last + 1, self._run_cost, reserve=reserve):
            return True
        self.skipped_for_budget.append(epoch)
        if trainer.is_global_zero:
            log.info(
                f"{self.name}: epoch {epoch} skipped to stay within max_overhead={self.budget.max_overhead:g} of fit"
                f" time (its work took {self._run_cost:.2f}s, {self.budget.spent:.1f}s spent so far over"
                f" {self.budget.training_seconds():.1f}s of training); raise max_overhead to run it"
            )
        return False

    def is_mandatory_epoch(self, trainer: "pl.Trainer") -> bool:
        """Whether the due work of this epoch runs whatever the budget says: the first and the last epoch of a fit,
        and every run outside fit (``trainer.validate()``). Call it after :meth:`is_due`."""
        if trainer.state.fn != "fit":
            return True
        return int(trainer.current_epoch) == self._first_epoch or self._at_last

    def record_run_cost(self, seconds: float) -> None:
        """The cost of one due epoch's work (used to decide whether the next one fits the budget); until the last
        epoch it is also this callback's reserve in the trainer's group budget (its last epoch must still run)."""
        self._run_cost = max(0.0, float(seconds))
        self.budget.reserve(0.0 if self._at_last or self.every_n_epochs is None else self.last_epoch_reserve())

    def last_epoch_reserve(self) -> float:
        """What the run at the last epoch will cost (kept free by the epochs before it): the last run's cost; a
        subclass whose runs vary (methods taking turns) returns the cost of its full run."""
        return self._run_cost

    # ------------------------------------------------------------------------------------------------- failure handling
    def run_part(
        self,
        trainer: "pl.Trainer",
        part: str,
        fn: Callable[..., T],
        *args: Any,
        collective: bool = False,
        hint: Optional[str] = None,
        **kwargs: Any,
    ) -> Optional[T]:
        """``fn(*args, **kwargs)``, or None if the part is disabled or fails (reported, counted).

        ``collective=True`` (call it on every rank, at the same point): the outcome is agreed over the ranks, so a
        failure on one rank returns None on all of them. ``hint`` is the fix shown with the failure.
        """
        if part in self.disabled:
            ok, result = False, None
        else:
            start = time.perf_counter()
            try:
                result, ok = fn(*args, **kwargs), True
            except Exception as err:  # the callback's own work: never the run's end
                if self.strict:
                    raise
                result, ok = None, False
                self._failed(trainer, part, err, hint)
            else:
                self.failures.pop(part, None)
                self.part_seconds[part] = time.perf_counter() - start
        if collective and trainer.world_size > 1:
            all_ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
            if ok and not all_ok:
                result = None
            ok = all_ok
        return result if ok else None

    def _failed(
        self, trainer: "pl.Trainer", part: str, err: BaseException, hint: Optional[str], switch_off: bool = True
    ) -> None:
        count = self.failures.get(part, 0) + 1
        self.failures[part] = count
        epoch = int(getattr(trainer, "current_epoch", -1))
        key = (part, type(err).__name__)
        if switch_off and count >= self.max_failures:
            self.disabled.add(part)
        if key in self._reported and part not in self.disabled:
            return
        self._reported.add(key)
        fix = hint or _known_fix(err)
        where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ is not None else []
        at = f" (at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
        message = (
            f"{self.name}: {part!r} failed at epoch {epoch} with {type(err).__name__}: {err}{at}."
            + (f" Fix: {fix}." if fix else "")
            + (
                f" {part!r} is now switched off after {count} failures in a row."
                if part in self.disabled
                else " Training continues; the rest of the callback still runs."
            )
            + " Pass strict=True to raise instead."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if trainer is not None and getattr(trainer, "is_global_zero", False):
            try:
                from lightning_lens.loggers import log_text

                log_text(trainer, f"lens_errors/{self.name}", message)
            except Exception:  # a logger that fails here must not turn one report into a second failure
                pass

    def warn_once(self, key: str, message: str) -> None:
        """A warning shown once per callback instance and ``key``."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=2)

    # --------------------------------------------------------------------------------------------------- console summary
    def summary(self) -> Optional[str]:
        """The callback's results in a few lines for the console at the end of fit, or None when there is nothing to
        report (subclasses override it; the base logs it, see the module docstring)."""
        return None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._log_summary(trainer)

    def _log_summary(self, trainer: "pl.Trainer") -> None:
        """Log :meth:`summary` once per fit on rank zero when the verbosity rule allows (a failure is reported like
        any part's and never ends the run)."""
        if self._summary_logged or not getattr(trainer, "is_global_zero", True):
            return
        self._summary_logged = True
        if not summaries_enabled(self.verbose):
            return
        text = self.run_part(trainer, "console summary", self.summary)
        if text:
            log.info(text)

    # ------------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "disabled": sorted(self.disabled)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.disabled = set(state_dict.get("disabled", ()))


def _guard_hook(fn: Callable[..., Any], hook: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def guarded(self: LensCallback, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> Any:
        outer = self._depth == 0
        self._depth += 1
        start = time.perf_counter()
        try:
            return fn(self, trainer, *args, **kwargs)
        except Exception as err:
            if self.strict or hook == "on_exception":
                raise
            self._failed(trainer, hook, err, None, switch_off=False)  # a hook is the whole callback: keep it on
            return None
        finally:
            self._depth -= 1
            if outer:
                self.budget.spend(time.perf_counter() - start)

    guarded._lens_guarded = True  # type: ignore[attr-defined]
    return guarded


def _summary_after(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A subclass's ``on_fit_end`` followed by the console summary (also when the subclass's hook failed)."""

    @functools.wraps(fn)
    def wrapper(self: LensCallback, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, trainer, *args, **kwargs)
        finally:
            self._log_summary(trainer)

    wrapper._lens_summary_after = True  # type: ignore[attr-defined]
    return wrapper


def summaries_enabled(verbose: bool = True) -> bool:
    """Whether end-of-fit summaries are logged: ``verbose`` and both the ``lightning_lens`` logger and Lightning's
    own logger enabled for INFO.

    Example:
        >>> summaries_enabled(verbose=False)
        False
    """
    return bool(verbose) and log.isEnabledFor(logging.INFO) and logging.getLogger(pl.__name__).isEnabledFor(
        logging.INFO)


def _base_first(fn: Callable[..., Any], base: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: LensCallback, *args: Any, **kwargs: Any) -> Any:
        if base is not fn:
            base(self, *args, **kwargs)
        return fn(self, *args, **kwargs)

    wrapper._lens_base_first = True  # type: ignore[attr-defined]
    return wrapper


def _last_epoch(trainer: "pl.Trainer") -> Optional[int]:
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is None or max_epochs < 0 or max_epochs > 10**6:
        return None
    return int(max_epochs) - 1


_FIXES = (
    ("out of memory", "lower num_probes or the methods' n_samples / n_steps, or set their batch_size"),
    ("Invalid artifact", "use a log_prefix of letters, digits, '-', '_' and '/'"),
)


def _known_fix(err: BaseException) -> Optional[str]:
    text = str(err)
    return next((fix for needle, fix in _FIXES if needle in text), None)


#: trainer -> ((fn, global step, module id), batch): the dry-run batch read once and shared by the callbacks of a
#: trainer (weak keys: nothing outlives the trainer)
_FIRST_BATCHES: "weakref.WeakKeyDictionary[Any, tuple[tuple[Any, int, int], Any]]" = weakref.WeakKeyDictionary()


def first_validation_batch(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
    """One batch of the first validation dataloader, on the module's device, or None when there is none.

    Read before the validation loop has set up its data (the dry run at ``on_fit_start``), through the loop's data
    source, which calls the ``val_dataloader`` hook of the datamodule or module or returns the loaders given to fit.
    The batch is read once per trainer and run (``fit`` or ``validate``, global step, module) and shared by every
    callback's dry run, so ``check_setup`` must not change it in place (take copies of what it modifies).
    """
    key = (trainer.state.fn, int(getattr(trainer, "global_step", 0)), id(pl_module))
    try:
        cached = _FIRST_BATCHES.get(trainer)
    except TypeError:  # a trainer that cannot be weakly referenced (a test double): no sharing
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    batch = _read_first_validation_batch(trainer, pl_module)
    try:
        _FIRST_BATCHES[trainer] = (key, batch)
    except TypeError:
        pass
    return batch


def _read_first_validation_batch(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
    loop = trainer.fit_loop.epoch_loop.val_loop if trainer.state.fn == "fit" else trainer.validate_loop
    try:
        loaders = getattr(trainer, "val_dataloaders", None)
        if loaders is None:
            source = loop._data_source
            if not source.is_defined():
                return None
            loaders = source.dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        elif isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        if loaders is None:
            return None
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its seed from the global RNG
            batch = next(iter(loaders))
    except StopIteration:
        return None
    except Exception as err:  # a private API that moved, or a loader that cannot be iterated early
        log.debug("lightning_lens: no validation batch for the dry run (%s)", err)
        return None
    device = getattr(pl_module, "device", torch.device("cpu"))
    return trainer.strategy.batch_to_device(batch, device) if hasattr(trainer, "strategy") else batch



def check_displayable(owner: str, what: str, image: torch.Tensor, denormalize: Any) -> None:
    """Raise a ValueError naming ``denormalize`` when ``image`` cannot be rendered (a setup check of the callbacks
    that draw their inputs)."""
    from lightning_lens.render import to_rgb_uint8

    try:
        to_rgb_uint8(image.detach().cpu(), denormalize=denormalize)
    except Exception as err:
        raise ValueError(
            f"{owner} cannot show {what} (shape {tuple(image.shape)}) as an image: {type(err).__name__}: {err};"
            " pass denormalize= mapping an input to a (C, H, W) image in [0, 1]"
        ) from err
