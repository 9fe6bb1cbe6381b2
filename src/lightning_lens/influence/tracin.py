"""TracIn over a run's checkpoints: which training examples are responsible for a prediction (Pruthi et al. 2020).

The influence of a training example ``z`` on a test example ``z'`` is the sum over checkpoints ``c`` of the learning
rate ``lr_c`` times the dot product of their loss gradients at the checkpoint's weights::

    TracInCP(z, z') = sum_c lr_c * grad L(w_c, z) . grad L(w_c, z')

Self-influence ``TracInCP(z, z)`` is large for examples the model found hard to fit, often label errors.

Reference: G. Pruthi, F. Liu, S. Kale, M. Sundararajan. *Estimating Training Data Influence by Tracing Gradient
Descent*. NeurIPS 2020. Captum implements the same scores offline (``TracInCP``, ``TracInCPFast``); the tests check
equality with it.

How it is computed here:

* **Per-example gradients** with ``torch.func``: ``vmap`` over ``grad`` of the loss of ``functional_call(model,
  checkpoint tensors, x)``, differentiated with respect to the parameters of ``layers`` only. The checkpoints are
  never loaded into the model and nothing is accumulated into ``.grad``: the model is left as it was (its modules
  are put in eval mode during the computation and restored).
* **Last-layer fast path** (:class:`TracInCPFast`, Captum's ``TracInCPFast``): the gradient of the loss with respect
  to the weight of a final linear layer is ``outer(dL/dz, a)`` (``z`` the layer's output, ``a`` its input), so the
  dot product of two such gradients factorises into ``(dL/dz . dL/dz') (a . a')``: one forward pass per example
  and checkpoint, no parameter gradients, no ``outputs x inputs`` matrix.
* **Random projection** (``projection_dim``): gradients are compressed with a sparse Johnson-Lindenstrauss
  transform (CountSketch: every gradient coordinate is added, with a random sign, to one of ``projection_dim``
  buckets; Charikar et al. 2002, the one-nonzero case of Kane & Nelson 2014). Dot products are unbiased with
  variance about ``(|g|^2 |g'|^2 + (g . g')^2) / projection_dim``, like a dense Gaussian projection, but the
  projection costs ``O(parameters)`` memory instead of ``O(parameters x projection_dim)``. The signs and buckets come
  from a private generator seeded by ``seed``.
* **Streaming**: training data (tensors, a ``Dataset`` or any iterable of batches such as a ``DataLoader``) is read
  once, batch by batch; per batch, every checkpoint's gradients are computed and dropped. Memory: the checkpoints'
  tensors (on the model's device while scoring), one batch of per-example gradients, and the test examples'
  gradients for every checkpoint. The global random state is left untouched (a ``DataLoader`` draws its seed from
  it; that draw happens inside ``torch.random.fork_rng``).
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_lens.influence.checkpoints import Checkpoint, load_checkpoint
from lightning_lens.utils.batch import BatchAccessor
from lightning_lens.utils.checks import check_instance, check_int, check_optional, check_positive_number
from lightning_lens.utils.modules import preserve_modes, resolve_module
from lightning_lens.utils.rng import global_rng_preserved

__all__ = ["BatchScores", "TestGradients", "TopInfluence", "TracInCP", "TracInCPFast", "global_rng_preserved"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
TrainData = Union[torch.Tensor, Iterable[Any]]


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of each example (``reduction="none"``)."""
    return F.cross_entropy(outputs, targets, reduction="none")


class TopInfluence(NamedTuple):
    """The ``k`` most influential training examples of each test example (proponents or opponents)."""

    indices: torch.Tensor  #: (n_test, k) positions in the training data (columns of :meth:`TracInCP.influence`)
    scores: torch.Tensor  #: (n_test, k) their influence scores, most extreme first


class BatchScores(NamedTuple):
    """TracIn scores of one batch of training examples."""

    self_influence: torch.Tensor  #: (batch,)
    influence: Optional[torch.Tensor]  #: (n_test, batch) on the prepared test examples, or None


class TestGradients:
    """The test examples' gradient features at every checkpoint (from :meth:`TracInCP.prepare`): computed once,
    reused for every training batch."""

    def __init__(self, features: list[Any], count: int) -> None:
        self.features = features
        self.count = count

    def __len__(self) -> int:
        return self.count


