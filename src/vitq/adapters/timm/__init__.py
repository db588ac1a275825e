"""timm: the library (MODEL = a timm model name, weights from ``--checkpoint FILE``; nothing is
downloaded) and its families, ViT / DeiT (:mod:`.vit`) and Swin (:mod:`.swin`).

What every timm adapter shares lives here: building a model from a source, the reference models'
architectures, and the data config from timm's ``pretrained_cfg``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ...checkpoints import load_into, load_state_file, short_error
from ...data import PreprocessConfig, fit_channels
from ...errors import ModelError
from ..base import Adapter, ModelLibrary, ModelSource, register_library

#: architectures the reference models are built from (``vitq.reference`` names them by these keys)
ARCHITECTURES = {
    "vit": ("timm.models.vision_transformer", "VisionTransformer"),
    "deit": ("timm.models.deit", "VisionTransformerDistilled"),
    "swin": ("timm.models.swin_transformer", "SwinTransformer"),
    "swinv2": ("timm.models.swin_transformer_v2", "SwinTransformerV2"),
    "eva": ("timm.models.eva", "Eva"),
}

#: where timm checkpoints keep their classifier, to infer ``num_classes``
_HEAD_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")


def build_architecture(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """An untrained timm model of one of :data:`ARCHITECTURES` with the given constructor arguments."""
    import importlib

    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown timm architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[arch]
    return getattr(importlib.import_module(module), cls)(**kwargs)


def infer_num_classes(sd: dict[str, torch.Tensor]) -> Optional[int]:
    for k in _HEAD_KEYS:
        if k in sd and sd[k].ndim == 2:
            return int(sd[k].shape[0])
    return None


class TimmLibrary(ModelLibrary):
    name = "timm"
    usage = "a timm model name with --checkpoint FILE"

    def claims(self, model: str) -> bool:
        import timm

        return bool(timm.is_model(model))

    def load(self, model: str, checkpoint: Optional[str] = None, random_weights: bool = False,
             num_classes: Optional[int] = None) -> tuple[nn.Module, ModelSource]:
        sd = None
        if checkpoint:
            sd = load_state_file(checkpoint)
            if num_classes is None:  # a checkpoint without a classifier is an encoder (timm's num_classes=0)
                num_classes = infer_num_classes(sd) or 0
        elif not random_weights:
            raise ModelError(
                f"timm model {model} needs its weights as --checkpoint FILE (.pth/.pt/.safetensors): "
                "nothing is downloaded (use --random-weights for cost measurements only)"
            )
        source = ModelSource("timm", model, checkpoint, num_classes)
        m = self.build(source)
        if sd is not None:
            load_into(m, sd, f"checkpoint {checkpoint}")
        return m, source

    def build(self, source: ModelSource) -> nn.Module:
        import timm

        kw: dict[str, Any] = {} if source.num_classes is None else {"num_classes": source.num_classes}
        try:
            return timm.create_model(source.name, pretrained=False, **kw).eval()
        except Exception as e:  # timm raises many types for bad arguments
            raise ModelError(f"timm cannot build {source.name} ({short_error(e)})") from None

    def source_of(self, model: nn.Module) -> Optional[ModelSource]:
        """A timm model made by ``timm.create_model(NAME, ...)`` names its architecture in ``pretrained_cfg``; the
        source is kept only if ``create_model(NAME, num_classes=...)`` rebuilds every tensor in its shape (other
        constructor arguments, such as ``img_size``, are not recorded by timm)."""
        import timm

        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not isinstance(arch, str) or not timm.is_model(arch):
            return None
        n = getattr(model, "num_classes", None)
        source = ModelSource("timm", arch, None, int(n) if isinstance(n, int) else None)  # 0: an encoder
        try:
            rebuilt = self.build(source).state_dict()
        except ModelError:
            return None
        mine = model.state_dict()
        if any(k not in mine or mine[k].shape != v.shape for k, v in rebuilt.items()):
            return None
        return source


register_library(TimmLibrary())


def timm_num_outputs(model: Any) -> Optional[int]:
    """A timm classifier's class count (``num_classes``; 0 is a model without a head)."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def timm_data_config(model: Any, in_chans: Optional[int], img_size: Optional[tuple[int, int]]) -> PreprocessConfig:
    """The preprocessing a timm model expects, from its ``pretrained_cfg`` (input size, mean / std,
    interpolation, crop_pct), with the channel count and image size the model is actually built for."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = PreprocessConfig()
    input_size = tuple(cfg.get("input_size", default.input_size))
    if in_chans is not None and input_size[0] != in_chans:
        input_size = (in_chans, *input_size[1:])
    if img_size is not None and tuple(input_size[1:]) != img_size:
        input_size = (input_size[0], *img_size)
    mean = tuple(cfg.get("mean", default.mean))
    std = tuple(cfg.get("std", default.std))
    if len(mean) != input_size[0]:
        mean, std = fit_channels(mean, input_size[0]), fit_channels(std, input_size[0])
    return PreprocessConfig(
        input_size=(int(input_size[0]), int(input_size[1]), int(input_size[2])),
        mean=mean, std=std,
        interpolation=str(cfg.get("interpolation", default.interpolation)),
        crop_pct=float(cfg.get("crop_pct", default.crop_pct) or 1.0),
        crop_mode=str(cfg.get("crop_mode", default.crop_mode) or default.crop_mode),
    )


def timm_image_transform(cfg: PreprocessConfig) -> Callable[[Any], Tensor]:
    """timm's own evaluation transform (``timm.data.create_transform``, ``is_training=False``) with the
    resolved config: what ``create_transform(**resolve_data_config(model=m))`` builds for an unmodified
    timm model, and timm's validate script for ``--input-size`` / ``--crop-pct`` / ``--interpolation``."""
    from timm.data import create_transform

    return create_transform(input_size=cfg.input_size, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                            crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode, is_training=False)


