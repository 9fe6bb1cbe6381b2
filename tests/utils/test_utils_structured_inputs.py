"""Batches with several model inputs: BatchAccessor selects them (text dicts by default, tuples of keys or positions),
keeps the attention mask out of masks and metadata, and ProbeSet / ProbePool carry every input tensor."""

from __future__ import annotations

import pytest
import torch

from lightning_lens.datasets import SpuriousText
from lightning_lens.utils import BatchAccessor, ProbeSet
from lightning_lens.utils.batch import input_batch_size, input_kind, padding_mask, token_ids
from lightning_lens.utils.probes import ProbePool


def _text_batch(n: int = 6) -> dict:
    ids = torch.randint(2, 50, (n, 7))
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[:, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "label": torch.arange(n) % 2, "index": torch.arange(n),
            "length_bin": torch.arange(n) % 3, "digit_mask": torch.ones(n, 1, 2, 2)}


def test_text_batches_default_to_a_dict_of_model_inputs():
    acc = BatchAccessor()
    batch = _text_batch()
    inputs = acc.inputs(batch)
    assert list(inputs) == ["input_ids", "attention_mask"] and inputs["input_ids"] is batch["input_ids"]
    assert list(acc.masks(batch)) == ["digit"]  # attention_mask is an input, not a region
    assert list(acc.metadata(batch)) == ["length_bin"]
    assert input_kind(inputs) == "text" and token_ids(inputs) is batch["input_ids"]
    assert torch.equal(padding_mask(inputs), batch["attention_mask"] == 0)


def test_tuples_of_keys_and_positions_select_several_inputs():
    batch = (torch.zeros(4, 1, 2, 2), torch.ones(4, 3), torch.tensor([0, 1, 0, 1]))
    inputs = BatchAccessor(input_key=(0, 1), target_key=2).inputs(batch)
    assert isinstance(inputs, tuple) and len(inputs) == 2 and input_kind(inputs) == "multi"
    as_dict = BatchAccessor(input_key=("image", "meta")).inputs({"image": batch[0], "meta": batch[1]})
    assert list(as_dict) == ["image", "meta"]
    with pytest.raises(TypeError, match="all of one kind"):
        BatchAccessor(input_key=("image", 1))
    with pytest.raises(ValueError, match="names a key twice"):
        BatchAccessor(input_key=("a", "a"))
    with pytest.raises(ValueError, match="one common leading batch dimension"):
        input_batch_size((torch.zeros(4, 2), torch.zeros(3, 2)))


def test_probe_sets_carry_every_input_through_select_concat_and_state():
    probes = ProbeSet.from_batch(_text_batch(), BatchAccessor())
    assert len(probes) == 6 and set(probes.inputs) == {"input_ids", "attention_mask"}
    picked = probes.select(torch.tensor([4, 1]))
    assert torch.equal(picked.inputs["input_ids"], probes.inputs["input_ids"][[4, 1]])
    both = ProbeSet.concat([picked, probes.select(torch.tensor([0]))])
    assert both.inputs["attention_mask"].shape == (3, 7) and both.indices.tolist() == [4, 1, 0]
    restored = ProbeSet.from_state_dict(both.state_dict())
    assert torch.equal(restored.inputs["input_ids"], both.inputs["input_ids"])
    assert restored.to("cpu").inputs["attention_mask"].dtype == torch.long


def test_probes_drawn_from_a_text_dataset_and_from_a_stream_agree_with_the_items():
    data = SpuriousText("val", seed=0, size=40)
    probes = ProbeSet.from_dataset(data, num=4, seed=1)
    assert sorted(probes.targets.tolist()) == [0, 0, 1, 1]
    assert torch.equal(probes.inputs["input_ids"], data.input_ids[probes.indices])
    pool = ProbePool(num=4, seed=0)
    for start in range(0, 40, 10):
        rows = slice(start, start + 10)
        pool.add({"input_ids": data.input_ids[rows], "attention_mask": data.attention_mask[rows],
                  "label": data.labels[rows], "index": torch.arange(start, start + 10)})
    drawn = pool.draw()
    assert pool.seen == 40 and len(drawn) == 4
    assert torch.equal(drawn.inputs["input_ids"], data.input_ids[drawn.indices])
