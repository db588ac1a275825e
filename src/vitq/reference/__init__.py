"""Reference models: small timm ViT, DeiT (distilled) and Swin classifiers trained on Fashion-MNIST.

They are the embedded default of the CLI and the models every benchmark reports on. Each has an
``-outlier`` twin made by an exact, function-preserving rescaling of a few LayerNorm output
channels folded into the consuming Linear (see :func:`vitq.passes.reparam.make_outlier_variant`):
the same float function, but post-LayerNorm channel ranges 8-32x the median, as in ImageNet ViTs.

Weights live in ``weights/<name>.safetensors`` beside a ``<name>.json`` that records the
architecture arguments, the preprocessing, the FP test accuracy and the outlier scales.
``scripts/train_reference.py`` re-creates them.

Hugging Face twins (``fmnist-vit-hf`` and ``fmnist-vit-hf-outlier``) are ``save_pretrained``
folders ``weights/<name>/`` made by ``scripts/timm_to_hf.py`` from the timm model: the same float
function, loaded exactly as a user's ``hf:DIR`` is (``vitq_reference.json`` there holds the FP
top-1 and the outlier scales under the HF LayerNorm names). They need ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..adapters import get_library
from ..adapters.timm import build_architecture as build_timm
from ..errors import ModelError
from ..passes.reparam import apply_channel_scales

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
    #: an image encoder: trained with a linear head, which load_reference removes (``reset_classifier(0)``)
    headless: bool = False


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
    "fmnist-eva": ReferenceSpec(
        "fmnist-eva", "eva",
        dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
             mlp_ratio=8 / 3, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
             ref_feat_shape=(7, 7)),
        (1, 28, 28), "timm Eva (EVA-02 style): rotary position embedding, SwiGLU MLP with its inner LayerNorm,"
                     " separate q / k / v; dim 64, depth 6",
    ),
    "fmnist-siglip": ReferenceSpec(
        "fmnist-siglip", "vit",
        dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
             mlp_ratio=4.0, qkv_bias=True, class_token=False, global_pool="map"),
        (1, 28, 28), "timm ViT, SigLIP style: no class token, attention-pool (map) head; dim 64, depth 6",
    ),
    "fmnist-dinov2": ReferenceSpec(
        "fmnist-dinov2", "vit",
        dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
             mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, reg_tokens=4, no_embed_class=True),
        (1, 28, 28), "timm ViT, DINOv2 style image encoder (headless): LayerScale, 4 register tokens;"
                     " trained with a linear head that is removed",
        headless=True,
    ),
}
OUTLIER_SUFFIX = "-outlier"
#: Hugging Face reference models: name -> the timm reference model they were converted from
HF_REFERENCE_MODELS: dict[str, str] = {"fmnist-vit-hf": "fmnist-vit", "fmnist-dinov2-hf": "fmnist-dinov2"}
HF_META_FILE = "vitq_reference.json"


def list_reference_models() -> list[str]:
    names = []
    for n in [*REFERENCE_MODELS, *HF_REFERENCE_MODELS]:
        names += [n, n + OUTLIER_SUFFIX]
    return names


def _base(name: str) -> str:
    return name[: -len(OUTLIER_SUFFIX)] if name.endswith(OUTLIER_SUFFIX) else name


def build_architecture(spec: ReferenceSpec) -> Any:
    """The untrained timm module of a reference model, with its preprocessing in ``pretrained_cfg``."""
    model: Any = build_timm(spec.arch, spec.kwargs)
    cfg = dict(FMNIST_PRETRAINED_CFG)
    cfg["input_size"] = spec.input_size
    cfg["architecture"] = spec.name
    model.pretrained_cfg = cfg
    return model


def meta_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.json"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def hf_folder(name: str) -> Path:
    """The ``save_pretrained`` folder of a Hugging Face reference model."""
    return WEIGHTS_DIR / _base(name)


def load_meta(name: str) -> dict[str, Any]:
    p = hf_folder(name) / HF_META_FILE if _base(name) in HF_REFERENCE_MODELS else meta_path(name)
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def is_reference(name: str) -> bool:
    base = _base(name)
    return base in REFERENCE_MODELS or base in HF_REFERENCE_MODELS


def _load_hf_reference(base: str) -> nn.Module:
    folder = hf_folder(base)
    if not (folder / "config.json").is_file():
        raise ModelError(f"reference model {base} is missing ({folder}): run scripts/timm_to_hf.py "
                         f"{HF_REFERENCE_MODELS[base]} --out {folder}")
    model, _ = get_library("hf").load(f"hf:{folder}")
    return model


def load_reference(name: str, weights: bool = True) -> Any:
    """Build reference model ``name`` (``fmnist-vit``, ``fmnist-deit-outlier``, ...) in eval mode."""
    outlier = name.endswith(OUTLIER_SUFFIX)
    base = _base(name)
    if not is_reference(name):
        raise ModelError(f"unknown reference model {name!r}: choose one of {', '.join(list_reference_models())}")
    meta = load_meta(base)
    if base in HF_REFERENCE_MODELS:
        model = _load_hf_reference(base)
        if outlier:
            _apply_outliers(model, base, meta)
        return model.eval()
    spec = REFERENCE_MODELS[base]
    model = build_architecture(spec)
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
    if spec.headless:
        model.reset_classifier(0)
    model.pretrained_cfg = {**model.pretrained_cfg, "fp_top1": meta.get("fp_top1")}
    if outlier:
        _apply_outliers(model, base, meta)
        model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name}
    return model.eval()


def _apply_outliers(model: nn.Module, base: str, meta: dict[str, Any]) -> None:
    scales = meta.get("outlier_scales")
    if not scales:
        raise ModelError(f"reference model {base} has no outlier scales in {meta_path(base)}: "
                         f"run scripts/train_reference.py --outliers-only {base}")
    apply_channel_scales(model, {k: {int(c): float(s) for c, s in v.items()} for k, v in scales.items()})


def reference_fp_top1(name: str) -> Optional[float]:
    """The float model's test top-1 (an encoder's: its k-NN top-1, ``fp_knn_top1``)."""
    base = _base(name)
    spec = REFERENCE_MODELS.get(HF_REFERENCE_MODELS.get(base, base))
    v = load_meta(base).get("fp_knn_top1" if spec is not None and spec.headless else "fp_top1")
    return None if v is None else float(v)
