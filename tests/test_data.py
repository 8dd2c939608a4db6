"""Data sources: bundled sets (de-duplicated, deterministic splits), CIFAR and ImageFolder layouts."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mirrorla.tools.data import dedup_and_split, load_data


def _hashes(dataset):
    return {dataset.images[i].numpy().tobytes() for i in range(len(dataset))}


def test_animal_mnist_is_deduplicated_and_split_deterministically():
    a = load_data("animal-mnist")
    b = load_data("animal-mnist")
    assert a.num_classes == 10 and a.in_chans == 1 and a.img_size == 28
    assert a.num_duplicates_removed >= 284  # the package holds 284 exact duplicate copies
    sizes = (len(a.train), len(a.val), len(a.test))
    assert sum(sizes) == 10_000 - a.num_duplicates_removed
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.images, b.test.images)
    train, val, test = _hashes(a.train), _hashes(a.val), _hashes(a.test)
    assert len(train) == len(a.train) and not (train & val) and not (train & test) and not (val & test)
    # stratified: every class in every split, in roughly the 80/10/10 proportion
    for part in (a.train, a.val, a.test):
        counts = torch.bincount(part.labels, minlength=10)
        assert counts.min() > 0.7 * counts.float().mean()
    x, y = a.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10


def test_split_seed_changes_the_split():
    a, b = load_data("digits", split_seed=0), load_data("digits", split_seed=1)
    assert not torch.equal(a.test.images, b.test.images)


def test_dedup_drops_conflicting_duplicates():
    images = np.zeros((6, 2, 2), dtype=np.uint8)
    images[1, 0, 0] = 1  # unique
    images[2, 0, 0] = 2
    images[3, 0, 0] = 2  # duplicate of 2, same label
    images[4, 0, 0] = 3
    images[5, 0, 0] = 3  # duplicate of 4, other label: both dropped
    labels = np.array([0, 0, 1, 1, 0, 1])
    split, removed = dedup_and_split(images, labels, fractions=(1.0, 0.0, 0.0))
    assert removed == 3
    assert sorted(split["train"].tolist()) == [0, 1, 2]


def test_mnist5k_and_digits_load():
    m = load_data("mnist5k")
    assert m.num_classes == 10 and len(m.train) + len(m.val) + len(m.test) == 5000
    d = load_data("digits")
    assert d.img_size == 16 and d.train[0][0].shape == (1, 16, 16)


def _write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_layout(tmp_path):
    _write_cifar10(tmp_path)
    bundle = load_data(f"cifar10:{tmp_path}")
    assert (bundle.num_classes, bundle.in_chans, len(bundle.train), len(bundle.val)) == (10, 3, 20, 4)
    x, _ = bundle.train[0]
    assert x.shape == (3, 32, 32)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is corrupt"):
        load_data(f"cifar10:{tmp_path}")


def write_image_folder(root, classes=("cat", "dog"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = (rng.random((size, size, 3)) * 60 + ci * 150).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def test_image_folder_layout(tmp_path):
    write_image_folder(tmp_path)
    bundle = load_data(f"folder:{tmp_path}", img_size=32)
    assert bundle.num_classes == 2 and bundle.in_chans == 3 and len(bundle.train) == 12
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)


@pytest.mark.parametrize("spec", ["folder:/no/such/dir", "cifar10:/no/such/dir", "cifar100:/no/such/dir"])
def test_missing_dataset_path_is_named(spec):
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        load_data(spec)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
        load_data("imagenet")
