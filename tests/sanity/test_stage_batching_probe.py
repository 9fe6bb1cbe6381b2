"""The stage-batching probe of ``benchmarks/sanity.py --stage-batching`` (issue 11, section 6): the timings it
reports (documented in the benchmark's docstring as a negative result) only mean something if the vmapped,
stage-batched explanations equal the cascade's per-stage ones, for every grouping it times."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lightning_lens.attribution import get_method
from lightning_lens.testing import SmallCNN

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "sanity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_sanity_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(bench):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4, input_size=24).eval()
    x, target = torch.rand(4, 1, 24, 24), torch.tensor([0, 1, 2, 3])
    clone, stages = bench._stage_parameters(model, x)
    loop = []
    for params in stages:  # the per-stage explanations, as the cascade runs them (the method on the stage model)
        with torch.no_grad():
            for name, p in clone.named_parameters():
                p.copy_(params[name])
        loop.append(get_method("gradient", clone).attribute(x, target=target))
    return clone, stages, x, target, torch.stack(loop)


@pytest.mark.parametrize("batched_backward", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_stage_batched_gradients_equal_the_per_stage_loop(bench, batched_backward, chunk):
    clone, stages, x, target, loop = _setup(bench)
    assert len(stages) == 7  # the original and six top-down stages, each different from the one before
    assert all(any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(stages, stages[1:]))
    batched = torch.cat([bench._vmapped_gradients(clone, stages[i : i + chunk], x, target, batched_backward)
                         for i in range(0, len(stages), chunk)])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-7)


def test_split_shares_the_parameters_equal_in_every_stage_and_the_head_chunk_has_no_convolution(bench):
    clone, stages, *_ = _setup(bench)
    shared, stacked = bench._split_stages(stages[:3])  # original, classifier.3 and classifier.1 re-drawn
    assert sorted(stacked) == ["classifier.1.bias", "classifier.1.weight", "classifier.3.bias", "classifier.3.weight"]
    assert stacked["classifier.3.weight"].shape[0] == 3 and "features.0.weight" in shared
    assert bench._head_chunk(stages, clone) == 3