class TracInCP:
    """TracIn influence from checkpoints (see the module docstring; Pruthi et al. 2020).

    Args:
        model: the network (or LightningModule) the checkpoints belong to; ``model(x)`` gives the outputs the loss
            reads. It is never modified: checkpoints are applied with ``torch.func.functional_call``.
        checkpoints: state dicts or file paths (``torch.save(model.state_dict())``, Lightning ``.ckpt`` files, whose
            ``"state_dict"`` is read; a common key prefix such as ``"model."`` is stripped when ``model`` is the inner
            network, see :mod:`lightning_lens.influence.checkpoints`).
        learning_rates: one per checkpoint, or one for all; ``None`` reads each file's recorded learning rate (the
            first param group of a Lightning ``.ckpt``).
        layers: names of the submodules whose parameters the gradients cover (default: every parameter that
            requires grad).
        loss_fn: ``loss_fn(outputs, targets) -> (batch,)`` per-example losses (default: cross-entropy).
        projection_dim: compress gradients to this many dimensions with a sparse JL projection (default: exact).
        seed: seed of the projection's private generator.
        batch_size: batch size for training data given as tensors or as a ``Dataset``.
        accessor: reads inputs and targets from the batches of a ``DataLoader`` (default: ``(x, y)`` tuples or
            dicts with ``image``/``label``-like keys, see :class:`~lightning_lens.utils.BatchAccessor`).
        weights_only: passed to ``torch.load`` for checkpoint files (``False`` unpickles arbitrary objects: only for
            files you trust).
        chunk_size: examples per gradient computation (default: as many as fit ``max_gradient_elements``).
        max_gradient_elements: bound on the per-example gradient entries held at once (``checkpoints x examples x
            gradient size`` per ``vmap`` call; 2**21 floats = 8 MB); several checkpoints are batched into one call
            when they fit.

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> squared = lambda out, y: 0.5 * ((out - y) ** 2).sum(1)
        >>> tracin = TracInCP(model, [{"weight": torch.eye(2)}], learning_rates=0.5, loss_fn=squared)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2)
        >>> tracin.self_influence(x, y)  # 0.5 * |(Wx - y) x^T|^2
        tensor([0.5000, 8.0000])
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Checkpoint],
        learning_rates: Union[float, Sequence[float], None],
        layers: Optional[Sequence[str]] = None,
        loss_fn: Optional[LossFn] = None,
        projection_dim: Optional[int] = None,
        seed: int = 0,
        *,
        batch_size: int = 64,
        accessor: Optional[BatchAccessor] = None,
        weights_only: bool = True,
        chunk_size: Optional[int] = None,
        max_gradient_elements: int = 2**21,
    ) -> None:
        self.model = check_instance(model, "model", nn.Module)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable (outputs, targets) -> per-example losses, got {type(loss_fn).__name__}"
            )
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else per_example_cross_entropy
        self.projection_dim = check_optional(check_int, projection_dim, "projection_dim", minimum=1)
        self.seed = check_int(seed, "seed")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.accessor = check_instance(accessor, "accessor", BatchAccessor) if accessor is not None else BatchAccessor()
        self.chunk_size = check_optional(check_int, chunk_size, "chunk_size", minimum=1)
        self.layers = None if layers is None else _layer_names(layers)
        self._grad_names = self._parameter_names()
        self.checkpoints, recorded = self._load(checkpoints, weights_only)
        self.learning_rates = _learning_rates(learning_rates, recorded)
        self._device_cache: Optional[tuple[torch.device, dict[str, torch.Tensor]]] = None
        self.max_gradient_elements = check_int(max_gradient_elements, "max_gradient_elements", minimum=1)
        params = dict(self.model.named_parameters())
        self._gradient_size = sum(params[n].numel() for n in self._grad_names)
        if self.projection_dim is not None and self.projection_dim >= self._gradient_size:
            warnings.warn(
                f"projection_dim={self.projection_dim} is not smaller than the {self._gradient_size} gradient"
                " coordinates: the projection would only add noise, so the exact gradients are used",
                UserWarning,
                stacklevel=2,
            )
            self.projection_dim = None
        self._sketch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._vmap_failed = False
        self._loss_checked = False

    # ------------------------------------------------------------------------------------------------------- setup
    def _parameter_names(self) -> list[str]:
        params = dict(self.model.named_parameters())
        if self.layers is None:
            names = [n for n, p in params.items() if p.requires_grad]
        else:
            names = []
            for layer in self.layers:
                module = resolve_module(self.model, layer, "layers")
                prefix = f"{layer}." if layer else ""
                owned = [prefix + n for n, _ in module.named_parameters()]
                if not owned:
                    raise ValueError(f"layers: {layer!r} has no parameters; name modules with weights")
                names.extend(n for n in owned if n in params and n not in names)
        if not names:
            raise ValueError("the model has no parameters that require grad: nothing to take gradients of")
        return names

    def _load(
        self, checkpoints: Sequence[Checkpoint], weights_only: bool
    ) -> tuple[list[dict[str, torch.Tensor]], list[Optional[float]]]:
        if isinstance(checkpoints, (str, Mapping)) or not isinstance(checkpoints, Iterable):
            raise TypeError(
                "checkpoints must be a list of state dicts or checkpoint file paths, got"
                f" {type(checkpoints).__name__}; wrap a single one in a list"
            )
        loaded, rates = [], []
        for i, checkpoint in enumerate(list(checkpoints)):
            tensors, lr = load_checkpoint(self.model, checkpoint, weights_only, argument=f"checkpoints[{i}]")
            loaded.append(tensors)
            rates.append(lr)
        if not loaded:
            raise ValueError("checkpoints is empty; pass at least one state dict or checkpoint file")
        return loaded, rates

    def __len__(self) -> int:
        return len(self.checkpoints)

    # -------------------------------------------------------------------------------------------------- public API
    def self_influence(self, inputs: TrainData, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Self-influence ``sum_c lr_c |grad L(w_c, z)|^2`` of every example: ``(n,)`` on the CPU.

        ``inputs`` are tensors (with ``targets``), a ``Dataset`` or an iterable of batches (``targets=None``).
        """
        parts = [s.self_influence for _, s in self._stream(inputs, targets, None)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def influence(
        self,
        test_inputs: torch.Tensor,
        test_targets: torch.Tensor,
        train_inputs: TrainData,
        train_targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Influence of every training example on every test example: ``(n_test, n_train)`` on the CPU."""
        test = self.prepare(test_inputs, test_targets)
        parts = [s.influence for _, s in self._stream(train_inputs, train_targets, test)]
        return torch.cat(parts, dim=1) if parts else torch.zeros(len(test), 0)

    def proponents(
        self,
        test_inputs: torch.Tensor,
        test_targets: torch.Tensor,
        train_inputs: TrainData,
        train_targets: Optional[torch.Tensor] = None,
        k: int = 5,
    ) -> TopInfluence:
        """The ``k`` training examples with the highest influence on each test example (streamed: the full matrix is
        never held)."""
        return self._top(test_inputs, test_targets, train_inputs, train_targets, k, largest=True)

    def opponents(
        self,
        test_inputs: torch.Tensor,
        test_targets: torch.Tensor,
        train_inputs: TrainData,
        train_targets: Optional[torch.Tensor] = None,
        k: int = 5,
    ) -> TopInfluence:
        """The ``k`` training examples with the lowest (most negative) influence on each test example."""
        return self._top(test_inputs, test_targets, train_inputs, train_targets, k, largest=False)

    def prepare(self, test_inputs: torch.Tensor, test_targets: torch.Tensor) -> TestGradients:
        """The test examples' gradient features at every checkpoint, for :meth:`score_batch`."""
        x, y = self._check_pair(test_inputs, test_targets, "test_inputs", "test_targets")
        n = int(x.shape[0])
        parts: list[list[Any]] = [[] for _ in self.checkpoints]
        with self._scoring():
            for c0, c1, r0, r1 in self._blocks(n):
                for c, features in enumerate(self._features(c0, c1, x[r0:r1], y[r0:r1]), start=c0):
                    parts[c].append(features)
        return TestGradients([self._concat(p) for p in parts], n)

    def score_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor, test: Optional[TestGradients] = None
    ) -> BatchScores:
        """Self-influence of one batch of training examples and, with ``test``, their influence on the prepared test
        examples; one gradient computation per checkpoint serves both. CPU tensors."""
        x, y = self._check_pair(inputs, targets, "inputs", "targets")
        with self._scoring():
            return self._score(x, y, test)

    # ------------------------------------------------------------------------------------------------- internals
    def _score(self, x: torch.Tensor, y: torch.Tensor, test: Optional[TestGradients]) -> BatchScores:
        n = int(x.shape[0])
        self_influence = torch.zeros(n, dtype=torch.float32, device=x.device)
        influence = None if test is None else torch.zeros(len(test), n, dtype=torch.float32, device=x.device)
        for c0, c1, r0, r1 in self._blocks(n):
            for c, features in enumerate(self._features(c0, c1, x[r0:r1], y[r0:r1]), start=c0):
                lr = self.learning_rates[c]
                self_influence[r0:r1] += lr * self._squared_norm(features).float()
                if test is not None and influence is not None:
                    influence[:, r0:r1] += lr * self._dot(test.features[c], features).float()
        return BatchScores(self_influence.cpu(), None if influence is None else influence.cpu())

    def _blocks(self, n: int) -> Iterator[tuple[int, int, int, int]]:
        """``(first checkpoint, end, first row, end)`` of each gradient computation: as many checkpoints and rows
        per call as keep ``checkpoints x rows x gradient size`` within :attr:`max_gradient_elements` (``vmap`` over
        checkpoints too, which saves the per-call overhead of small models), at least one of each."""
        size = max(1, self._gradient_size)
        per_call = max(1, self.max_gradient_elements // size)
        rows = self.chunk_size or min(n, per_call)
        group = max(1, min(len(self.checkpoints), per_call // max(1, rows)))
        for c0 in range(0, len(self.checkpoints), group):
            for r0 in range(0, n, rows):
                yield c0, min(c0 + group, len(self.checkpoints)), r0, min(r0 + rows, n)

    def _top(
        self,
        test_inputs: torch.Tensor,
        test_targets: torch.Tensor,
        train_inputs: TrainData,
        train_targets: Optional[torch.Tensor],
        k: int,
        largest: bool,
    ) -> TopInfluence:
        k = check_int(k, "k", minimum=1)
        test = self.prepare(test_inputs, test_targets)
        best_scores = torch.zeros(len(test), 0)
        best_indices = torch.zeros(len(test), 0, dtype=torch.long)
        for start, scores in self._stream(train_inputs, train_targets, test):
            block = scores.influence
            assert block is not None
            positions = torch.arange(start, start + block.shape[1]).expand(len(test), -1)
            best_scores = torch.cat([best_scores, block], dim=1)
            best_indices = torch.cat([best_indices, positions], dim=1)
            keep = min(k, best_scores.shape[1])
            best_scores, order = best_scores.topk(keep, dim=1, largest=largest)
            best_indices = best_indices.gather(1, order)
        return TopInfluence(best_indices, best_scores)

    def _stream(
        self, inputs: TrainData, targets: Optional[torch.Tensor], test: Optional[TestGradients]
    ) -> Iterator[tuple[int, BatchScores]]:
        start = 0
        with self._scoring():
            for x, y in self._batches(inputs, targets):
                scores = self._score(x, y, test)
                yield start, scores
                start += int(x.shape[0])

    def _batches(self, inputs: TrainData, targets: Optional[torch.Tensor]) -> Iterator[tuple[torch.Tensor, Any]]:
        device = self._device()
        if isinstance(inputs, torch.Tensor):
            x_all, y_all = self._check_pair(inputs, targets, "train_inputs", "train_targets", move=False)
            for i in range(0, int(x_all.shape[0]), self.batch_size):
                yield x_all[i : i + self.batch_size].to(device), y_all[i : i + self.batch_size].to(device)
            return
        if targets is not None:
            raise ValueError(
                "train_targets must be None when the training data is a Dataset or an iterable of batches (the"
                " targets are read from the batches); pass tensors to give the targets separately"
            )
        if isinstance(inputs, torch.utils.data.Dataset) and not isinstance(inputs, torch.utils.data.IterableDataset):
            if not hasattr(inputs, "__len__"):
                raise TypeError("a map-style Dataset given as training data must have __len__")
            inputs = torch.utils.data.DataLoader(inputs, batch_size=self.batch_size, shuffle=False)
        if not isinstance(inputs, Iterable):
            raise TypeError(
                f"the training data must be a tensor (with targets), a Dataset or an iterable of batches, got"
                f" {type(inputs).__name__}"
            )
        # a DataLoader draws its base seed, a shuffling sampler its permutation, from the global generators (at the
        # first batch): the training that goes on after this must see them untouched
        with global_rng_preserved():
            for batch in inputs:
                x, y = self.accessor.inputs(batch), self.accessor.targets(batch)
                if y is None:
                    raise ValueError(
                        "the training batches hold no targets; set accessor=BatchAccessor(target_key=...)"
                    )
                yield x.to(device), y.to(device)

    def _check_pair(
        self, inputs: Any, targets: Any, input_name: str, target_name: str, move: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"{input_name} must be a tensor (batch, ...), got {type(inputs).__name__}")
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{target_name} must be a tensor with one target per example, got {type(targets).__name__}")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"{input_name} is empty (shape {tuple(inputs.shape)})")
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{target_name} must hold one target per example: {inputs.shape[0]} inputs, targets of shape"
                f" {tuple(targets.shape)}"
            )
        if move:
            device = self._device()
            inputs, targets = inputs.to(device), targets.to(device)
        return inputs, targets

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def _stacked(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The checkpoints' tensors on ``device``, stacked: ``name -> (checkpoints, *shape)`` (cached; names that some
        checkpoint lacks, such as non-persistent buffers, keep the model's own value)."""
        if self._device_cache is None or self._device_cache[0] != device:
            self._device_cache = None  # one device at a time
            names = [n for n in self.checkpoints[0] if all(n in ckpt for ckpt in self.checkpoints)]
            stacked = {n: torch.stack([ckpt[n] for ckpt in self.checkpoints]).to(device) for n in names}
            self._device_cache = (device, stacked)
        return self._device_cache[1]

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        """Eval mode (restored after), gradients on (also inside ``no_grad``/``inference_mode`` callers)."""
        with preserve_modes(self.model, mode=False), torch.inference_mode(False), torch.enable_grad():
            yield

    # --------------------------------------------------------------------------------------- gradient features
    def _features(self, c0: int, c1: int, x: torch.Tensor, y: torch.Tensor) -> list[Any]:
        """Per-example gradients of the loss w.r.t. the parameters of ``layers`` at checkpoints ``c0..c1-1``: per
        checkpoint, a list of ``(batch, parameter size)`` matrices (one ``(batch, projection_dim)`` when projected)."""
        x, y = _plain(x), _plain(y)
        stacked = self._stacked(x.device)
        self._check_loss({n: t[c0] for n, t in stacked.items()}, x, y)
        trained = {n: stacked[n][c0:c1] for n in self._grad_names}
        rest = {n: t[c0:c1] for n, t in stacked.items() if n not in trained}

        def loss_one(
            weights: dict[str, torch.Tensor], others: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(self.model, (others, weights), (xi.unsqueeze(0),), strict=False)
            return self.loss_fn(out, yi.unsqueeze(0)).sum()

        per_example = grad(loss_one)
        grads = None
        if not self._vmap_failed:
            try:  # over checkpoints (outer) and examples (inner): one call for the whole block
                over_examples = vmap(per_example, in_dims=(None, None, 0, 0))
                grads = vmap(over_examples, in_dims=(0, 0, None, None))(trained, rest, x, y)
            except Exception as err:  # a forward vmap cannot batch (data-dependent control flow, some in-place ops)
                self._vmap_failed = True
                warnings.warn(
                    f"TracInCP: vmap over the model failed ({type(err).__name__}: {err}); per-example gradients are"
                    " computed one example at a time (correct, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if grads is None:
            rows = [
                [per_example({n: t[g] for n, t in trained.items()}, {n: t[g] for n, t in rest.items()}, x[i], y[i])
                 for i in range(int(x.shape[0]))]
                for g in range(c1 - c0)
            ]
            grads = {n: torch.stack([torch.stack([r[n] for r in row]) for row in rows]) for n in self._grad_names}
        groups, n = c1 - c0, int(x.shape[0])
        if self.projection_dim is None:
            # one (rows, parameter size) view per parameter: no concatenated copy of the gradients
            blocks = [grads[name].detach().reshape(groups, n, -1) for name in self._grad_names]
            return [[b[g] for b in blocks] for g in range(groups)]
        projected = self._project(grads, groups * n).reshape(groups, n, -1)
        return [[projected[g]] for g in range(groups)]

    @staticmethod
    def _concat(parts: list[Any]) -> Any:
        return [torch.cat(blocks, dim=0) for blocks in zip(*parts)]

    def _check_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        if self._loss_checked:
            return
        with torch.no_grad():
            out = functional_call(self.model, params, (x[:2],), strict=False)
            losses = self.loss_fn(out, y[:2])
        if not isinstance(losses, torch.Tensor) or losses.shape != (min(2, int(x.shape[0])),):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return one loss per example, shape (batch,), got {got} for a batch of"
                f" {min(2, int(x.shape[0]))}; use reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
            )
        self._loss_checked = True

    def _project(self, grads: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        k = int(self.projection_dim or 0)
        out: Optional[torch.Tensor] = None
        for name in self._grad_names:
            g = grads[name].detach().reshape(n, -1)  # (checkpoints x examples, parameter size)
            buckets, signs = self._sketch_of(name, g.shape[1], g.device)
            part = torch.zeros(n, k, dtype=g.dtype, device=g.device).index_add_(1, buckets, g * signs)
            out = part if out is None else out + part
        assert out is not None
        return out

    def _sketch_of(self, name: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._sketch:
            # one generator per parameter, seeded from (seed, position): the same sketch however the batches come
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._grad_names.index(name))
            buckets = torch.randint(0, int(self.projection_dim or 1), (size,), generator=gen)
            signs = torch.randint(0, 2, (size,), generator=gen).float() * 2 - 1
            self._sketch[name] = (buckets, signs)
        buckets, signs = self._sketch[name]
        return buckets.to(device), signs.to(device)

    @staticmethod
    def _squared_norm(features: list[torch.Tensor]) -> torch.Tensor:
        return sum(torch.linalg.vecdot(f, f) for f in features)  # type: ignore[return-value]

    @staticmethod
    def _dot(test: list[torch.Tensor], train: list[torch.Tensor]) -> torch.Tensor:
        return sum(t @ f.T for t, f in zip(test, train))  # type: ignore[return-value]


class TracInCPFast(TracInCP):
    """TracIn on the weight of one final linear layer, factorised (Captum's ``TracInCPFast``; Pruthi et al. 2020,
    section 3.2): ``grad_W L = outer(dL/dz, a)`` for ``z = W a + b``, so ``grad_W L . grad_W L' = (dL/dz . dL/dz')
    (a . a')`` and ``|grad_W L|^2 = |dL/dz|^2 |a|^2``. Needs one forward pass per example and checkpoint; the bias is
    left out, as in Captum.

    Args:
        model, checkpoints, learning_rates, loss_fn, seed, batch_size, accessor, weights_only: as for
            :class:`TracInCP`.
        final_layer: the name of the ``nn.Linear`` whose weight the gradients cover (its input must be
            ``(batch, features)``).

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> squared = lambda out, y: 0.5 * ((out - y) ** 2).sum(1)
        >>> fast = TracInCPFast(model, "", [{"weight": torch.eye(2)}], learning_rates=0.5, loss_fn=squared)
        >>> fast.self_influence(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2))
        tensor([0.5000, 8.0000])
    """

    def __init__(
        self,
        model: nn.Module,
        final_layer: str,
        checkpoints: Sequence[Checkpoint],
        learning_rates: Union[float, Sequence[float], None],
        loss_fn: Optional[LossFn] = None,
        seed: int = 0,
        *,
        batch_size: int = 64,
        accessor: Optional[BatchAccessor] = None,
        weights_only: bool = True,
    ) -> None:
        check_instance(final_layer, "final_layer", str, hint="the dotted name of the final nn.Linear, e.g. 'fc'")
        layer = resolve_module(check_instance(model, "model", nn.Module), final_layer, "final_layer")
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"final_layer={final_layer!r} is a {type(layer).__name__}; the factorisation needs an nn.Linear (use"
                " TracInCP(layers=[...]) for other layers)"
            )
        self.final_layer = final_layer
        self._final = layer
        super().__init__(
            model, checkpoints, learning_rates, layers=[final_layer], loss_fn=loss_fn, projection_dim=None,
            seed=seed, batch_size=batch_size, accessor=accessor, weights_only=weights_only,
        )
        self._grad_names = [f"{final_layer}.weight" if final_layer else "weight"]

    def _blocks(self, n: int) -> Iterator[tuple[int, int, int, int]]:
        yield 0, len(self.checkpoints), 0, n  # no parameter gradients are formed: memory is batch x (out + in)

    def _features(self, c0: int, c1: int, x: torch.Tensor, y: torch.Tensor) -> list[Any]:
        """``(dL/dz (batch, out), a (batch, in))`` at the final layer, for checkpoints ``c0..c1-1``."""
        x, y = _plain(x), _plain(y)
        stacked = self._stacked(x.device)
        return [self._factors({n: t[c] for n, t in stacked.items()}, x, y) for c in range(c0, c1)]

    def _factors(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            a = args[0]
            if a.dim() != 2 or output.dim() != 2:
                raise ValueError(
                    f"final_layer={self.final_layer!r} sees inputs of shape {tuple(a.shape)}; the factorisation needs"
                    " (batch, features) (use TracInCP(layers=[...]) for sequence or spatial outputs)"
                )
            z = output.detach().requires_grad_(True)  # cut the graph here: nothing upstream is differentiated
            captured["a"], captured["z"] = a.detach(), z
            return z

        handle = self._final.register_forward_hook(capture)
        try:
            out = functional_call(self.model, params, (x,), strict=False)
            losses = self.loss_fn(out, y)
            if not isinstance(losses, torch.Tensor) or losses.shape != (int(x.shape[0]),):
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(
                    f"loss_fn must return one loss per example, shape (batch,), got {got}; use reduction='none'"
                )
            if "z" not in captured:
                raise ValueError(f"final_layer={self.final_layer!r} was not called in the model's forward")
            (g,) = torch.autograd.grad(losses.sum(), captured["z"])
        finally:
            handle.remove()
        return g.detach(), captured["a"]

    @staticmethod
    def _concat(parts: list[Any]) -> Any:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @staticmethod
    def _squared_norm(features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        g, a = features
        return (g * g).sum(1) * (a * a).sum(1)

    @staticmethod
    def _dot(test: tuple[torch.Tensor, torch.Tensor], train: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (test[0] @ train[0].T) * (test[1] @ train[1].T)


# ------------------------------------------------------------------------------------------------------------ helpers
def _plain(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor (an inference-mode tensor from ``trainer.validate()`` cannot enter autograd)."""
    return t.clone() if t.is_inference() else t


def _layer_names(layers: Any) -> list[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"layers must be a list of module names (e.g. ['fc']) or None, got {layers!r}")
    if not layers:
        raise ValueError("layers is empty; pass None for every parameter or a list of module names")
    return list(layers)


def _learning_rates(learning_rates: Any, recorded: list[Optional[float]]) -> list[float]:
    n = len(recorded)
    if learning_rates is None:
        missing = [i for i, lr in enumerate(recorded) if lr is None]
        if missing:
            raise ValueError(
                f"learning_rates=None reads the learning rate recorded in each checkpoint, but checkpoints{missing}"
                " record none (only Lightning .ckpt files and dicts with 'learning_rate' do); pass learning_rates="
            )
        rates = [float(lr) for lr in recorded if lr is not None]
    elif isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
        rates = [float(learning_rates)] * n
    elif isinstance(learning_rates, Sequence) and not isinstance(learning_rates, str):
        rates = list(learning_rates)
        if len(rates) != n:
            raise ValueError(f"learning_rates has {len(rates)} entries for {n} checkpoints; give one per checkpoint")
    else:
        raise TypeError(
            f"learning_rates must be a number, a list with one per checkpoint or None, got"
            f" {type(learning_rates).__name__}"
        )
    out = [check_positive_number(lr, f"learning_rates[{i}]") for i, lr in enumerate(rates)]
    if not all(math.isfinite(lr) for lr in out):  # pragma: no cover - check_positive_number refuses inf
        raise ValueError("learning_rates must be finite")
    return out
