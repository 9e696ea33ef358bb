"""Specification of tune_mtard.data: in-memory datasets, splits and the tensor batch loader."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from tune_mtard.data import (
    DataBundle,
    Split,
    iterate_batches,
    load_data,
    num_batches,
)
from tune_mtard.errors import ConfigError


def rows(split: Split) -> set[tuple[int, ...]]:
    """Each example as a hashable tuple of (label, pixels...)."""
    flat = torch.cat([split.labels[:, None], split.images.flatten(1).long()], dim=1)
    return {tuple(row) for row in flat.tolist()}


def indexed_split(n: int) -> Split:
    """n one-pixel images whose pixel value is the example's index (n <= 256)."""
    return Split(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1), torch.arange(n) % 3)


def epoch_indices(split: Split, **kwargs) -> list[int]:
    batches = iterate_batches(split, **kwargs)
    return [int(v) for x, _ in batches for v in (x.flatten() * 255).round()]


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits", seed=0)


# ---- digits ----------------------------------------------------------------------------------


def test_digits_loads_offline_as_8x8_greyscale_uint8_with_ten_classes(digits):
    assert digits.name == "digits"
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64
    assert int(digits.train.images.max()) == 255
    assert set(digits.train.labels.tolist()) == set(range(10))


def test_digits_gets_no_crop_or_flip_augmentation(digits):
    assert digits.crop_padding == 0 and digits.hflip is False


def test_digits_splits_partition_all_1797_images(digits):
    train, val, test = rows(digits.train), rows(digits.val), rows(digits.test)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(train | val | test) == 1797
    assert not train & val and not train & test and not val & test


def test_digits_test_split_is_a_fifth_and_val_a_tenth_of_the_rest(digits):
    assert abs(len(digits.test) - 0.2 * 1797) <= 5
    assert len(digits.val) == round(0.1 * (1797 - len(digits.test)))


def test_digits_test_split_is_stratified_by_class(digits):
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38


def test_same_seed_gives_the_same_split(digits):
    again = load_data("digits", seed=0)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).images, getattr(digits, name).images)
        assert torch.equal(getattr(again, name).labels, getattr(digits, name).labels)


def test_different_seed_gives_a_different_split(digits):
    other = load_data("digits", seed=1)
    assert rows(other.test) != rows(digits.test)
    assert rows(other.val) != rows(digits.val)


def test_validation_is_carved_from_training_only_so_test_ignores_val_fraction(digits):
    larger_val = load_data("digits", val_fraction=0.3, seed=0)
    assert torch.equal(larger_val.test.images, digits.test.images)
    assert rows(larger_val.train) | rows(larger_val.val) == rows(digits.train) | rows(digits.val)
    assert len(larger_val.val) > len(digits.val)


def test_any_positive_val_fraction_holds_out_at_least_one_example():
    assert len(load_data("digits", val_fraction=1e-6).val) == 1


def test_unknown_dataset_or_bad_val_fraction_is_a_config_error():
    with pytest.raises(ConfigError) as unknown:
        load_data("mnist")
    assert unknown.value.key == "data.dataset"
    with pytest.raises(ConfigError) as bad_fraction:
        load_data("digits", val_fraction=1.0)
    assert bad_fraction.value.key == "data.val_fraction"


def test_head_takes_the_first_examples_in_order(digits):
    head = digits.test.head(5)
    assert torch.equal(head.images, digits.test.images[:5]) and torch.equal(head.labels, digits.test.labels[:5])
    assert len(digits.test.head(10_000)) == len(digits.test)


def test_floats_are_images_scaled_to_unit_interval(digits):
    x = digits.val.floats()
    assert x.dtype == torch.float32 and torch.equal(x * 255, digits.val.images.float())


# ---- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_generated_deterministically_from_the_seed():
    first, again, other = load_data("synthetic", seed=3), load_data("synthetic", seed=3), load_data("synthetic", seed=4)
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    assert not torch.equal(first.test.images, other.test.images)


def test_synthetic_has_ten_classes_of_3x16x16_images_2000_train_and_500_test():
    data = load_data("synthetic", seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 16)
    assert len(data.train) + len(data.val) == 2000 and len(data.test) == 500
    assert set(data.test.labels.tolist()) == set(range(10))
    assert data.crop_padding == 0 and data.hflip is False


# ---- iterate_batches ---------------------------------------------------------------------------


