"""Where images come from: the ``--data`` / ``--calib-data`` specs, image folders, sampling, loaders.

* ``--data`` (evaluation, and calibration when no ``--calib-data`` is given): ``fashion-mnist``,
  ``fashion-mnist:DIR``, an ImageNet-layout root (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``;
  ``val/`` alone is enough for evaluation) or a class-folder split itself (``ROOT/<class>/*``), read
  with :class:`torchvision.datasets.ImageFolder`.
* ``--calib-data DIR``: any folder of images, flat or nested, no labels, mixed sizes, formats and
  colour modes (:class:`ImageFiles`). Unreadable files are skipped when the calibration sample is
  drawn and counted (``CalibrationSet.skipped``); fewer readable images than asked is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError
from .fashion import FashionMNIST, FMNISTBatches, fmnist_base

log = logging.getLogger(__name__)

#: file suffixes read as images (PIL decodes them; case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
#: label of an image without one (calibration folders)
NO_LABEL = -1
SPLITS = {"train": ("train",), "eval": ("val", "validation", "test")}


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "fashion-mnist" | "imagefolder" | "images"
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
                "image folder: check the path"
            )
        if not Path(spec).is_dir():
            raise DataError(f"data {spec!r} is a file: pass the folder that holds the images")
        return cls("imagefolder", spec)

    def __str__(self) -> str:
        if self.kind == "fashion-mnist":
            return "fashion-mnist" + (f":{self.root}" if self.root else "")
        return str(self.root)


#: PIL modes of more than 8 bits per pixel that hold integers of up to 16 bits (16-bit PNG / TIFF greyscale)
WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: "str | Path") -> Any:
    """A decoded PIL image, or a one-line DataError naming the file. Decoding is bounded by PIL's decompression-bomb
    limit (a header claiming billions of pixels is refused before they are allocated). A greyscale image of 16 bits
    per pixel is scaled to 8 bits (PIL's own conversion clips every value above 255); a float image is refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            out = im.copy()
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode safely ({str(e).split('.')[0]}): resize it, or remove "
                        "it from the folder") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        "remove or replace the file") from None
    if out.mode in WIDE_INT_MODES:
        return _to_8_bits(out, path)
    if out.mode == "F":
        raise DataError(f"image {path} holds 32-bit float pixels, whose range is unknown: save it as an 8- or 16-bit "
                        "image")
    return out


def _to_8_bits(im: Any, path: "str | Path") -> Any:
    """A 16-bit greyscale image as 8-bit ``L``: value * 255 / 65535, rounded (the full 16-bit range maps to 0..255,
    as image viewers show it)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"image {path} holds 32-bit integer pixels outside 0..65535: save it as an 8- or 16-bit image")
    out = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    out.info["vitq_scaled_from"] = im.mode
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")


class ImageFiles(Dataset):
    """Every image file under ``root`` (recursively, sorted, hidden files skipped), without labels:
    items are ``(transform(image), NO_LABEL)``."""

    def __init__(self, root: "str | Path", transform: Callable[[Any], Tensor]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"calibration folder {self.root} does not exist or is not a folder: check the path")
        self.files = sorted(p for p in self.root.rglob("*") if _is_image(p))
        if not self.files:
            raise DataError(f"calibration folder {self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, "
                            "...): point --calib-data at a folder of images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(read_image(self.files[i])), NO_LABEL

    def readable(self, i: int) -> bool:
        return _probe(self, i, self.files[i])


def _probe(ds: Any, i: int, path: "str | Path") -> bool:
    """Whether item ``i`` of a folder dataset decodes; a 16-bit image's index is kept in ``ds.scaled`` (counted in
    the run's summary, as the unreadable files are)."""
    try:
        im = read_image(path)
    except DataError as e:
        log.info("skipping %s", e)  # counted in the run's summary
        return False
    if "vitq_scaled_from" in im.info:
        ds.__dict__.setdefault("scaled", set()).add(i)
    return True


class CalibrationSet(Subset):
    """A seeded sample of a dataset; ``skipped``: the unreadable files passed over to draw it; ``scaled``: its files
    of 16 bits per pixel, scaled to 8."""

    def __init__(self, dataset: Dataset, indices: list[int], skipped: Optional[list[str]] = None,
                 scaled: Optional[list[str]] = None) -> None:
        super().__init__(dataset, indices)
        self.skipped = list(skipped or [])
        self.scaled = list(scaled or [])