def accepts_any_size(model: Any) -> bool:
    """A timm model built for dynamic input sizes (``dynamic_img_size=True``: patch embedding not strict)."""
    pe = getattr(model, "patch_embed", None)
    return bool(getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False)
                or getattr(pe, "strict_img_size", True) is False)


def patch_embed_geometry(model: Any) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """``(in_chans, img_size)`` of a timm model's ``patch_embed`` (``img_size`` None when dynamic)."""
    pe = getattr(model, "patch_embed", None)
    # the image meets the first conv: the projection, or a hybrid ViT's CNN stem (whose output the projection reads)
    first = next((m for m in getattr(pe, "backbone", pe).modules() if isinstance(m, nn.Conv2d)), None) \
        if isinstance(pe, nn.Module) else None
    in_chans = int(first.in_channels) if first is not None else None
    size = getattr(pe, "img_size", None)
    if size is None or getattr(pe, "dynamic_img_size", False):
        return in_chans, None
    if isinstance(size, int):
        return in_chans, (size, size)
    return in_chans, (int(size[0]), int(size[1]))


class TimmAdapter(Adapter):
    """What every timm family adapter shares: the library, the class count of the model's head, the preprocessing
    from its ``pretrained_cfg`` and its patch embedding's geometry, and timm's own eval transform."""

    library = "timm"

    def num_outputs(self, model: Any) -> Optional[int]:
        return timm_num_outputs(model)

    def data_config(self, model: Any) -> PreprocessConfig:
        return timm_data_config(model, *patch_embed_geometry(model))

    def image_transform(self, model: Any, cfg: PreprocessConfig) -> tuple[Callable[[Any], Tensor], str]:
        return timm_image_transform(cfg), "timm.data.create_transform"


from . import beit, cait, eva, pvt, relpos, swin, swinv2, vit  # noqa: E402,F401  (registration of the families)
