"""Small synthetic concept data sets in the style of torch_explain's (``xor``, ``trigonometry``, ``dot``).

Each generator returns ``(x, concepts, y)``: float tensors of shapes ``(n, features)``, ``(n, concepts)`` with 0/1
entries and ``(n, 1)`` with a 0/1 binary task label, exactly the layout of ``torch_explain.datasets``. Feed them to a
``TensorDataset(x, c, y)``: :class:`~lightning_lens.interpretable_models.ConceptBottleneckModule` reads tuple batches
in that ``(x, c, y)`` order.

Definitions are those of torch_explain (Espinosa Zarlenga et al. 2022 use them as the CEM toy tasks), re-implemented
with a private ``numpy.random.Generator`` so that the global NumPy state is never touched. Two differences on purpose:
the draws come from one seeded generator (torch_explain reseeds the global RNG, and its ``dot`` ignores
``random_state``), so the same seed gives the same data but not torch_explain's exact numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_lens.utils.checks import check_int

__all__ = ["make_dot", "make_trigonometry", "make_xor"]


def _check_size(n: int, seed: int) -> None:
    check_int(n, "n", minimum=1)
    check_int(seed, "seed", minimum=0)


def _tensors(x: np.ndarray, c: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(x, dtype=torch.float32),
        torch.as_tensor(c, dtype=torch.float32),
        torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1),
    )


def make_xor(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XOR of two thresholded uniforms.

    ``x ~ U(0, 1)^2``; concepts ``c_i = [x_i > 0.5]``; task ``y = c_0 XOR c_1``. The concepts are the inputs'
    thresholds, so a concept bottleneck is lossless here while the task is not linearly separable in ``x``.

    Args:
        n: number of samples.
        seed: seed of the private generator.

    Returns:
        ``x`` (n, 2), ``concepts`` (n, 2), ``y`` (n, 1).

    Example:
        >>> x, c, y = make_xor(4, seed=0)
        >>> bool(((x > 0.5).float() == c).all()), bool((y[:, 0] == (c[:, 0] != c[:, 1]).float()).all())
        (True, True)
    """
    _check_size(n, seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, 2))
    c = x > 0.5
    y = np.logical_xor(c[:, 0], c[:, 1])
    return _tensors(x, c, y)


def make_trigonometry(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three latent normals seen through sines and cosines.

    Latents ``h = (a, b, d) ~ N(0, 2^2)^3`` (standard deviation 2). Seven features
    ``[sin a + a, cos a + a, sin b + b, cos b + b, sin d + d, cos d + d, a^2 + b^2 + d^2]``; concepts
    ``[a > 0, b > 0, d > 0]``; task ``y = [a + b + d > 1]``. The concepts do not determine the task (the sum's
    magnitude matters), so a pure concept bottleneck loses accuracy here: the classic leakage/CEM toy case.

    Returns:
        ``x`` (n, 7), ``concepts`` (n, 3), ``y`` (n, 1).

    Example:
        >>> x, c, y = make_trigonometry(5, seed=1)
        >>> tuple(x.shape), tuple(c.shape), tuple(y.shape)
        ((5, 7), (5, 3), (5, 1))
    """
    _check_size(n, seed)
    rng = np.random.default_rng(seed)
    h = rng.normal(0.0, 2.0, size=(n, 3))
    a, b, d = h[:, 0], h[:, 1], h[:, 2]
    x = np.stack(
        [np.sin(a) + a, np.cos(a) + a, np.sin(b) + b, np.cos(b) + b, np.sin(d) + d, np.cos(d) + d, a**2 + b**2 + d**2],
        axis=1,
    )
    c = h > 0
    y = (a + b + d) > 1
    return _tensors(x, c, y)


def make_dot(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign of a dot product between two hidden 2-D vectors.

    ``v1, v3 ~ N(0, 2^2)^2`` independently. Features ``x = [v1 + v3, v1 - v3]`` (4 values); concepts
    ``[v1 . (1, 1) > 0, v3 . (-1, -1) > 0]``; task ``y = [v1 . v3 > 0]``. The concepts (signs along the diagonal)
    predict the task only in part, another case where soft concepts leak.

    Returns:
        ``x`` (n, 4), ``concepts`` (n, 2), ``y`` (n, 1).

    Example:
        >>> x, c, y = make_dot(3, seed=0)
        >>> tuple(x.shape), tuple(c.shape), tuple(y.shape)
        ((3, 4), (3, 2), (3, 1))
    """
    _check_size(n, seed)
    rng = np.random.default_rng(seed)
    v1 = rng.normal(0.0, 2.0, size=(n, 2))
    v3 = rng.normal(0.0, 2.0, size=(n, 2))
    x = np.hstack([v1 + v3, v1 - v3])
    c = np.stack([v1 @ np.ones(2) > 0, v3 @ -np.ones(2) > 0], axis=1)
    y = (v1 * v3).sum(axis=1) > 0
    return _tensors(x, c, y)
