"""How images become model inputs.

A :class:`PreprocessConfig` holds the fields that decide it (timm's ``pretrained_cfg`` names:
``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``); the model's adapter
derives it from the model (timm's ``pretrained_cfg``, a Hugging Face image-processor config). A
:class:`Transforms` pairs two ways of applying it:

* ``image``: decoded image files (PIL) -> model input, with the model library's *own* evaluation
  transform (timm's ``create_transform``, a Hugging Face image processor), built by the adapter, so
  vitq's inputs equal the library's for any image size;
* ``tensor``: image tensors (``uint8`` or float, ``C,H,W`` or ``N,C,H,W``) -> model input, a batched
  torch re-statement of timm's evaluation transform (:class:`Preprocess`). Fashion-MNIST, whose
  images are already tensors at the reference models' size, goes this way, a whole batch at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import DataError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class PreprocessConfig:
    """The fields that decide how an image is fed to a model (timm's ``pretrained_cfg`` names; an
    adapter fills them from its library's own configuration)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def with_overrides(self, input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
                       interpolation: Optional[str] = None) -> "PreprocessConfig":
        """The CLI's ``--input-size C H W`` / ``--crop-pct`` / ``--interpolation`` (as timm's validate
        script offers them), checked."""
        cfg = self
        if input_size is not None:
            size = tuple(int(v) for v in input_size)
            if len(size) != 3 or min(size) <= 0:
                raise DataError(f"--input-size {' '.join(map(str, input_size))}: give three positive integers C H W, "
                                "e.g. --input-size 3 224 224")
            if size[0] != cfg.input_size[0]:
                raise DataError(f"--input-size has {size[0]} channels but the model takes {cfg.input_size[0]}: "
                                "keep the model's channel count")
            cfg = replace(cfg, input_size=size)  # type: ignore[arg-type]
        if crop_pct is not None:
            if not 0.0 < float(crop_pct) <= 1.0:
                raise DataError(f"--crop-pct {crop_pct} must be in (0, 1], e.g. 0.875 (1.0: no border cropped)")
            cfg = replace(cfg, crop_pct=float(crop_pct))
        if interpolation is not None:
            if interpolation not in INTERPOLATIONS:
                raise DataError(f"--interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
            cfg = replace(cfg, interpolation=interpolation)
        return cfg

    @property
    def scale_size(self) -> tuple[int, int]:
        """The size before the centre crop: ``floor(size / crop_pct)`` per side (timm's eval transform)."""
        _, h, w = self.input_size
        pct = self.crop_pct if self.crop_pct > 0 else 1.0
        return int(math.floor(h / pct)), int(math.floor(w / pct))


def fit_channels(v: Sequence[float], n: int) -> tuple[float, ...]:
    if len(v) == n:
        return tuple(v)
    avg = float(sum(v) / len(v))
    return tuple([avg] * n)


class Preprocess:
    """uint8 or float image tensor (C,H,W) or batch (N,C,H,W) -> normalised float tensor the model expects.

    timm's evaluation transform restated for tensors: for a square input, the shorter side resized to
    ``floor(size / crop_pct)`` and the centre cropped to ``size`` (``crop_mode: squash``, or a
    non-square input: both sides resized); grey -> RGB when the model wants 3 channels; then
    ``(x - mean) / std``. Images already at the input size pass through unresized (Fashion-MNIST and
    the reference models). Decoded image files go through the library's own transform instead
    (:class:`Transforms`).
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        self.cfg = cfg
        self._TF = TF
        modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                 "nearest": InterpolationMode.NEAREST}
        self.mode = modes.get(cfg.interpolation, InterpolationMode.BILINEAR)
        _, h, w = cfg.input_size
        self.crop = (h, w)
        self.resize = cfg.scale_size
        self.mean = torch.tensor(cfg.mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std).view(-1, 1, 1)

    def _resized(self, x: Tensor) -> Tensor:
        TF = self._TF
        hw = tuple(x.shape[-2:])
        if hw == self.crop:
            return x
        square = self.resize[0] == self.resize[1] and self.cfg.crop_mode != "squash"
        if square:
            if min(hw) != self.resize[0]:  # shorter side to scale_size, aspect kept (torchvision Resize(int))
                x = TF.resize(x, [self.resize[0]], interpolation=self.mode, antialias=True)
        elif hw != self.resize:
            x = TF.resize(x, list(self.resize), interpolation=self.mode, antialias=True)
        return TF.center_crop(x, list(self.crop))

    def __call__(self, img: Tensor) -> Tensor:
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        x = self._resized(x)
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


def pil_mode(channels: int) -> str:
    """The PIL mode a model with ``channels`` input channels is fed (greyscale / palette / CMYK / alpha
    images are converted, as timm's and torchvision's folder loaders do)."""
    return "L" if channels == 1 else "RGB"


@dataclass(frozen=True)
class Transforms:
    """A model's preprocessing both ways (module docstring): ``image`` for decoded files (PIL, any mode,
    converted here), ``tensor`` for image tensors. Calling it dispatches on the input's type."""

    config: PreprocessConfig
    library_image: Callable[[Any], Tensor]
    tensor: Callable[[Tensor], Tensor]
    source: str = ""  # which transform ``library_image`` is, for the run's record

    def image(self, img: Any) -> Tensor:
        return self.library_image(img.convert(pil_mode(self.config.input_size[0])))

    def __call__(self, img: Any) -> Tensor:
        return self.tensor(img) if isinstance(img, Tensor) else self.image(img)


def torchvision_image_transform(cfg: PreprocessConfig) -> Callable[[Any], Tensor]:
    """PIL -> tensor through :class:`Preprocess` (for adapters whose library has no transform of its own)."""
    from torchvision.transforms.functional import pil_to_tensor

    pre = Preprocess(cfg)
    return lambda img: pre(pil_to_tensor(img))


__all__ = ["CROP_MODES", "INTERPOLATIONS", "Preprocess", "PreprocessConfig", "Transforms", "fit_channels", "pil_mode",
           "torchvision_image_transform"]
