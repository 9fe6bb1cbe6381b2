"""SmoothGrad (Smilkov et al., 2017), SmoothGrad-Squared (Hooker et al., 2019) and VarGrad (Adebayo et al., 2018)."""

from __future__ import annotations

import os
from typing import Literal, Optional

import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, resolve_batch_size
from lightning_lens.attribution.base import Attribution, Target, check_inputs, forward_logits, input_gradients
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_choice, check_int

Variant = Literal["mean", "squared", "var"]
_VARIANTS = ("mean", "squared", "var")


def _check_seed(seed: Optional[int]) -> Optional[int]:
    return None if seed is None else check_int(seed, "seed")


def private_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    """A generator on ``device``: seeded with ``seed``, or from OS entropy when ``seed`` is None (global RNG untouched)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    return gen


class SmoothGrad(Attribution):
    """Gradients averaged over noisy copies of the input.

    For each example, ``n_samples`` copies ``x + eps`` with ``eps ~ N(0, sigma^2)`` and
    ``sigma = noise_level * (max(x) - min(x))`` (max and min over that example's elements) are differentiated for the
    target class, which is resolved once on the clean input. ``variant`` picks the statistic of the per-sample
    gradients ``g``: ``"mean"`` E[g] (SmoothGrad), ``"squared"`` E[g^2] (SmoothGrad-Squared), ``"var"``
    E[g^2] - E[g]^2 (VarGrad). With ``abs=True`` each sample's gradient is replaced by its absolute value before the
    statistic (as Captum's NoiseTunnel over ``Saliency(abs=True)``).

    References: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017; Hooker et al., "A Benchmark for
    Interpretability Methods in Deep Neural Networks", NeurIPS 2019; Adebayo et al., "Local Explanation Methods for
    Deep Neural Networks Lack Sensitivity to Parameter Values", ICLR workshop 2018.

    Args:
        model: the classifier.
        n_samples: noisy copies per example (default 50, as in Smilkov et al. and Adebayo et al.).
        noise_level: noise standard deviation as a fraction of each example's value range (default 0.15).
        variant: ``"mean"``, ``"squared"`` or ``"var"``.
        batch_size: most rows per forward pass; ``None`` picks whole samples of the batch within a budget of
            ``2**16`` input elements per pass (32 rows, one sample, for a batch of 32 images of 3x32x32). Results do not
            depend on it.
        seed: noise seed. With an int, every call draws the same noise for the same input shape, so maps are
            reproducible (and comparable across models, as randomization sanity checks need). ``None`` draws fresh
            noise from OS entropy on each call. Noise always comes from a private ``torch.Generator``.
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> sg = SmoothGrad(model, n_samples=10)
        >>> torch.allclose(sg.attribute(torch.randn(4, 3), target=0), model.weight[0].expand(4, 3))
        True
    """

    name = "smoothgrad"

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 50,
        noise_level: float = 0.15,
        variant: Variant = "mean",
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode)
        self.n_samples = check_int(n_samples, "n_samples", minimum=1)
        self.noise_level = self._check_noise_level(noise_level)
        self.variant = check_choice(variant, "variant", _VARIANTS)
        self.batch_size = check_batch_size(batch_size)
        self.seed = _check_seed(seed)

    @property
    def name(self) -> str:  # type: ignore[override]
        return {"mean": "smoothgrad", "squared": "smoothgrad_squared", "var": "vargrad"}[self.variant]

    @staticmethod
    def _check_noise_level(noise_level: float) -> float:
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not noise_level >= 0:
            raise ValueError(f"noise_level must be a float >= 0 (fraction of each input's range), got {noise_level!r}")
        return float(noise_level)

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Target = None,
        *,
        abs: bool = False,
        n_samples: Optional[int] = None,
        noise_level: Optional[float] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        """SmoothGrad attributions, shaped like ``inputs``; keyword options override the constructor's for this call.

        Args:
            inputs: a floating-point batch ``(B, ...)``.
            target: an int, ``B`` class indices, or ``None`` for the classes predicted on the clean inputs.
            abs: take each sample gradient's absolute value before averaging.
            n_samples, noise_level, batch_size, seed: as in the constructor.
        """
        inputs = check_inputs(inputs)
        n = self.n_samples if n_samples is None else check_int(n_samples, "n_samples", minimum=1)
        level = self.noise_level if noise_level is None else self._check_noise_level(noise_level)
        rows = check_batch_size(batch_size) if batch_size is not None else self.batch_size
        seed = self.seed if seed is None else _check_seed(seed)
        with self.explaining():
            return self._smooth(inputs, target, n, level, rows, seed, abs)

    def _smooth(
        self,
        inputs: torch.Tensor,
        target: Target,
        n: int,
        level: float,
        batch_size: Optional[int],
        seed: Optional[int],
        absolute: bool,
    ) -> torch.Tensor:
        x = inputs.detach()
        batch, shape = x.shape[0], x.shape[1:]
        with torch.no_grad():
            resolved = resolve_target(target, forward_logits(self.model, x.clone()))
            flat = x.reshape(batch, -1)
            sigma = (level * (flat.max(dim=1).values - flat.min(dim=1).values)).view(batch, *([1] * len(shape)))
        gen = private_generator(seed, x.device)
        rows = resolve_batch_size(batch_size, batch, x[0].numel())

        # running per-example statistics of the sample gradients, merged block by block (Chan et al.'s parallel
        # update): exact for constant gradients, and independent of how the samples are split into blocks
        mean = torch.zeros_like(x)
        m2 = torch.zeros_like(x)
        count = torch.zeros(batch, dtype=torch.long)
        current, noisy_batch = -1, x  # the noisy copy of the whole batch for sample `current`, drawn in sample order
        for blk in blocks(n, batch, rows):
            k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
            noisy = torch.empty((k, width, *shape), dtype=x.dtype, device=x.device)
            for j, s in enumerate(range(blk.s0, blk.s1)):
                if s != current:
                    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                    noisy_batch, current = noise.mul_(sigma).add_(x), s
                noisy[j] = noisy_batch[blk.b0 : blk.b1]
            noisy = noisy.view(k * width, *shape)
            grads, _, _ = input_gradients(self.model, noisy, resolved[blk.b0 : blk.b1].repeat(k), owned=True)
            grads = grads.view(k, width, *shape)
            if absolute:
                grads = grads.abs()
            block_mean = grads.mean(dim=0)
            seen = int(count[blk.b0])  # every example of a block has seen the same number of samples
            total = seen + k
            delta = block_mean - mean[blk.b0 : blk.b1]
            mean[blk.b0 : blk.b1] += delta * (k / total)
            if self.variant != "mean":
                block_m2 = (grads - block_mean).square().sum(dim=0)
                m2[blk.b0 : blk.b1] += block_m2 + delta.square() * (seen * k / total)
            count[blk.b0 : blk.b1] = total
        if self.variant == "mean":
            return mean
        variance = m2 / n
        return variance + mean.square() if self.variant == "squared" else variance


class VarGrad(SmoothGrad):
    """VarGrad: the variance of the gradient over noisy copies of the input, ``SmoothGrad(variant="var")``.

    Adebayo et al., "Local Explanation Methods for Deep Neural Networks Lack Sensitivity to Parameter Values",
    ICLR workshop 2018. Arguments as :class:`SmoothGrad`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> VarGrad(model, n_samples=8).attribute(torch.randn(2, 3), target=0).abs().max() < 1e-6
        tensor(True)
    """

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 50,
        noise_level: float = 0.15,
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, n_samples, noise_level, "var", batch_size, seed, eval_mode=eval_mode)
