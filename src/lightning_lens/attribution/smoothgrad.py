"""SmoothGrad (Smilkov et al., 2017), SmoothGrad-Squared (Hooker et al., 2019) and VarGrad (Adebayo et al., 2018)."""

from __future__ import annotations

import os
from typing import Literal, Optional

import torch
from torch import nn

from lightning_lens.attribution._batching import blocks, check_batch_size, logits_in_blocks, resolve_batch_size
from lightning_lens.attribution.base import Attribution, Target, input_gradients
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_choice, check_int
from lightning_lens.utils.targets import per_example_target

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
    target class, which is resolved once on the clean input (``target=None``; a given target costs no extra pass). ``variant`` picks the statistic of the per-sample
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

    call_options = ("n_samples", "noise_level", "batch_size", "seed")
    handles_abs = True

    def _check_option(self, key: str, value: object) -> object:
        if key == "n_samples":
            return check_int(value, "n_samples", minimum=1)
        if key == "noise_level":
            return self._check_noise_level(value)  # type: ignore[arg-type]
        if key == "batch_size":
            return check_batch_size(value)  # type: ignore[arg-type]
        return _check_seed(value)  # type: ignore[arg-type]

    def attribute(  # type: ignore[override]
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
        return super().attribute(
            inputs, target, abs=abs, n_samples=n_samples, noise_level=noise_level, batch_size=batch_size, seed=seed
        )

    def _attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        target: Target,
        *,
        n_samples: int,
        noise_level: float,
        batch_size: Optional[int],
        seed: Optional[int],
        abs: bool,
    ) -> torch.Tensor:
        return self._smooth(inputs, target, n_samples, noise_level, batch_size, seed, abs)

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
        rows = resolve_batch_size(batch_size, batch, x[0].numel())
        with torch.no_grad():
            if target is None:
                resolved = resolve_target(None, logits_in_blocks(self.model, x, rows))
            else:  # no forward pass needed: the first block checks the classes against the model's output
                resolved = per_example_target(target, batch, x.device)
            flat = x.reshape(batch, -1)
            sigma = (level * (flat.max(dim=1).values - flat.min(dim=1).values)).view(batch, *([1] * len(shape)))
        gen = private_generator(seed, x.device)

        # Per-example accumulators, one cheap in-place update per block. "mean" and "squared" sum g and g^2 (no
        # cancellation to guard against); "var" merges block statistics with Chan et al.'s parallel update, exact
        # for constant gradients. Blocks are sample-major, so every example of a block has seen samples 0..s0-1.
        total = torch.zeros_like(x)
        m2 = torch.zeros_like(x) if self.variant == "var" else None
        repeated: dict[tuple[int, int, int], torch.Tensor] = {}  # the block's target rows, built once per shape
        current, noisy_batch = -1, x  # the noisy copy of the whole batch for sample `current` (partial blocks)
        for blk in blocks(n, batch, rows):
            k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
            noisy = torch.empty((k, width, *shape), dtype=x.dtype, device=x.device)
            if width == batch:  # whole samples: draw each one straight into the block, then scale and shift
                for j in range(k):
                    torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device, out=noisy[j])
                noisy.mul_(sigma).add_(x)
            else:  # one sample for a slice of the examples: the same draw of the whole batch, sliced
                if blk.s0 != current:
                    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                    noisy_batch, current = noise.mul_(sigma).add_(x), blk.s0
                noisy[0] = noisy_batch[blk.b0 : blk.b1]
            key = (blk.b0, blk.b1, k)
            if key not in repeated:
                repeated[key] = resolved[blk.b0 : blk.b1].repeat(k)
            grads, _, _ = input_gradients(self.model, noisy.view(k * width, *shape), repeated[key], owned=True)
            grads = grads.view(k, width, *shape)
            if absolute:
                grads.abs_()
            part = total[blk.b0 : blk.b1]
            if self.variant == "mean":
                part.add_(grads[0] if k == 1 else grads.sum(dim=0))
            elif self.variant == "squared":
                part.addcmul_(grads[0], grads[0]) if k == 1 else part.add_(grads.square().sum(dim=0))
            else:
                assert m2 is not None
                seen, block_mean = blk.s0, grads.mean(dim=0)
                delta = block_mean - part
                part.add_(delta, alpha=k / (seen + k))  # the running mean
                m2[blk.b0 : blk.b1] += (grads - block_mean).square().sum(0) + delta.square() * (seen * k / (seen + k))
        if self.variant == "var":
            assert m2 is not None
            return m2.div_(n)
        return total.div_(n)


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
