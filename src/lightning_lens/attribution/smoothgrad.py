"""SmoothGrad (Smilkov et al., 2017), SmoothGrad-Squared (Hooker et al., 2019) and VarGrad (Adebayo et al., 2018)."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from lightning_lens.attribution._batching import (
    NormalStream,
    blocks,
    check_batch_size,
    copy_generator,
    logits_in_blocks,
    resolve_batch_size,
)
from lightning_lens.attribution._inputs import Inputs, ModelInputs
from lightning_lens.attribution.base import Attribution, OutputFn, Target, gradients
from lightning_lens.attribution.layer import LayerSpec, layer_hook
from lightning_lens.utils import resolve_target
from lightning_lens.utils.checks import check_choice, check_int
from lightning_lens.utils.rng import check_seed, private_generator
from lightning_lens.utils.targets import per_example_target

Variant = Literal["mean", "squared", "var"]
_VARIANTS = ("mean", "squared", "var")


class SmoothGrad(Attribution):
    """Gradients averaged over noisy copies of the input.

    For each example, ``n_samples`` copies ``x + eps`` with ``eps ~ N(0, sigma^2)`` and
    ``sigma = noise_level * (max(x) - min(x))`` (max and min over that example's elements) are differentiated for the
    target class, which is resolved once on the clean input (``target=None``; a given target costs no extra pass).
    ``variant`` picks the statistic of the per-sample gradients ``g``: ``"mean"`` E[g] (SmoothGrad), ``"squared"``
    E[g^2] (SmoothGrad-Squared), ``"var"`` E[g^2] - E[g]^2 (VarGrad). With ``abs=True`` each sample's gradient is
    replaced by its absolute value before the statistic (as Captum's NoiseTunnel over ``Saliency(abs=True)``).

    References: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017; Hooker et al., "A Benchmark for
    Interpretability Methods in Deep Neural Networks", NeurIPS 2019; Adebayo et al., "Local Explanation Methods for
    Deep Neural Networks Lack Sensitivity to Parameter Values", ICLR workshop 2018.

    Args:
        model: the classifier.
        n_samples: noisy copies per example (default 50, as in Smilkov et al. and Adebayo et al.).
        noise_level: noise standard deviation as a fraction of each example's value range (default 0.15).
        variant: ``"mean"``, ``"squared"`` or ``"var"``.
        batch_size: most rows per forward pass; ``None`` picks whole samples of the batch within a budget of
            ``2**17`` input elements per pass (32 rows, one sample, for a batch of 32 images of 3x32x32). Results do not
            depend on it.
        seed: noise seed. With an int, every call draws the same noise for the same input shape, so maps are
            reproducible (and comparable across models, as randomization sanity checks need). ``None`` draws fresh
            noise from OS entropy on each call. Noise always comes from a private ``torch.Generator``.
        layer: a module of the model or its dotted name: gradients with respect to its output, shaped like it. The
            noise is then added to the layer's output (sigma from the range of each example's layer output), as
            AllenNLP Interpret's SmoothGrad on embeddings (Wallace et al., 2019), so token ids work.
        output_fn: maps the model's output to ``(B, C)`` or ``(B,)`` scores (see :class:`Gradient`).
        eval_mode: see :class:`~lightning_lens.attribution.base.Attribution`.

    Inputs may be a tuple or dict of tensors: every floating-point tensor gets noise from its own range.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> sg = SmoothGrad(model, n_samples=10)
        >>> torch.allclose(sg.attribute(torch.randn(4, 3), target=0), model.weight[0].expand(4, 3))
        True
    """

    name = "smoothgrad"
    supports_structured = True
    supports_layer = True

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 50,
        noise_level: float = 0.15,
        variant: Variant = "mean",
        batch_size: Optional[int] = None,
        seed: Optional[int] = 0,
        *,
        layer: Optional[LayerSpec] = None,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, eval_mode=eval_mode, output_fn=output_fn)
        self._set_layer(layer)
        self.n_samples = check_int(n_samples, "n_samples", minimum=1)
        self.noise_level = self._check_noise_level(noise_level)
        self.variant = check_choice(variant, "variant", _VARIANTS)
        self.batch_size = check_batch_size(batch_size)
        self.seed = check_seed(seed)

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
        return check_seed(value)  # type: ignore[arg-type]

    def attribute(  # type: ignore[override]
        self,
        inputs: Inputs,
        target: Target = None,
        *,
        abs: bool = False,
        forward_kwargs: Optional[dict[str, Any]] = None,
        n_samples: Optional[int] = None,
        noise_level: Optional[float] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> Any:
        """SmoothGrad attributions, shaped like ``inputs``; keyword options override the constructor's for this call.

        Args:
            inputs: a floating-point batch ``(B, ...)``, or a tuple or dict of tensors (see
                :meth:`Attribution.attribute <lightning_lens.attribution.base.Attribution.attribute>`).
            target: an int, ``B`` class indices, or ``None`` for the classes predicted on the clean inputs.
            abs: take each sample gradient's absolute value before averaging.
            forward_kwargs: more keyword arguments for the model, never attributed.
            n_samples, noise_level, batch_size, seed: as in the constructor.
        """
        return super().attribute(
            inputs, target, abs=abs, forward_kwargs=forward_kwargs, n_samples=n_samples, noise_level=noise_level,
            batch_size=batch_size, seed=seed,
        )

    def _attribute(  # type: ignore[override]
        self,
        inputs: ModelInputs,
        target: Target,
        *,
        n_samples: int,
        noise_level: float,
        batch_size: Optional[int],
        seed: Optional[int],
        abs: bool,
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        return self._smooth(inputs, target, n_samples, noise_level, batch_size, seed, abs)

    def _smooth(
        self,
        inputs: ModelInputs,
        target: Target,
        n: int,
        level: float,
        batch_size: Optional[int],
        seed: Optional[int],
        absolute: bool,
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        batch = inputs.batch_size
        rows = resolve_batch_size(batch_size, batch, inputs.elements_per_row)
        with torch.no_grad():
            if self._layer is None:
                centers = inputs.attributed  # noise goes on every floating-point input
                clean_logits = None if target is not None else (
                    lambda: logits_in_blocks(self.model, inputs, rows, self.output_fn)
                )
            else:  # noise goes on the layer's output; a clean pass in slices gives its range per example (sigma)
                clean_logits, spreads, centers = self._layer_spreads(inputs, rows, target is None)
                rows = resolve_batch_size(batch_size, batch, inputs.elements_per_row + centers[0][0].numel())
            if clean_logits is not None:
                resolved = resolve_target(None, clean_logits())
            else:  # no forward pass needed: the first block checks the classes against the model's output
                resolved = per_example_target(target, batch, centers[0].device)
            sigmas = []
            for x in centers:
                if self._layer is None:  # amax/amin over the example's dims: no copy of a non-contiguous input
                    per_row = x if x.dim() > 1 else x.unsqueeze(1)
                    dims = tuple(range(1, per_row.dim()))
                    spread = per_row.amax(dim=dims) - per_row.amin(dim=dims)
                else:
                    spread = spreads
                sigmas.append((level * spread).view(-1, *([1] * (x.dim() - 1))))
        device = centers[0].device
        gen = private_generator(seed, device)

        # Per-example accumulators, one cheap in-place update per block. "mean" and "squared" sum g and g^2 (no
        # cancellation to guard against); "var" merges block statistics with Chan et al.'s parallel update, exact
        # for constant gradients. Blocks are sample-major, so every example of a block has seen samples 0..s0-1.
        # Noise is drawn sample by sample, and within a sample tensor by tensor (one torch.randn of the whole batch's
        # shape each), whatever the block boundaries. A block holding a slice of the examples takes its rows from a
        # NormalStream of that draw, so no whole-batch noise is ever held (issue 19).
        totals = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in centers]
        m2s = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in centers] if self.variant == "var" else None
        repeated: dict[tuple[int, int, int], torch.Tensor] = {}  # the block's target rows, built once per shape
        current, streams, next_gen = -1, [], gen  # the noise streams of sample `current`, one per tensor
        for blk in blocks(n, batch, rows):
            k, width = blk.s1 - blk.s0, blk.b1 - blk.b0
            noisy = [torch.empty((k, width, *x.shape[1:]), dtype=x.dtype, device=device) for x in centers]
            if width == batch:  # whole samples: draw each one straight into the block
                for j in range(k):
                    for x, out in zip(centers, noisy):
                        torch.randn(x.shape, generator=gen, dtype=x.dtype, device=device, out=out[j])
            else:  # one sample for a slice of the examples: the next rows of each tensor's draw for that sample
                if blk.s0 != current:
                    streams, next_gen = self._noise_streams(centers, next_gen), None
                    current = blk.s0
                for stream, out in zip(streams, noisy):
                    stream.take(out[0])
                if blk.b1 == batch:  # the sample is drawn: the next one starts where its last tensor's draw ended
                    next_gen = streams[-1].generator
            for x, sigma, out in zip(centers, sigmas, noisy):
                out.mul_(sigma[blk.b0 : blk.b1])
                if self._layer is None:  # with a layer, the hook adds the noise to the layer's output (below)
                    out.add_(x[blk.b0 : blk.b1])
            key = (blk.b0, blk.b1, k)
            if key not in repeated:
                repeated[key] = resolved[blk.b0 : blk.b1].repeat(k)
            flat = [out.view(k * width, *out.shape[2:]) for out in noisy]
            part_inputs = inputs.rows(blk.b0, blk.b1)
            if self._layer is None:
                grads = gradients(self.model, part_inputs.repeat(k, attributed=flat), repeated[key],
                                  output_fn=self.output_fn, owned=True).grads
            else:
                noise = flat[0]
                grads = [gradients(self.model, part_inputs.repeat(k), repeated[key], output_fn=self.output_fn,
                                   layer=self._layer, layer_value=lambda clean: clean + noise).grads]
            del noisy, flat
            for i, g in enumerate(grads):
                g = g.view(k, width, *g.shape[1:])
                if absolute:
                    g.abs_()
                part = totals[i][blk.b0 : blk.b1]
                if self.variant == "mean":
                    part.add_(g[0] if k == 1 else g.sum(dim=0))
                elif self.variant == "squared":
                    part.addcmul_(g[0], g[0]) if k == 1 else part.add_(g.square().sum(dim=0))
                else:
                    assert m2s is not None
                    seen, block_mean = blk.s0, g.mean(dim=0)
                    delta = block_mean - part
                    part.add_(delta, alpha=k / (seen + k))  # the running mean
                    m2s[i][blk.b0 : blk.b1] += (
                        (g - block_mean).square().sum(0) + delta.square() * (seen * k / (seen + k))
                    )
            del grads
        results = [m2.div_(n) for m2 in m2s] if m2s is not None else [t.div_(n) for t in totals]
        return results[0] if self._layer is not None else results

    def _layer_spreads(
        self, inputs: ModelInputs, rows: int, keep_logits: bool
    ) -> tuple[Optional[Callable[[], torch.Tensor]], torch.Tensor, list[torch.Tensor]]:
        """One clean pass in slices of ``rows`` examples: the clean logits (if ``keep_logits``), each example's range
        of the layer's output (max - min), and a broadcast view standing for the layer's output of the whole batch
        (its shape, dtype and device: the values come from each gradient forward, so they are never all held)."""
        assert self._layer is not None
        batch, parts, spreads = inputs.batch_size, [], []
        record = None
        for b0 in range(0, batch, rows):
            b1 = min(batch, b0 + rows)
            with layer_hook(*self._layer, differentiable=False) as record:
                logits = self.logits(inputs.rows(b0, b1).cloned())
            if record.output is None:
                raise ValueError(f"layer={self._layer[1]!r} did not run in the model's forward; pick a module the"
                                 " forward uses")
            flat = record.output.reshape(b1 - b0, -1)
            spreads.append(flat.max(dim=1).values - flat.min(dim=1).values)
            if keep_logits:
                parts.append(logits)
        assert record is not None and record.output is not None
        out = record.output
        center = torch.zeros((), dtype=out.dtype, device=out.device).expand(batch, *out.shape[1:])
        clean = (lambda: torch.cat(parts)) if keep_logits else None
        return clean, torch.cat(spreads), [center]

    @staticmethod
    def _noise_streams(centers: list[torch.Tensor], generator: torch.Generator) -> list[NormalStream]:
        """One stream per tensor for the next sample: tensor ``i``'s draw follows tensor ``i - 1``'s whole draw in
        ``generator``'s sequence, so its stream starts from a copy of the generator moved past that draw."""
        streams = [NormalStream(centers[0].numel(), generator, centers[0].dtype, centers[0].device)]
        for x in centers[1:]:
            previous = streams[-1]
            skipped = NormalStream(previous.numel, copy_generator(previous.generator), previous.dtype, previous.device)
            skipped.skip()
            streams.append(NormalStream(x.numel(), skipped.generator, x.dtype, x.device))
        return streams


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
        layer: Optional[LayerSpec] = None,
        output_fn: Optional[OutputFn] = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, n_samples, noise_level, "var", batch_size, seed, layer=layer, output_fn=output_fn,
                         eval_mode=eval_mode)