class _ImageFolderItems(Dataset):
    """torchvision's ImageFolder with vitq's reader (one-line errors naming the file)."""

    def __init__(self, folder: Path, transform: Callable[[Any], Tensor]) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(folder), loader=lambda p: p,
                                      is_valid_file=lambda p: _is_image(Path(p)))
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"image folder {folder} has no class folders with images ({str(e).splitlines()[0]}): "
                            "use ROOT/<class>/*.jpg (or --calib-data DIR for unlabeled images)") from None
        self.classes, self.samples, self.transform = self.folder.classes, self.folder.samples, transform
        self.root = folder

    @property
    def files(self) -> list[str]:
        return [p for p, _ in self.samples]

    def readable(self, i: int) -> bool:
        return _probe(self, i, self.samples[i][0])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(read_image(path)), label


def _has_class_folders(d: Path) -> bool:
    return any(c.is_dir() and any(_is_image(f) for f in c.iterdir()) for c in d.iterdir() if not c.name.startswith("."))


def _imagefolder_split(root: Path, split: str, transform: Callable[[Any], Tensor]) -> Dataset:
    names = SPLITS[split]
    d = next((root / n for n in names if (root / n).is_dir()), None)
    if d is None:
        other = next((root / n for s in SPLITS.values() for n in s if (root / n).is_dir()), None)
        if other is None and _has_class_folders(root):
            d = root  # ROOT/<class>/*: the split itself
        elif split == "train":
            raise DataError(f"image folder {root} has no train/ folder to calibrate on: pass --calib-data DIR "
                            "(any folder of images) or use the ImageNet layout ROOT/train/<class>/*.jpg")
        else:
            raise DataError(f"image folder {root} has no {'/'.join(n + '/' for n in names)} folder: use the ImageNet "
                            "layout ROOT/val/<class>/*.jpg, or pass the class-folder split itself")
    ds = _ImageFolderItems(d, transform)
    if len(ds) == 0:
        raise DataError(f"image folder {d} holds no images: add class folders with images")
    return ds


def build_dataset(spec: "DataSpec | str", split: str, preprocess: Optional[Callable[..., Tensor]]) -> Dataset:
    """``split`` is ``'train'`` (calibration source) or ``'eval'`` (test / val split). ``preprocess``:
    a :class:`~vitq.data.Transforms` (image files through the model library's own transform), or a
    tensor transform (Fashion-MNIST; for image files it receives the decoded image as a uint8 tensor)."""
    if isinstance(spec, str):
        spec = DataSpec.parse(spec)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'eval'")
    tensor_tf = getattr(preprocess, "tensor", preprocess)
    if spec.kind == "fashion-mnist":
        return FashionMNIST(spec.root, "train" if split == "train" else "test", transform=tensor_tf)
    assert spec.root is not None
    if preprocess is None:
        raise DataError("an image folder needs a preprocessing transform")
    return _imagefolder_split(Path(spec.root), split, _image_transform(preprocess))


def _image_transform(preprocess: Callable[..., Tensor]) -> Callable[[Any], Tensor]:
    image = getattr(preprocess, "image", None)
    if image is not None:
        return image  # type: ignore[no-any-return]
    from torchvision.transforms.functional import pil_to_tensor

    return lambda im: preprocess(pil_to_tensor(im.convert("RGB")))


def calibration_images(root: "str | Path", preprocess: Callable[..., Tensor]) -> ImageFiles:
    """``--calib-data DIR``: every image under ``root``, preprocessed for the model."""
    return ImageFiles(root, _image_transform(preprocess))


