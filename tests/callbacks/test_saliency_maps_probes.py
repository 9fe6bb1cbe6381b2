"""The probes: drawn by dataset position (only the chosen items are kept), the sharing rule between callbacks,
``num_probes`` changed on resume, and streamed validation data. The 1-vs-2-process comparison is in
test_saliency_maps_ddp.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_lens.callbacks import RandomizationSanityCheck, SaliencyMapCallback
from lightning_lens.testing import LitClassifier, SmallCNN
from lightning_lens.utils import ProbeSet


def _fit(callbacks, loaders, trainer_kwargs, epochs=1, **kwargs):
    trainer = Trainer(**trainer_kwargs(max_epochs=epochs, logger=False, callbacks=callbacks, **kwargs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitClassifier(model=SmallCNN(width=4)), *loaders)
    return trainer, [str(w.message) for w in caught]


def test_probes_are_the_datasets_draw_by_position(saliency_digits, saliency_loaders, trainer_kwargs):
    train, val = saliency_loaders(n_val=96)
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=10, probe_seed=5)
    _fit([cb], (train, val), trainer_kwargs)
    expected = ProbeSet.from_dataset(val.dataset, num=10, seed=5)
    assert torch.equal(cb.probes.indices, expected.indices)
    assert torch.equal(cb.probes.inputs, expected.inputs)
    assert sorted(cb.probes.targets.tolist()) == list(range(10))  # one per class
    # the callback keeps the probes and nothing else: no validation batch is held
    assert cb._collector._pool is None and len(cb.probes) == 10


def test_callbacks_asking_for_the_same_probes_share_one_set(saliency_loaders, trainer_kwargs):
    a = SaliencyMapCallback(methods=["gradient"], num_probes=4, probe_seed=1)
    b = SaliencyMapCallback(methods=["gradcam"], num_probes=4, probe_seed=1)
    _, messages = _fit([a, b], saliency_loaders(), trainer_kwargs)
    assert b.probes is a.probes
    assert not [m for m in messages if "ask for different probes" in m]


@pytest.mark.parametrize("reverse", [False, True], ids=["saliency_first", "sanity_first"])
def test_callbacks_asking_for_different_probes_get_their_own_and_a_warning_naming_both(
    reverse, saliency_loaders, trainer_kwargs
):
    saliency = SaliencyMapCallback(methods=["gradient"], num_probes=16)
    sanity = RandomizationSanityCheck(methods=["gradient"], num_probes=4, controls=False, grid_probes=0)
    callbacks = [sanity, saliency] if reverse else [saliency, sanity]
    _, messages = _fit(callbacks, saliency_loaders(), trainer_kwargs)
    assert (len(saliency.probes), len(sanity.probes)) == (16, 4)  # each what it asked for, in either order
    (warning,) = [m for m in messages if "ask for different probes" in m]
    assert "SaliencyMapCallback (num_probes=16, probe_seed=0)" in warning
    assert "RandomizationSanityCheck (num_probes=4, probe_seed=0)" in warning


def test_another_probe_seed_draws_other_probes(saliency_loaders, trainer_kwargs):
    a = SaliencyMapCallback(methods=["gradient"], num_probes=4)
    b = SaliencyMapCallback(methods=["gradcam"], num_probes=4, probe_seed=3)
    _, messages = _fit([a, b], saliency_loaders(), trainer_kwargs)
    assert a.probes is not b.probes and not torch.equal(a.probes.indices, b.probes.indices)
    assert torch.equal(b.probes.indices, ProbeSet.from_dataset(saliency_loaders()[1].dataset, 4, seed=3).indices)
    assert len([m for m in messages if "ask for different probes" in m]) == 1


def test_num_probes_changed_on_resume_draws_anew_with_a_warning(tmp_path, saliency_loaders, trainer_kwargs):
    train, val = saliency_loaders()
    first = SaliencyMapCallback(methods=["gradient"], num_probes=4)
    trainer, _ = _fit([first], (train, val), trainer_kwargs)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = SaliencyMapCallback(methods=["gradient"], num_probes=6)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, logger=False, callbacks=[resumed]))
    with pytest.warns(UserWarning, match=r"checkpoint's probes were drawn with num_probes=4, probe_seed=0; this run"
                                         r" asks for num_probes=6.*drawn anew"):
        trainer.fit(LitClassifier(model=SmallCNN(width=4)), train, val, ckpt_path=ckpt)
    assert len(resumed.probes) == 6
    assert resumed.last_attributions["gradient"].shape[0] == 6


class Stream(IterableDataset):
    """A validation stream without positions: the probes come from a bounded sample of its batches."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.items_read = 0

    def __iter__(self):
        for i in range(len(self.dataset)):
            self.items_read += 1
            yield self.dataset[i]


def test_streamed_validation_data_is_sampled_into_a_bounded_pool(saliency_digits, saliency_loaders, trainer_kwargs):
    train, _ = saliency_loaders()
    stream = Stream(Subset(saliency_digits["val"], range(200)))
    cb = SaliencyMapCallback(methods=["gradient"], num_probes=10, max_overhead=None)
    _fit([cb], (train, DataLoader(stream, batch_size=20)), trainer_kwargs, num_sanity_val_steps=0)
    assert len(cb.probes) == 10
    assert sorted(cb.probes.targets.tolist()) == list(range(10))
    assert cb.probes.indices.unique().numel() == 10
    # the probes are items of the stream, read back by their index
    for index, image in zip(cb.probes.indices.tolist(), cb.probes.inputs):
        assert torch.equal(image, saliency_digits["val"][index]["image"])
    assert cb._collector._pool is None  # the pool (about num_probes + classes examples) is gone once drawn
