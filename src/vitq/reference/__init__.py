"""Reference models: small timm ViT, DeiT (distilled) and Swin classifiers trained on Fashion-MNIST.

They are the embedded default of the CLI and the models every benchmark reports on. Each has an
``-outlier`` twin made by an exact, function-preserving rescaling of a few LayerNorm output
channels folded into the consuming Linear (see :func:`vitq.passes.reparam.make_outlier_variant`):
the same float function, but post-LayerNorm channel ranges 8-32x the median, as in ImageNet ViTs.

Weights live in ``weights/<name>.safetensors`` beside a ``<name>.json`` that records the
architecture arguments, the preprocessing, the FP test accuracy and the outlier scales.
``scripts/train_reference.py`` re-creates them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..errors import ModelError

WEIGHTS_DIR = Path(__file__).parent / "weights"

FMNIST_PRETRAINED_CFG: dict[str, Any] = {
    "input_size": (1, 28, 28),
    "mean": (0.2860,),
    "std": (0.3530,),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "num_classes": 10,
}


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    arch: str  # "vit" | "deit" | "swin"
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (1, 28, 28)
    description: str = ""


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "fmnist-vit": ReferenceSpec(
        "fmnist-vit", "vit",
        dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6,
             num_heads=4, mlp_ratio=4.0, qkv_bias=True),
        (1, 28, 28), "timm ViT, 28x28 grey, patch 4, dim 64, depth 6, 4 heads",
    ),
    "fmnist-deit": ReferenceSpec(
        "fmnist-deit", "deit",
        dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6,
             num_heads=4, mlp_ratio=4.0, qkv_bias=True),
        (1, 28, 28), "timm DeiT, distilled (class + distillation token), same size as fmnist-vit,"
                     " distilled from fmnist-vit",
    ),
    "fmnist-swin": ReferenceSpec(
        "fmnist-swin", "swin",
        dict(img_size=32, patch_size=2, in_chans=1, num_classes=10, window_size=4, embed_dim=32,
             depths=(2, 2, 2), num_heads=(2, 4, 8), mlp_ratio=4.0),
        (1, 32, 32), "timm Swin, 32x32 grey (resized), patch 2, window 4, dims 32/64/128",
    ),
}
OUTLIER_SUFFIX = "-outlier"


def list_reference_models() -> list[str]:
    names = []
    for n in REFERENCE_MODELS:
        names += [n, n + OUTLIER_SUFFIX]
    return names


def build_architecture(spec: ReferenceSpec) -> nn.Module:
    """The untrained timm module of a reference model, with its preprocessing in ``pretrained_cfg``."""
    from ..adapters.timm import build_architecture as build_timm

    model = build_timm(spec.arch, spec.kwargs)
    cfg = dict(FMNIST_PRETRAINED_CFG)
    cfg["input_size"] = spec.input_size
    cfg["architecture"] = spec.name
    model.pretrained_cfg = cfg
    return model


def meta_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.json"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def load_meta(name: str) -> dict[str, Any]:
    p = meta_path(name)
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def is_reference(name: str) -> bool:
    base = name[: -len(OUTLIER_SUFFIX)] if name.endswith(OUTLIER_SUFFIX) else name
    return base in REFERENCE_MODELS


def load_reference(name: str, weights: bool = True) -> nn.Module:
    """Build reference model ``name`` (``fmnist-vit``, ``fmnist-deit-outlier``, ...) in eval mode."""
    outlier = name.endswith(OUTLIER_SUFFIX)
    base = name[: -len(OUTLIER_SUFFIX)] if outlier else name
    if base not in REFERENCE_MODELS:
        raise ModelError(f"unknown reference model {name!r}: choose one of {', '.join(list_reference_models())}")
    spec = REFERENCE_MODELS[base]
    model = build_architecture(spec)
    meta = load_meta(base)
    if weights:
        tr = meta.get("train") or {}
        if tr.get("epochs_done", tr.get("epochs")) != tr.get("epochs"):
            raise ModelError(f"reference model {base} is still being trained (epoch {tr.get('epochs_done')}/"
                             f"{tr.get('epochs')}): wait for scripts/train_reference.py to finish")
        wp = weights_path(base)
        if not wp.is_file():
            raise ModelError(
                f"weights of reference model {base} are missing ({wp}): run scripts/train_reference.py {base}"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(wp)))
    model.pretrained_cfg = {**model.pretrained_cfg, "fp_top1": meta.get("fp_top1")}
    if outlier:
        from ..passes.reparam import apply_channel_scales

        scales = meta.get("outlier_scales")
        if not scales:
            raise ModelError(f"reference model {base} has no outlier scales in {meta_path(base)}: "
                             f"run scripts/train_reference.py --outliers-only {base}")
        apply_channel_scales(model, {k: {int(c): float(s) for c, s in v.items()} for k, v in scales.items()})
        model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name}
    return model.eval()


def reference_fp_top1(name: str) -> Optional[float]:
    base = name[: -len(OUTLIER_SUFFIX)] if name.endswith(OUTLIER_SUFFIX) else name
    v = load_meta(base).get("fp_top1")
    return None if v is None else float(v)
