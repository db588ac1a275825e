"""Datasets, preprocessing and calibration sampling.

* Fashion-MNIST is read straight from its four IDX files (gzipped or not): the files Debian's
  ``dataset-fashion-mnist`` installs, or any folder holding them.
* ImageNet-layout folders (``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/*.jpg``) are read
  with :class:`torchvision.datasets.ImageFolder`.
* Preprocessing follows a :class:`PreprocessConfig` (``input_size``, ``mean``, ``std``,
  ``interpolation``, ``crop_pct``) that the model's adapter derives from the model
  (``vitq.models.data_config``: timm's ``pretrained_cfg``, a Hugging Face image-processor config),
  so a model trained at 28x28 on one grey channel and an ImageNet model at 224x224 on RGB are both
  fed what they expect.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------
# IDX reading
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Preprocessing from the model's pretrained_cfg
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreprocessConfig:
    """The fields that decide how an image is fed to a model (timm's ``pretrained_cfg`` names; an
    adapter fills them from its library's own configuration)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def fit_channels(v: Sequence[float], n: int) -> tuple[float, ...]:
    if len(v) == n:
        return tuple(v)
    avg = float(sum(v) / len(v))
    return tuple([avg] * n)


class Preprocess:
    """uint8 or float image tensor (C,H,W) or batch (N,C,H,W) -> normalised float tensor the model expects.

    Resize (shorter side to ``size / crop_pct``), centre crop to ``size``, grey -> RGB when the
    model wants 3 channels, then ``(x - mean) / std``.
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        self.cfg = cfg
        self._TF = TF
        modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                 "nearest": InterpolationMode.NEAREST}
        self.mode = modes.get(cfg.interpolation, InterpolationMode.BILINEAR)
        c, h, w = cfg.input_size
        self.crop = (h, w)
        scale = 1.0 / cfg.crop_pct if cfg.crop_pct > 0 else 1.0
        self.resize = (int(math.floor(h * scale)), int(math.floor(w * scale)))
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        TF = self._TF
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if tuple(x.shape[-2:]) != self.resize:
            x = TF.resize(x, list(self.resize), interpolation=self.mode, antialias=True)
        if tuple(x.shape[-2:]) != self.crop:
            x = TF.center_crop(x, list(self.crop))
        want = self.cfg.input_size[0]
        have = x.shape[-3]
        if have != want:
            if have == 1:
                x = x.expand(*x.shape[:-3], want, *x.shape[-2:])
            elif want == 1:
                x = x.mean(-3, keepdim=True)
            else:
                raise DataError(f"image has {have} channels but the model wants {want}")
        return (x - self.mean) / self.std


class _PILToTensor:
    def __call__(self, img: Any) -> Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(img.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# Dataset spec parsing: "fashion-mnist", "fashion-mnist:DIR", or an ImageFolder root
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    kind: str  # "fashion-mnist" | "imagefolder"
    root: Optional[str]

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        if spec in ("fashion-mnist", "fmnist"):
            return cls("fashion-mnist", None)
        for prefix in ("fashion-mnist:", "fmnist:"):
            if spec.startswith(prefix):
                return cls("fashion-mnist", spec[len(prefix):])
        if not Path(spec).exists():
            raise DataError(
                f"data {spec!r} is neither 'fashion-mnist', 'fashion-mnist:DIR' nor an existing "
                "ImageFolder root: check the path"
            )
        return cls("imagefolder", spec)

    def __str__(self) -> str:
        if self.kind == "fashion-mnist":
            return "fashion-mnist" + (f":{self.root}" if self.root else "")
        return str(self.root)


def _imagefolder_split(root: Path, split: str, transform: Callable[[Tensor], Tensor]) -> Dataset:
    from torchvision.datasets import ImageFolder

    names = {"train": ("train",), "eval": ("val", "validation", "test")}[split]
    for n in names:
        d = root / n
        if d.is_dir():
            break
    else:
        raise DataError(
            f"ImageFolder root {root} has no {'/'.join(n + '/' for n in names)} folder: "
            "use the ImageNet layout ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg"
        )
    try:
        ds = ImageFolder(str(d), transform=lambda im: transform(_PILToTensor()(im)))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"ImageFolder {d} is empty or unreadable ({e}): add class folders with images") from None
    if len(ds) == 0:
        raise DataError(f"ImageFolder {d} holds no images: add class folders with images")
    return ds


def build_dataset(spec: DataSpec | str, split: str, preprocess: Optional[Callable[[Tensor], Tensor]]) -> Dataset:
    """``split`` is ``'train'`` (calibration source) or ``'eval'`` (test / val split)."""
    if isinstance(spec, str):
        spec = DataSpec.parse(spec)
    if split not in ("train", "eval"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'eval'")
    if spec.kind == "fashion-mnist":
        return FashionMNIST(spec.root, "train" if split == "train" else "test", transform=preprocess)
    assert spec.root is not None
    if preprocess is None:
        raise DataError("an ImageFolder needs a preprocessing transform")
    return _imagefolder_split(Path(spec.root), split, preprocess)


def calibration_subset(ds: Dataset, size: int, seed: int) -> Subset:
    """A seeded random sample of ``size`` items of ``ds`` (the same seed always gives the same images)."""
    n = len(ds)  # type: ignore[arg-type]
    if size <= 0:
        raise DataError(f"calibration size must be positive, got {size}: pass --calib-size N with N >= 1")
    if size > n:
        raise DataError(f"calibration size {size} is larger than the train split ({n} images): pass --calib-size <= {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:size].tolist()
    return Subset(ds, idx)


def eval_subset(ds: Dataset, size: Optional[int]) -> Dataset:
    """The first ``size`` items of the evaluation split (all of it when ``size`` is None)."""
    n = len(ds)  # type: ignore[arg-type]
    if size is None:
        return ds
    if size <= 0:
        raise DataError(f"evaluation size must be positive, got {size}: pass --eval-size N with N >= 1")
    if size > n:
        raise DataError(f"evaluation size {size} is larger than the evaluation split ({n} images): pass --eval-size <= {n}")
    return Subset(ds, list(range(size)))


def _fmnist_base(ds: Dataset) -> tuple[Optional[FashionMNIST], Optional[list[int]]]:
    """The FashionMNIST under ``ds`` (possibly a Subset) and the subset indices."""
    if isinstance(ds, FashionMNIST):
        return ds, None
    if isinstance(ds, Subset) and isinstance(ds.dataset, FashionMNIST):
        return ds.dataset, list(ds.indices)
    return None, None


class _FMNISTBatches(Dataset):
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


def make_loader(ds: Dataset, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    base, indices = _fmnist_base(ds)
    if base is not None:
        view = _FMNISTBatches(base, indices)
        return DataLoader(view, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=view.collate)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers)


def stack_images(ds: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Materialise a (small) dataset as two tensors ``(images, labels)``."""
    xs, ys = [], []
    for x, y in make_loader(ds, batch_size=batch_size):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("the dataset is empty: nothing to calibrate or evaluate on")
    return torch.cat(xs), torch.cat(ys)