def calibration_subset(ds: Any, size: int, seed: int, at_most: bool = False) -> CalibrationSet:
    """A seeded random sample of ``size`` items of ``ds`` (the same seed always gives the same images).
    From an :class:`ImageFiles`, unreadable files are skipped (and counted) while the sample is drawn. ``at_most``:
    ``size`` is a ceiling (the recipe's default, not asked for): fewer readable images than that is the sample."""
    n = len(ds)  # type: ignore[arg-type]
    if size <= 0:
        raise DataError(f"calibration size must be positive, got {size}: pass --calib-size N with N >= 1")
    files = isinstance(ds, (ImageFiles, _ImageFolderItems))  # decoded lazily: unreadable files are skipped
    where = f"{ds.root} ({n} image files)" if files else f"the train split ({n} images)"
    if size > n:
        raise DataError(f"calibration size {size} is larger than {where}: pass --calib-size <= {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    if not files:
        return CalibrationSet(ds, order[:size])
    idx: list[int] = []
    skipped: list[str] = []
    for i in order:
        if len(idx) == size:
            break
        if ds.readable(i):
            idx.append(i)
        else:
            skipped.append(str(ds.files[i]))
    if not idx:
        raise DataError(f"none of the {n} files under {ds.root} is a readable image (e.g. {skipped[0]}): pass a folder "
                        "of images PIL can open (JPEG, PNG, ...)")
    if len(idx) < size and not at_most:
        raise DataError(f"only {len(idx)} of the {n} files under {ds.root} are readable images ({len(skipped)} "
                        f"skipped), fewer than the {size} calibration images asked for: pass --calib-size <= {len(idx)} "
                        "or add images")
    wide: set[int] = getattr(ds, "scaled", set())
    return CalibrationSet(ds, idx, skipped, [str(ds.files[i]) for i in idx if i in wide])


def folder_classes(ds: Any) -> Optional[tuple[Path, list[str]]]:
    """``(folder, class names)`` of a class-folder split (also inside a Subset), or None for other data."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return (ds.root, list(ds.classes)) if isinstance(ds, _ImageFolderItems) else None


def check_classes(eval_ds: Any, num_outputs: Optional[int] = None, train_ds: Any = None) -> None:
    """Labels of class folders are each folder's index in sorted order: refuse an evaluation split with more
    classes than the model's head scores, and train / val splits whose class folders differ."""
    ev = folder_classes(eval_ds)
    if ev is None:
        return
    if num_outputs is not None and len(ev[1]) > num_outputs:
        raise DataError(f"{ev[0]} has {len(ev[1])} class folders but the model's head scores {num_outputs} classes, so "
                        f"the images of the last {len(ev[1]) - num_outputs} folders can never be right: evaluate on the "
                        "model's classes, or use a model with that many outputs")
    tr = folder_classes(train_ds) if train_ds is not None else None
    if tr is not None and tr[1] != ev[1]:
        only_t, only_e = sorted(set(tr[1]) - set(ev[1])), sorted(set(ev[1]) - set(tr[1]))
        what = "; ".join(x for x in (f"only in {tr[0].name}/: {', '.join(only_t[:3])}" if only_t else "",
                                      f"only in {ev[0].name}/: {', '.join(only_e[:3])}" if only_e else "") if x)
        raise DataError(f"the class folders of {tr[0]} and {ev[0]} differ ({what}): give both splits the same class "
                        "folders, or calibrate on any folder of images with --calib-data DIR")


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


def make_loader(ds: Dataset, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader in ``ds``'s order (or seeded shuffle); ``num_workers`` decode image files in
    parallel (Fashion-MNIST, already in memory, is preprocessed a batch at a time instead)."""
    if num_workers < 0:
        raise DataError(f"--workers {num_workers}: give 0 (decode in the main process) or more")
    g = torch.Generator().manual_seed(seed)
    base, indices = fmnist_base(ds)
    if base is not None:
        view = FMNISTBatches(base, indices)
        return DataLoader(view, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=view.collate)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      persistent_workers=False)


def stack_images(ds: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Materialise a (small) dataset as two tensors ``(images, labels)``."""
    xs, ys = [], []
    for x, y in make_loader(ds, batch_size=batch_size):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("the dataset is empty: nothing to calibrate or evaluate on")
    return torch.cat(xs), torch.cat(ys)


__all__ = ["IMAGE_EXTENSIONS", "NO_LABEL", "CalibrationSet", "DataSpec", "ImageFiles", "build_dataset",
           "calibration_images", "check_classes", "folder_classes", "calibration_subset", "eval_subset", "make_loader", "read_image", "stack_images"]