def test_an_epoch_visits_every_example_exactly_once():
    split = indexed_split(103)
    seen = epoch_indices(split, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(seen) == list(range(103))
    assert seen != list(range(103))


def test_drop_last_skips_only_the_short_final_batch():
    split = indexed_split(103)
    batches = list(iterate_batches(split, 10, shuffle=False, drop_last=True))
    assert len(batches) == num_batches(103, 10, drop_last=True) == 10
    assert all(len(y) == 10 for _, y in batches)
    assert num_batches(103, 10, drop_last=False) == 11


def test_unshuffled_batches_come_in_order_with_matching_labels():
    split = indexed_split(25)
    batches = list(iterate_batches(split, 10, shuffle=False))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    assert epoch_indices(split, batch_size=10, shuffle=False) == list(range(25))


def test_same_generator_seed_gives_the_same_batches_whatever_the_global_rng(digits):
    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        generator = torch.Generator().manual_seed(seed)
        return list(iterate_batches(digits.train, 64, shuffle=True, generator=generator, crop_padding=2, hflip=True))

    first, again = epoch(7), epoch(7)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))


def test_different_generator_seed_gives_a_different_order():
    split = indexed_split(100)
    first = epoch_indices(split, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    other = epoch_indices(split, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert first != other


def test_batches_are_float32_in_unit_interval_with_int64_labels(digits):
    generator = torch.Generator().manual_seed(0)
    for x, y in iterate_batches(digits.val, 50, shuffle=True, generator=generator, crop_padding=2, hflip=True):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]


def test_shuffling_or_augmenting_without_a_generator_is_refused(digits):
    with pytest.raises(ValueError):
        next(iterate_batches(digits.val, 8, shuffle=True))
    with pytest.raises(ValueError):
        next(iterate_batches(digits.val, 8, shuffle=False, hflip=True))


def test_random_crop_keeps_the_shape_and_shifts_content_within_the_padding():
    image = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    image[0, 0, 4, 4] = 255
    split = Split(image.repeat(300, 1, 1, 1), torch.zeros(300, dtype=torch.int64))
    generator = torch.Generator().manual_seed(0)
    (x, _), = iterate_batches(split, 300, shuffle=False, generator=generator, crop_padding=2)
    assert x.shape == (300, 1, 9, 9)
    assert torch.equal((x == 1.0).flatten(1).sum(1), torch.ones(300, dtype=torch.int64))
    assert float(x.sum()) == 300.0  # padding is zeros: nothing but the bright pixel
    bright = (x[:, 0] == 1.0).nonzero()[:, 1:]
    shifts = bright - 4
    assert int(shifts.abs().max()) <= 2
    assert {tuple(s) for s in shifts.tolist()} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_crop_shifts_each_sample_independently():
    image = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    image[0, 0, 4, 4] = 255
    split = Split(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.int64))
    (x, _), = iterate_batches(split, 64, shuffle=False, generator=torch.Generator().manual_seed(1), crop_padding=3)
    assert len({tuple(p) for p in (x[:, 0] == 1.0).nonzero()[:, 1:].tolist()}) > 10


def test_hflip_mirrors_about_half_of_the_samples_exactly_and_leaves_the_rest_unchanged():
    images = torch.randint(0, 256, (200, 3, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = Split(images, torch.zeros(200, dtype=torch.int64))
    (x, _), = iterate_batches(split, 200, shuffle=False, generator=torch.Generator().manual_seed(0), hflip=True)
    original = split.floats()
    mirrored = original.flip(-1)
    same = (x == original).flatten(1).all(1)
    flipped = (x == mirrored).flatten(1).all(1)
    assert bool((same ^ flipped).all())
    assert 60 <= int(flipped.sum()) <= 140


def batch_by_batch_epoch(split: Split, batch_size: int, seed: int,
                         padding: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader as it was first written, drawing as it goes: the order, then per batch each image's crop
    offsets (y, x) and whether it is flipped; crop after zero padding, then mirror."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    batches = []
    for start in range(0, len(split), batch_size):
        indices = order[start : start + batch_size]
        offsets = torch.randint(0, 2 * padding + 1, (2, len(indices)), generator=generator)
        flipped = torch.rand(len(indices), generator=generator) < 0.5
        height, width = split.images.shape[2:]
        images = []
        for i, image in enumerate(split.images[indices]):
            padded = torch.nn.functional.pad(image, (padding,) * 4)
            crop = padded[:, offsets[0, i] : offsets[0, i] + height, offsets[1, i] : offsets[1, i] + width]
            images.append(crop.flip(-1) if flipped[i] else crop)
        batches.append((torch.stack(images).float() / 255, split.labels[indices]))
    return batches


def test_an_epoch_is_drawn_when_it_starts_and_gives_the_batches_of_drawing_batch_by_batch():
    """The whole epoch's order, crops and flips come from the generator before the first batch, in the order a
    batch-by-batch loader draws them, so epochs stay what they always were for a given (seed, epoch)."""
    images = torch.randint(0, 256, (50, 3, 6, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = Split(images, torch.arange(50) % 7)
    generator = torch.Generator().manual_seed(3)
    batches = iterate_batches(split, 16, shuffle=True, generator=generator, crop_padding=2, hflip=True)
    first = next(batches)
    state_after_first = generator.get_state()
    got = [first, *batches]
    assert torch.equal(generator.get_state(), state_after_first)
    expected = batch_by_batch_epoch(split, 16, seed=3, padding=2)
    assert [len(y) for _, y in got] == [16, 16, 16, 2]
    for (x, y), (x_expected, y_expected) in zip(got, expected, strict=True):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_loader_runs_on_the_splits_device_and_can_return_batches_elsewhere(digits):
    on_meta = digits.to("meta")
    assert on_meta.test.images.device.type == "meta" and on_meta.val.labels.device.type == "meta"
    generator = torch.Generator().manual_seed(0)
    x, y = next(iterate_batches(on_meta.train, 16, shuffle=True, generator=generator, crop_padding=2, hflip=True))
    assert x.device.type == "meta" and y.device.type == "meta" and x.shape == (16, 1, 8, 8)
    x, _ = next(iterate_batches(digits.val, 16, shuffle=False, device="meta"))
    assert x.device.type == "meta"


# ---- files on disk: cifar10, svhn, tiny-imagenet -----------------------------------------------


def write_fake_cifar10(root, per_batch: int = 20, test_size: int = 10) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test_size)]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        written[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"class"] * 10}))
    return written


