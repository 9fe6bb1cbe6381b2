"""Smooth MPRT (Hedström et al. 2023): the cascade's explanations averaged over noisy copies of the inputs."""

import pytest
import torch

from lightning_lens.sanity import MapSimilarity, cascading_randomization, independent_randomization
from lightning_lens.testing import SmallCNN


def _net():
    torch.manual_seed(0)
    return SmallCNN(width=2, input_size=16).eval()


def test_one_sample_without_noise_is_the_plain_cascade():
    net, x = _net(), torch.rand(3, 1, 16, 16)
    plain = cascading_randomization(net, x, methods=["gradient", "gradient_x_input"], seed=3)
    smooth = cascading_randomization(net, x, methods=["gradient", "gradient_x_input"], seed=3, smooth_samples=1,
                                     smooth_noise=0.0)
    assert plain.methods == smooth.methods
    for name in plain.methods:
        if name == "random":  # the random-map control draws fresh noise on every call
            continue
        a, b = plain.results[name], smooth.results[name]
        for metric, values in a.similarity.items():
            torch.testing.assert_close(values, b.similarity[metric], equal_nan=True)
        torch.testing.assert_close(a.maps, b.maps)
        assert a.verdict.outcome == b.verdict.outcome


def test_each_explanation_is_the_mean_over_the_same_noisy_copies_at_every_stage():
    net, x = _net(), torch.rand(3, 1, 16, 16)
    calls = []

    def recording(model, inputs, target):
        calls.append(inputs.detach().clone())
        leaf = inputs.detach().requires_grad_(True)
        score = model(leaf).gather(1, target.view(-1, 1)).sum()
        return torch.autograd.grad(score, leaf)[0]

    samples, noise = 4, 0.2
    report = cascading_randomization(net, x, methods={"g": recording}, controls=False, smooth_samples=samples,
                                     smooth_noise=noise, seed=5)
    stages = report.num_stages
    assert len(calls) == samples * (stages + 1)
    first = calls[:samples]
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    for copy_ in first:  # noisy copies of the inputs with the asked-for scale
        z = (copy_ - x) / (noise * span)
        assert 0.6 < float(z.std()) < 1.4 and abs(float(z.mean())) < 0.3
    assert not torch.equal(first[0], first[1])
    for s in range(1, stages + 1):  # every stage explains the same copies
        for a, b in zip(first, calls[s * samples:(s + 1) * samples]):
            assert torch.equal(a, b)
    # the original maps are the mean of the method's maps of the copies (then normalized as usual)
    target = report.targets[0]
    mean = torch.stack([recording(net, c, target) for c in first]).mean(0)
    expected = MapSimilarity().prepare(mean, ("spearman_abs",)).absolute
    torch.testing.assert_close(report.results["g"].maps[0], expected.float(), atol=1e-5, rtol=1e-5)


def test_smoothing_changes_a_stochastic_free_method_and_works_for_independent_mode():
    net, x = _net(), torch.rand(3, 1, 16, 16)
    plain = independent_randomization(net, x, methods="gradient", controls=False)
    smooth = independent_randomization(net, x, methods="gradient", controls=False, smooth_samples=3,
                                       smooth_noise=0.1)
    assert not torch.equal(plain.results["gradient"].maps, smooth.results["gradient"].maps)


def test_bad_smoothing_options():
    net, x = _net(), torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="smooth_samples must be >= 1"):
        cascading_randomization(net, x, methods="gradient", smooth_samples=0)
    with pytest.raises(TypeError, match="smooth_samples must be an int"):
        cascading_randomization(net, x, methods="gradient", smooth_samples=2.5)
    with pytest.raises(ValueError, match="smooth_noise must be >= 0"):
        cascading_randomization(net, x, methods="gradient", smooth_noise=-0.1)
