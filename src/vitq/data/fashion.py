"""Fashion-MNIST read straight from its four IDX files (gzipped or not): the files Debian's
``dataset-fashion-mnist`` installs, or any folder holding them. Items are uint8 tensors, so a
whole batch is preprocessed at once (:class:`FMNISTBatches`)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError

#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FMNIST_HINT = (
    "install Debian's package with `apt-get install dataset-fashion-mnist`, "
    "or pass fashion-mnist:DIR with a folder holding the four IDX files"
)


def _find_idx(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / (stem + ".gz")):
        if cand.is_file():
            return cand
    raise DataError(f"missing Fashion-MNIST file {stem}[.gz] in {folder}: {_FMNIST_HINT}")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array, checking its header and length."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path} ({e}): re-install or re-download it") from None
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated (only {len(data)} bytes): re-download it")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic): re-download it")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated in its header: re-download it")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    need = int(np.prod(shape))
    if len(data) - header != need:
        raise DataError(
            f"IDX file {path} holds {len(data) - header} bytes of data but its header says {need}:"
            " the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST split read from IDX files; items are ``(uint8 tensor 1xHxW, label)``."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[os.PathLike | str], split: str = "train",
                 transform: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        if split not in FASHION_MNIST_FILES:
            raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
        folder = Path(root) if root is not None else DEBIAN_FASHION_MNIST
        if not folder.is_dir():
            raise DataError(f"Fashion-MNIST folder {folder} does not exist: {_FMNIST_HINT}")
        img_stem, lbl_stem = FASHION_MNIST_FILES[split]
        images = read_idx(_find_idx(folder, img_stem))
        labels = read_idx(_find_idx(folder, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files in {folder} do not match "
                f"(images {images.shape}, labels {labels.shape}): re-download them"
            )
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # N,1,28,28 uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])



def fmnist_base(ds: Dataset) -> tuple[Optional[FashionMNIST], Optional[list[int]]]:
    """The FashionMNIST under ``ds`` (possibly a Subset) and the subset indices."""
    if isinstance(ds, FashionMNIST):
        return ds, None
    if isinstance(ds, Subset) and isinstance(ds.dataset, FashionMNIST):
        return ds.dataset, list(ds.indices)
    return None, None


class FMNISTBatches(Dataset):
    """Index-only view whose collate preprocesses a whole batch at once (fast path)."""

    def __init__(self, base: FashionMNIST, indices: Optional[list[int]]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, i: int) -> int:
        return self.indices[i] if self.indices is not None else i

    def collate(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        t = torch.tensor(idx)
        x = self.base.images[t]
        if self.base.transform is not None:
            x = self.base.transform(x)
        return x, self.base.targets[t]
