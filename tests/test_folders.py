"""Specification of data.dataset: imagefolder: image folders indexed, streamed from disk and decoded by loader
workers, validation carved by seed, Tiny-ImageNet's folder read through it, and one epoch of train on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_fake_tiny_imagenet

from tune_mtard.benchmarks.folder import write_image_folder
from tune_mtard.config import load_config
from tune_mtard.data import FolderSplit, ImageView, Split, iterate_batches, load_data
from tune_mtard.errors import ConfigError

PER_CLASS = 12  # 10 classes: 120 training images, 100 of them after validation
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), PER_CLASS, side=20, val_per_class=3)


def epoch(split, generator_seed: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(generator_seed)
    return list(iterate_batches(split, 16, shuffle=True, generator=generator, hflip=True, **kwargs))


def test_an_image_folder_is_indexed_by_sorted_class_folders_and_never_decoded_whole(folder):
    data = load_data("imagefolder", root=folder, val_fraction=0.2, seed=0, view=ImageView(16, "resized", 0))
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 16)
    assert isinstance(data.train, FolderSplit) and isinstance(data.test, FolderSplit)
    assert (len(data.train), len(data.val), len(data.test)) == (96, 24, 30)
    assert sorted(set(data.test.labels.tolist())) == list(range(10))
    assert all(Path(os.fsdecode(path)).parent.name == f"c{label:02d}"
               for path, label in zip(data.test.paths, data.test.labels, strict=True))
    assert data.train.nbytes() == 8 * len(data.train)  # its labels: the pixels stay on disk


def test_validation_is_carved_out_of_train_by_seed(folder):
    def paths(seed: int) -> tuple[set[str], set[str]]:
        data = load_data("imagefolder", root=folder, val_fraction=0.2, seed=seed)
        return set(data.train.paths), set(data.val.paths)

    train, val = paths(0)
    assert not train & val and len(train | val) == 10 * PER_CLASS
    assert paths(0) == (train, val) and paths(1)[1] != val


def test_evaluation_decodes_the_first_images_at_image_size_with_the_centre_crop(folder):
    data = load_data("imagefolder", root=folder, val_fraction=0.2, view=ImageView(16, "resized", 0))
    head = data.val.head(5)
    assert isinstance(head, Split) and head.images.shape == (5, 3, 16, 16) and head.images.dtype == torch.uint8
    assert torch.equal(head.labels, data.val.labels[:5])
    with Image.open(os.fsdecode(data.val.paths[0])) as image:  # 20x20: centre 17.5x17.5 box, resized to 16
        expected = np.array(image.convert("RGB").resize((16, 16), Image.BILINEAR, box=(1.25, 1.25, 18.75, 18.75)))
    assert torch.equal(head.images[0], torch.from_numpy(expected).permute(2, 0, 1))
    assert torch.equal(data.val.head(5).images, head.images)


@pytest.mark.parametrize("crop", ["resized", "padded"])
def test_an_epoch_depends_on_its_generator_alone_not_on_the_number_of_loader_workers(folder, crop):
    data = load_data("imagefolder", root=folder, val_fraction=0.2, view=ImageView(16, crop, 0))
    in_process = epoch(data.train, 5)
    two_workers = epoch(data.train.with_view(ImageView(16, crop, 2)), 5)
    assert [len(y) for _, y in in_process] == [16] * 6
    for (x, y), (x2, y2) in zip(in_process, two_workers, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
    other = epoch(data.train, 6)
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in in_process]))
    seen = torch.cat([y for _, y in in_process]).sort().values
    assert torch.equal(seen, data.train.labels.sort().values)  # every image once


def test_the_padded_crop_shifts_by_at_most_four_pixels_and_flips(tmp_path):
    size = 16
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(size)[None, :] * 10 + 50  # red: the column, green: the row
    pixels[..., 1] = np.arange(size)[:, None] * 10 + 50
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(pixels).save(tmp_path / split / "a" / f"{i}.png")
    data = load_data("imagefolder", root=tmp_path, val_fraction=0.1, view=ImageView(size, "padded", 0))
    assert data.crop_padding == 4 and data.hflip
    (x, _), *_ = iterate_batches(data.train, 36, shuffle=True, generator=torch.Generator().manual_seed(0),
                                 crop_padding=data.crop_padding, hflip=True)
    images = (x * 255).round().to(torch.uint8)
    flipped, shifts = 0, set()
    for image in images:
        red, green = image[0].long(), image[1].long()
        inside = (red > 0) & (green > 0)  # the rest is zero padding
        cols, rows = (red[inside] - 50) // 10, (green[inside] - 50) // 10
        col_of = torch.nonzero(inside)[:, 1]
        mirrored = bool((cols.diff()[col_of.diff() == 1] < 0).any()) if len(cols) > 1 else False
        flipped += mirrored
        dy = int((torch.nonzero(inside)[:, 0] - rows).unique().item())
        shifts.add(dy)
        assert abs(dy) <= 4
    assert 0 < flipped < len(images) and len(shifts) > 1


def test_tiny_imagenet_reads_through_imagefolder_as_through_its_tensor_cache(tmp_path):
    write_fake_tiny_imagenet(tmp_path)
    cached = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.2)
    streamed = load_data("imagefolder", root=tmp_path / "tiny-imagenet-200", val_fraction=0.2,
                         view=ImageView(64, "padded", 0))
    assert streamed.num_classes == 2 and (streamed.crop_padding, streamed.hflip) == (4, True)
    assert torch.equal(streamed.test.labels, cached.test.labels)
    assert torch.equal(streamed.test.head(4).images, cached.test.images)
    assert torch.equal(streamed.val.head(10).images, cached.val.images)  # the same seeded carve-out


def test_a_folder_without_train_or_val_or_images_is_a_config_error_naming_data_root(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_data("imagefolder", root=tmp_path)
    assert error.value.key == "data.root" and str(tmp_path / "train") in error.value.message
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no .* images under") as error:
        load_data("imagefolder", root=tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "val" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "b" / "0.png")
    with pytest.raises(ConfigError, match="class 'b'"):
        load_data("imagefolder", root=tmp_path)
    with pytest.raises(ConfigError) as error:
        load_data("imagefolder", root=tmp_path, download=True)
    assert error.value.key == "data.download"


@pytest.mark.parametrize("key, value", [("data.image_size", 4), ("data.crop", "random"), ("data.loader_workers", -1)])
def test_bad_image_folder_keys_are_config_errors(tmp_path, key, value):
    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: imagefolder}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [f"{key}={value}"], check_files=False)
    assert error.value.key == key


def test_auto_teachers_of_different_folders_are_cached_apart(tmp_path):
    from tune_mtard.teachers.recipes import recipe_key

    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: imagefolder, root: /data/a}\n")
    first = load_config(path, check_files=False)
    keys = {recipe_key(cfg, "clean") for cfg in (first, first.with_values({"data.root": "/data/b"}),
                                                   first.with_values({"data.image_size": 64}))}
    assert len(keys) == 3 and recipe_key(first, "clean") == recipe_key(load_config(path, check_files=False), "clean")


def test_bench_memory_sizes_an_image_folder_trial_by_image_size_with_no_data_on_the_device(folder, tmp_path):
    from tune_mtard.benchmarks.memory import bench_memory

    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: imagefolder, root: {folder}, image_size: 16, batch_size: 4}}\n"
                    "student: {arch: digits_cnn}\n"
                    "teachers: {clean: {arch: digits_cnn}, robust: {arch: digits_cnn}}\n")
    small = bench_memory(load_config(path, check_files=False), None, 80.0)
    large = bench_memory(load_config(path, ["data.image_size=32"], check_files=False), None, 80.0)
    assert small["dataset_on_device_gib"] == 0
    assert large["student_saved_activations_gib"]["fp32"] > 2 * small["student_saved_activations_gib"]["fp32"]
    with pytest.raises(ConfigError) as error:
        bench_memory(load_config(path, [f"data.root={tmp_path}"], check_files=False), None, 80.0)
    assert error.value.key == "data.root"


@pytest.mark.slow
def test_train_runs_an_epoch_on_a_folder_of_two_thousand_pngs(tmp_path):
    folder = write_image_folder(tmp_path / "images", 200, side=20, val_per_class=5)
    config = tmp_path / "run.yaml"
    config.write_text(f"""\
name: folder-run
seed: 0
device: cpu
data: {{dataset: imagefolder, root: {folder}, image_size: 16, crop: padded, loader_workers: 2,
        val_fraction: 0.2, batch_size: 64}}
student: {{arch: digits_cnn}}
teachers:
  clean:  {{arch: digits_cnn, checkpoint: auto, recipe: natural, epochs: 2, lr: 0.05, batch_size: 64}}
  robust: {{arch: digits_cnn, checkpoint: auto, recipe: pgd-at, epochs: 2, lr: 0.05, batch_size: 64}}
  cache_dir: {tmp_path / 'teachers'}
attack: {{epsilon: 0.03, step_size: 0.01, steps: 1}}
train: {{epochs: 1, lr: 0.05}}
eval: {{n_examples: 20, pgd_steps: 1, final_n_examples: 0}}
""")
    done = subprocess.run([sys.executable, "-m", "tune_mtard.train", "--config", str(config), "--out",
                           str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "--no-progress"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val_clean_acc"] > 0.2 and metrics["test_n_examples"] == 50  # chance: 0.1
    trace = (tmp_path / "run" / "balance_trace.csv").read_text().splitlines()
    assert len(trace) == 1 + 25  # 1600 training images (2000 less validation) in batches of 64