def test_cifar10_loads_from_the_python_pickle_batches_without_checksums(tmp_path):
    written = write_fake_cifar10(tmp_path)
    data = load_data("cifar10", root=tmp_path, val_fraction=0.1, seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert (data.crop_padding, data.hflip) == (4, True)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 10)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    test_batch = written["test_batch"]
    assert torch.equal(data.test.images, torch.from_numpy(test_batch[b"data"].reshape(-1, 3, 32, 32)))
    assert data.test.labels.tolist() == test_batch[b"labels"]
    first_train_image = torch.from_numpy(written["data_batch_1"][b"data"][0].reshape(3, 32, 32))
    assert any(torch.equal(first_train_image, image) for image in torch.cat([data.train.images, data.val.images]))


def test_missing_cifar10_without_download_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_data("cifar10", root=tmp_path, download=False)
    assert error.value.key == "data.root"
    assert str(tmp_path.absolute()) in error.value.message
    assert "data.download" in error.value.message and "\n" not in str(error.value)


def test_svhn_loads_from_the_mat_files_with_label_10_meaning_digit_0(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 30), ("test", 8)):
        pixels[split] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = np.array([[10]] + [[1 + i % 9] for i in range(n - 1)], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": pixels[split], "y": labels})
    data = load_data("svhn", root=tmp_path, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 8)
    assert data.test.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert torch.equal(data.test.images, torch.from_numpy(pixels["test"]).permute(3, 2, 0, 1))
    assert (data.crop_padding, data.hflip) == (4, False)


def write_fake_tiny_imagenet(root) -> None:
    """Two classes, solid-colour 64x64 JPEGs so labels can be read back from the pixels."""
    folder = root / "tiny-imagenet-200"
    colours = {"n02": (255, 0, 0), "n01": (0, 0, 255)}
    for wnid, colour in colours.items():
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), colour).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    annotations = []
    for i, wnid in enumerate(["n02", "n01", "n01", "n02"]):
        Image.new("RGB", (64, 64), colours[wnid]).save(folder / "val" / "images" / f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    (folder / "wnids.txt").write_text("n02\nn01\n")


def test_tiny_imagenet_loads_64x64_images_labelled_by_sorted_wnids_and_caches_tensors(tmp_path):
    write_fake_tiny_imagenet(tmp_path)
    data = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.2)
    assert (data.num_classes, data.in_channels, data.image_size) == (200, 3, 64)
    assert (len(data.train) + len(data.val), len(data.test)) == (6, 4)
    assert data.test.labels.tolist() == [1, 0, 0, 1]  # n01 -> 0, n02 -> 1
    red = data.test.images[:, 0].float().mean((1, 2)) > 128
    assert red.tolist() == [True, False, False, True]
    assert (tmp_path / "tiny-imagenet-200" / "tensors.pt").is_file()

    cached = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.2)
    assert torch.equal(cached.test.images, data.test.images) and torch.equal(cached.train.labels, data.train.labels)


def test_missing_tiny_imagenet_cannot_be_downloaded(tmp_path):
    with pytest.raises(ConfigError, match="manually"):
        load_data("tiny-imagenet", root=tmp_path, download=True)
    with pytest.raises(ConfigError) as error:
        load_data("tiny-imagenet", root=tmp_path)
    assert error.value.key == "data.root" and str(tmp_path.absolute()) in error.value.message
