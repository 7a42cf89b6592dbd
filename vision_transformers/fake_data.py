"""Small datasets in the real on-disk formats, for smoke tests without the real data.

    python -m vision_transformers.fake_data --out /tmp/fake   # writes cifar/, imagenet/, mnist/ under /tmp/fake

The files are read by torchvision's own classes exactly as the real ones are: CIFAR-10
python batches (pickled dicts with ``data`` uint8 (N, 3072) and ``labels``), an
ImageFolder tree of PNGs, MNIST idx files. The pixels are random, so nothing can be
learnt from them; the CIFAR files do not match the official md5 checksums, so load them
with ``--no_checksum``.
"""

from __future__ import annotations

import argparse
import os
import sys
import pickle
import struct

import numpy as np
from PIL import Image

__all__ = ["write_cifar10", "write_image_folder", "write_mnist_idx"]


def write_cifar10(root, per_batch=6, test_size=8, seed=0):
    """A tiny CIFAR-10 in the real python-batch format; returns {split: (uint8 HWC images, labels)}."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    out = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        data = rng.randint(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.randint(0, 10, size=n)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
        out[split][1].extend(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                     "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}


def write_image_folder(root, classes=("cat", "dog", "fish"), per_class=(3, 2), size=(40, 48), seed=0):
    rng = np.random.RandomState(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                arr = rng.randint(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, c, f"{c}_{i}.png"))
    return root


def write_mnist_idx(root, n_train=12, n_test=5, seed=0):
    rng = np.random.RandomState(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.randint(0, 10, size=n).astype(np.uint8)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
        out[prefix] = (images, labels.tolist())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write tiny fake CIFAR-10 / ImageNet-folder / MNIST datasets")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"{p.prog}: error: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    write_cifar10(os.path.join(args.out, "cifar"))
    write_image_folder(os.path.join(args.out, "imagenet"))
    write_mnist_idx(os.path.join(args.out, "mnist"))
    print(f"wrote {args.out}/cifar (use --no_checksum), {args.out}/imagenet, {args.out}/mnist")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
