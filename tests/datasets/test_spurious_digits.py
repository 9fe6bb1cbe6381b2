"""SpuriousDigits: determinism, split partition, exact shortcut rates, masks aligned with the square, eval modes,
the mislabeled subgroup (training only), thickness bins, and the item contract other parts rely on."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lens.datasets import SpuriousDigits
from lightning_lens.utils import BatchAccessor

S = 4  # default square size


@pytest.fixture(scope="module")
def splits():
    return SpuriousDigits.splits(seed=0)


def _same(a, b):
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.digit_masks, b.digit_masks)
        and torch.equal(a.square_masks, b.square_masks)
        and all(np.array_equal(a.metadata[k], b.metadata[k]) for k in a.metadata)
    )


def test_deterministic_from_seed_and_global_rng_untouched(splits):
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    again = SpuriousDigits("train", seed=0)
    assert torch.equal(state, torch.get_rng_state()) and np.array_equal(np_state, np.random.get_state()[1])
    assert _same(splits["train"], again)
    other = SpuriousDigits("train", seed=1)
    assert not np.array_equal(splits["train"].source_indices, other.source_indices)
    assert not torch.equal(splits["train"].images, other.images)


def test_item_contract(splits):
    ds = splits["val"]
    item = ds[3]
    assert set(item) == {
        "image", "label", "index", "digit", "shortcut_present", "shortcut_consistent", "shortcut_position",
        "thickness", "mislabeled", "digit_mask", "square_mask",
    }
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["digit_mask"].shape == item["square_mask"].shape == (1, 32, 32)
    assert item["index"] == 3 and ds[-1]["index"] == len(ds) - 1
    for key in ("label", "digit", "shortcut_present", "shortcut_consistent", "shortcut_position", "thickness"):
        assert type(item[key]) is int
    assert ds.num_classes == 10
    assert set(ds.metadata) == {
        "digit", "shortcut_present", "shortcut_consistent", "shortcut_position", "thickness", "mislabeled",
    }
    assert all(len(v) == len(ds) for v in ds.metadata.values())
    for split in splits.values():
        assert 0.0 <= float(split.images.min()) and float(split.images.max()) <= 1.0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collated_batches_work_with_batch_accessor(splits):
    batch = next(iter(DataLoader(splits["train"], batch_size=8)))
    acc = BatchAccessor()
    assert acc.inputs(batch).shape == (8, 1, 32, 32)
    assert torch.equal(acc.targets(batch), splits["train"].labels[:8])
    assert acc.indices(batch).tolist() == list(range(8))
    assert set(acc.masks(batch)) == {"digit", "square"}
    assert {"digit", "thickness", "shortcut_present", "shortcut_position"} <= set(acc.metadata(batch))


def test_splits_partition_the_digits_stratified(splits):
    sources = [set(splits[s].source_indices.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, sources)) == 1797 and set.union(*sources) == set(range(1797))
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    counts = {s: np.bincount(splits[s].metadata["digit"], minlength=10) for s in splits}
    total = sum(counts.values())
    for s, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
        assert np.all(np.abs(counts[s] - frac * total) <= 1.0), (s, counts[s])
    # Membership depends on the seed only, not on the shortcut options.
    varied = SpuriousDigits("val", seed=0, eval_shortcut_mode="consistent", train_shortcut_fraction=0.2)
    assert np.array_equal(varied.source_indices, splits["val"].source_indices)


def test_train_shortcut_rate_is_exact_per_class_and_at_the_class_position(splits):
    ds = splits["train"]
    md = ds.metadata
    for c in range(10):
        members = md["digit"] == c
        assert md["shortcut_present"][members].sum() == round(0.9 * members.sum())
    present = md["shortcut_present"] == 1
    assert np.array_equal(md["shortcut_position"][present], md["digit"][present])
    assert np.all(md["shortcut_position"][~present] == -1)
    assert np.array_equal(md["shortcut_consistent"], md["shortcut_present"])
    none = SpuriousDigits("train", seed=0, train_shortcut_fraction=0.0)
    assert none.metadata["shortcut_present"].sum() == 0 and none.square_masks.sum() == 0


def test_square_mask_and_pixels_align_with_the_class_position(splits):
    for ds in splits.values():
        md = ds.metadata
        sums = ds.square_masks.sum(dim=(1, 2, 3)).numpy()
        assert np.array_equal(sums, md["shortcut_present"] * S * S)
        for i in np.flatnonzero(md["shortcut_present"])[:40]:
            r, c = ds.class_positions[md["shortcut_position"][i]]
            expected = torch.zeros(1, 32, 32)
            expected[0, r : r + S, c : c + S] = 1.0
            assert torch.equal(ds.square_masks[i], expected)
            assert torch.all(ds.images[i][expected.bool()] == 1.0)


def test_class_positions_are_distinct_on_the_border_and_mostly_off_the_digits(splits):
    pos = splits["train"].class_positions
    assert pos.shape == (10, 2) and len({tuple(p) for p in pos}) == 10
    boxes = np.zeros((10, 32, 32), dtype=bool)
    for k, (r, c) in enumerate(pos):
        assert c in (0, 32 - S) and 0 <= r <= 32 - S
        boxes[k, r : r + S, c : c + S] = True
    assert boxes.sum(0).max() == 1  # no two squares overlap
    digit = splits["train"].digit_masks[:, 0].numpy().astype(bool)
    overlap = (digit[:, None] & boxes[None]).sum(axis=(2, 3)) / (S * S)
    assert overlap.mean() < 0.02  # squares sit where digits (almost) never are


def test_digit_mask_is_the_thresholded_digit(splits):
    ds = splits["test"]
    clean = SpuriousDigits("test", seed=0, eval_shortcut_mode="absent")
    assert torch.equal(ds.digit_masks, clean.digit_masks)  # the mask ignores the square
    assert torch.equal(clean.digit_masks, (clean.images > 0.25).float())
    assert bool((clean.digit_masks.sum(dim=(1, 2, 3)) > 20).all())
    nearest = SpuriousDigits("test", seed=0, upsample="nearest", eval_shortcut_mode="absent")
    blocks = nearest.images[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # every 4x4 block is constant
    assert torch.equal(blocks.amax(dim=(-1, -2)), blocks.amin(dim=(-1, -2)))


@pytest.mark.parametrize("mode", ["random", "conflicting", "consistent", "absent"])
def test_eval_modes(mode):
    for split in ("val", "test"):
        ds = SpuriousDigits(split, seed=0, eval_shortcut_mode=mode, eval_shortcut_fraction=0.6)
        md = ds.metadata
        present = md["shortcut_present"] == 1
        if mode == "absent":
            assert not present.any() and ds.square_masks.sum() == 0
            continue
        assert abs(present.mean() - 0.6) < 0.01
        hits = md["shortcut_position"][present] == md["digit"][present]
        assert np.array_equal(md["shortcut_consistent"][present], hits.astype(np.int64))
        if mode == "consistent":
            assert hits.all()
        elif mode == "conflicting":
            assert not hits.any()
            assert len(np.unique(md["shortcut_position"][present])) == 10
        else:  # uniform over the ten positions: about 1 in 10 consistent by chance
            assert 0.03 < hits.mean() < 0.2
            assert np.bincount(md["shortcut_position"][present], minlength=10).min() > 5


def test_mislabeled_subgroup_only_in_train():
    kwargs = dict(seed=0, mislabel_group={"digit": 3, "thickness": 2}, mislabel_as=8, mislabel_fraction=0.5)
    train = SpuriousDigits("train", **kwargs)
    md = train.metadata
    group = (md["digit"] == 3) & (md["thickness"] == 2)
    flagged = md["mislabeled"] == 1
    assert group.sum() > 20
    assert flagged.sum() == round(0.5 * group.sum())
    assert np.all(group[flagged])
    assert np.all(train.labels.numpy()[flagged] == 8)
    assert np.array_equal(train.labels.numpy()[~flagged], md["digit"][~flagged])
    # the square follows the true digit, so it contradicts the wrong label
    assert np.all(md["shortcut_position"][flagged & (md["shortcut_present"] == 1)] == 3)
    assert np.all(md["shortcut_consistent"][flagged] == 0)
    for split in ("val", "test"):
        ev = SpuriousDigits(split, **kwargs)
        assert ev.metadata["mislabeled"].sum() == 0
        assert np.array_equal(ev.labels.numpy(), ev.metadata["digit"])
    clean = SpuriousDigits("train", seed=0)
    assert torch.equal(clean.images, train.images)  # mislabeling changes labels only


def test_thickness_bins_are_tertiles_stable_across_seeds(splits):
    thick = np.concatenate([splits[s].metadata["thickness"] for s in splits])
    assert np.all(np.abs(np.bincount(thick, minlength=3) - 1797 / 3) < 20)
    a, b = SpuriousDigits("test", seed=0), SpuriousDigits("test", seed=5)
    by_source = dict(zip(a.source_indices.tolist(), a.metadata["thickness"].tolist()))
    common = [(s, t) for s, t in zip(b.source_indices.tolist(), b.metadata["thickness"].tolist()) if s in by_source]
    assert common and all(by_source[s] == t for s, t in common)
    # thicker bins hold more ink (measured on the square-free image)
    clean = SpuriousDigits("train", seed=0, train_shortcut_fraction=0.0)
    mass = clean.images.sum(dim=(1, 2, 3)).numpy()
    means = [mass[clean.metadata["thickness"] == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="training"), "split"),
        (dict(train_shortcut_fraction=1.5), "train_shortcut_fraction"),
        (dict(eval_shortcut_mode="sometimes"), "eval_shortcut_mode"),
        (dict(split_fractions=(0.5, 0.5)), "split_fractions"),
        (dict(square_size=0), "square_size"),
        (dict(upsample="bicubic"), "upsample"),
        (dict(mislabel_as=3), "mislabel_group"),
        (dict(mislabel_group={"digit": 3}), "mislabel_as"),
        (dict(mislabel_group={"color": 1}, mislabel_as=2), "keys"),
        (dict(seed=-1), "seed"),
    ],
)
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpuriousDigits(**kwargs)
