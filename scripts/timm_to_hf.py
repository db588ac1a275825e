#!/usr/bin/env python3
"""Convert a timm ViT / DeiT (distilled) / Swin classifier into the equivalent Hugging Face model.

The HF model computes the same float function: same weights (timm's fused ``qkv`` split into
``q_proj`` / ``k_proj`` / ``v_proj``), same LayerNorm eps, eager attention, no dropout. It is how
the tests and the benchmarks get HF twins of timm models, and how the shipped HF reference models
(``fmnist-vit-hf`` and its outlier twin, ``vitq/reference/weights/<name>/``) were made::

    python scripts/timm_to_hf.py fmnist-vit --out src/vitq/reference/weights/fmnist-vit-hf

Supported timm configurations: ViT / DeiT with a class token (and a distillation token), token
pooling, no registers, layer scale, q/k norm or fc_norm; a headless DINOv2-style ViT (registers,
layer scale, ``no_embed_class``) as ``Dinov2WithRegistersModel``; Swin v1 without absolute position
embedding. Anything else raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _split_qkv(sd: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    w = sd[f"{src}.weight"]
    c = w.shape[0] // 3
    for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{dst}.{n}.weight"] = w[i * c:(i + 1) * c].clone()
        if f"{src}.bias" in sd:
            out[f"{dst}.{n}.bias"] = sd[f"{src}.bias"][i * c:(i + 1) * c].clone()


def _copy(sd: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    for k in ("weight", "bias"):
        if f"{src}.{k}" in sd:
            out[f"{dst}.{k}"] = sd[f"{src}.{k}"].clone()


def _ln_eps(m: nn.Module) -> float:
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            return float(mod.eps)
    return 1e-6


def convert_vit(m: nn.Module) -> nn.Module:
    """timm VisionTransformer / VisionTransformerDistilled -> ViTForImageClassification /
    DeiTForImageClassificationWithTeacher."""
    import transformers
    from timm.models.deit import VisionTransformerDistilled

    distilled = isinstance(m, VisionTransformerDistilled)
    if getattr(m, "cls_token", None) is None or m.global_pool != "token" or getattr(m, "reg_token", None) is not None:
        raise ValueError("only class-token ViTs with token pooling and no registers convert")
    if not isinstance(m.fc_norm, nn.Identity) or not isinstance(m.norm_pre, nn.Identity):
        raise ValueError("fc_norm / norm_pre have no Hugging Face counterpart")
    blk = m.blocks[0]
    if not isinstance(blk.ls1, nn.Identity) or not isinstance(blk.attn.q_norm, nn.Identity):
        raise ValueError("layer scale / q-k norm have no Hugging Face counterpart")
    img = m.patch_embed.img_size
    kw: dict[str, Any] = dict(
        hidden_size=m.embed_dim, num_hidden_layers=len(m.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=_ln_eps(m), image_size=int(img[0]),
        patch_size=int(m.patch_embed.patch_size[0]), num_channels=m.patch_embed.proj.in_channels,
        qkv_bias=blk.attn.qkv.bias is not None, num_labels=m.num_classes,
    )
    if distilled:
        config = transformers.DeiTConfig(**kw)
        config.architectures = ["DeiTForImageClassificationWithTeacher"]
        hf: nn.Module = transformers.DeiTForImageClassificationWithTeacher(config)
        prefix = "deit"
    else:
        config = transformers.ViTConfig(**kw)
        config.architectures = ["ViTForImageClassification"]
        hf = transformers.ViTForImageClassification(config)
        prefix = "vit"
    sd = m.state_dict()
    out: dict[str, torch.Tensor] = {}
    e = f"{prefix}.embeddings"
    _copy(sd, "patch_embed.proj", f"{e}.patch_embeddings.projection", out)
    out[f"{e}.cls_token"] = sd["cls_token"].clone()
    out[f"{e}.position_embeddings"] = sd["pos_embed"].clone()
    if distilled:
        out[f"{e}.distillation_token"] = sd["dist_token"].clone()
    for i in range(len(m.blocks)):
        s, d = f"blocks.{i}", f"{prefix}.layers.{i}"
        _copy(sd, f"{s}.norm1", f"{d}.layernorm_before", out)
        _split_qkv(sd, f"{s}.attn.qkv", f"{d}.attention", out)
        _copy(sd, f"{s}.attn.proj", f"{d}.attention.o_proj", out)
        _copy(sd, f"{s}.norm2", f"{d}.layernorm_after", out)
        _copy(sd, f"{s}.mlp.fc1", f"{d}.mlp.fc1", out)
        _copy(sd, f"{s}.mlp.fc2", f"{d}.mlp.fc2", out)
    _copy(sd, "norm", f"{prefix}.layernorm", out)
    if distilled:
        _copy(sd, "head", "cls_classifier", out)
        _copy(sd, "head_dist", "distillation_classifier", out)
    else:
        _copy(sd, "head", "classifier", out)
    hf.load_state_dict(out, strict=True)
    hf.config._attn_implementation = "eager"
    return hf.eval()


def convert_swin(m: nn.Module) -> nn.Module:
    """timm SwinTransformer -> SwinForImageClassification."""
    import transformers

    if getattr(m, "absolute_pos_embed", None) is not None:
        raise ValueError("Swin with an absolute position embedding does not convert")
    blk0 = m.layers[0].blocks[0]
    img = m.patch_embed.img_size
    ws = blk0.target_window_size if hasattr(blk0, "target_window_size") else blk0.window_size
    config = transformers.SwinConfig(
        image_size=int(img[0]), patch_size=int(m.patch_embed.patch_size[0]), num_channels=m.patch_embed.proj.in_channels,
        embed_dim=m.embed_dim, depths=[len(s.blocks) for s in m.layers],
        num_heads=[s.blocks[0].attn.num_heads for s in m.layers], window_size=int(ws[0]),
        mlp_ratio=blk0.mlp.fc1.out_features / blk0.mlp.fc1.in_features, qkv_bias=blk0.attn.qkv.bias is not None,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, hidden_act="gelu",
        use_absolute_embeddings=False, layer_norm_eps=_ln_eps(m), num_labels=m.num_classes,
    )
    config.architectures = ["SwinForImageClassification"]
    hf = transformers.SwinForImageClassification(config)
    sd = m.state_dict()
    out: dict[str, torch.Tensor] = {}
    _copy(sd, "patch_embed.proj", "swin.embeddings.patch_embeddings.projection", out)
    _copy(sd, "patch_embed.norm", "swin.embeddings.norm", out)
    for si, stage in enumerate(m.layers):
        if si > 0:  # timm merges at the start of a stage, HF at the end of the previous one
            d = f"swin.encoder.layers.{si - 1}.downsample"
            _copy(sd, f"layers.{si}.downsample.norm", f"{d}.norm", out)
            _copy(sd, f"layers.{si}.downsample.reduction", f"{d}.reduction", out)
        for bi in range(len(stage.blocks)):
            s, d = f"layers.{si}.blocks.{bi}", f"swin.encoder.layers.{si}.blocks.{bi}"
            _copy(sd, f"{s}.norm1", f"{d}.layernorm_before", out)
            _split_qkv(sd, f"{s}.attn.qkv", f"{d}.attention", out)
            _copy(sd, f"{s}.attn.proj", f"{d}.attention.o_proj", out)
            out[f"{d}.attention.relative_position_bias.relative_position_bias_table"] = \
                sd[f"{s}.attn.relative_position_bias_table"].clone()
            _copy(sd, f"{s}.norm2", f"{d}.layernorm_after", out)
            _copy(sd, f"{s}.mlp.fc1", f"{d}.mlp.fc1", out)
            _copy(sd, f"{s}.mlp.fc2", f"{d}.mlp.fc2", out)
    _copy(sd, "norm", "swin.layernorm", out)
    _copy(sd, "head.fc", "classifier", out)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    if missing or unexpected:
        raise ValueError(f"Swin conversion left missing {missing[:4]} / unexpected {unexpected[:4]}")
    hf.config._attn_implementation = "eager"
    return hf.eval()


def _int_ratio(hidden: int, dim: int) -> int:
    if hidden % dim:
        raise ValueError(f"an MLP of {hidden} for width {dim}: the DINOv2 config takes a whole mlp_ratio")
    return hidden // dim


def convert_dinov2(m: nn.Module) -> nn.Module:
    """A headless timm DINOv2-style ViT (class token, register tokens, LayerScale, position embedding of the patches
    only: ``no_embed_class``) -> Dinov2WithRegistersModel (its pooler output is the class token after the final
    LayerNorm, as timm's token pooling). The class token's position embedding is zero."""
    import transformers

    if m.num_classes != 0 or m.global_pool != "token" or not getattr(m, "no_embed_class", False):
        raise ValueError("only headless (num_classes=0), token-pooled ViTs with no_embed_class convert to DINOv2")
    if not isinstance(m.fc_norm, nn.Identity) or not isinstance(m.norm_pre, nn.Identity):
        raise ValueError("fc_norm / norm_pre have no Hugging Face DINOv2 counterpart")
    blk = m.blocks[0]
    if isinstance(blk.ls1, nn.Identity) or not isinstance(blk.attn.q_norm, nn.Identity):
        raise ValueError("a DINOv2 layer has layer scale and no q-k norm")
    img = m.patch_embed.img_size
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=m.embed_dim, num_hidden_layers=len(m.blocks), num_attention_heads=blk.attn.num_heads,
        mlp_ratio=_int_ratio(blk.mlp.fc1.out_features, blk.mlp.fc1.in_features), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=_ln_eps(m), image_size=int(img[0]),
        patch_size=int(m.patch_embed.patch_size[0]), num_channels=m.patch_embed.proj.in_channels,
        qkv_bias=blk.attn.qkv.bias is not None, num_register_tokens=int(m.num_reg_tokens), use_swiglu_ffn=False)
    config.architectures = ["Dinov2WithRegistersModel"]
    hf = transformers.Dinov2WithRegistersModel(config)
    sd = m.state_dict()
    out: dict[str, torch.Tensor] = {}
    _copy(sd, "patch_embed.proj", "embeddings.patch_embeddings.projection", out)
    out["embeddings.cls_token"] = sd["cls_token"].clone()
    out["embeddings.register_tokens"] = sd["reg_token"].clone()
    pos = sd["pos_embed"]
    out["embeddings.position_embeddings"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    out["embeddings.mask_token"] = torch.zeros(1, m.embed_dim)
    for i in range(len(m.blocks)):
        s, d = f"blocks.{i}", f"encoder.layer.{i}"
        _copy(sd, f"{s}.norm1", f"{d}.norm1", out)
        _split_qkv(sd, f"{s}.attn.qkv", f"{d}.attention", out)
        _copy(sd, f"{s}.attn.proj", f"{d}.attention.o_proj", out)
        out[f"{d}.layer_scale1.lambda1"] = sd[f"{s}.ls1.gamma"].clone()
        _copy(sd, f"{s}.norm2", f"{d}.norm2", out)
        _copy(sd, f"{s}.mlp.fc1", f"{d}.mlp.fc1", out)
        _copy(sd, f"{s}.mlp.fc2", f"{d}.mlp.fc2", out)
        out[f"{d}.layer_scale2.lambda1"] = sd[f"{s}.ls2.gamma"].clone()
    _copy(sd, "norm", "layernorm", out)
    hf.load_state_dict(out, strict=True)
    hf.config._attn_implementation = "eager"
    return hf.eval()


def convert(m: nn.Module) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(m, SwinTransformer):
        return convert_swin(m)
    if getattr(m, "reg_token", None) is not None:
        return convert_dinov2(m)
    return convert_vit(m)


def preprocessor_config(m: nn.Module) -> dict[str, Any]:
    """The image-processor settings equal to the timm model's preprocessing (resize to the input size)."""
    from vitq.models import data_config

    cfg = data_config(m)
    _, h, w = cfg.input_size
    if cfg.crop_pct != 1.0:
        raise ValueError("only crop_pct 1.0 preprocessing converts to a ViTImageProcessor config")
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": PIL_RESAMPLE[cfg.interpolation], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(cfg.mean), "image_std": list(cfg.std)}


def ln_name_map(m: nn.Module, hf: nn.Module) -> dict[str, str]:
    """timm LayerNorm name -> HF LayerNorm name, for the LayerNorms reparameterization targets."""
    from timm.models.swin_transformer import SwinTransformer

    out = {}
    if isinstance(m, SwinTransformer):
        for si, stage in enumerate(m.layers):
            if si > 0:
                out[f"layers.{si}.downsample.norm"] = f"swin.encoder.layers.{si - 1}.downsample.norm"
            for bi in range(len(stage.blocks)):
                out[f"layers.{si}.blocks.{bi}.norm1"] = f"swin.encoder.layers.{si}.blocks.{bi}.layernorm_before"
                out[f"layers.{si}.blocks.{bi}.norm2"] = f"swin.encoder.layers.{si}.blocks.{bi}.layernorm_after"
        return out
    if getattr(m, "reg_token", None) is not None:  # DINOv2 (Dinov2WithRegistersModel: the base model itself)
        return {f"blocks.{i}.{n}": f"encoder.layer.{i}.{n}" for i in range(len(m.blocks)) for n in ("norm1", "norm2")}
    prefix = hf.base_model_prefix
    for i in range(len(m.blocks)):
        out[f"blocks.{i}.norm1"] = f"{prefix}.layers.{i}.layernorm_before"
        out[f"blocks.{i}.norm2"] = f"{prefix}.layers.{i}.layernorm_after"
    return out


def write_reference(name: str, out: Path) -> None:
    """``save_pretrained`` folder of reference model ``name``'s HF twin, its preprocessor config, and
    ``vitq_reference.json`` (FP top-1, the outlier scales under HF LayerNorm names)."""
    from vitq.reference import load_meta, load_reference

    m = load_reference(name)
    hf = convert(m)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(m), indent=2) + "\n")
    meta = load_meta(name)
    names = ln_name_map(m, hf)
    scales = {names[k]: v for k, v in (meta.get("outlier_scales") or {}).items()}
    ref = {"converted_from": name, "fp_top1": meta.get("fp_top1"), "eval_split": meta.get("eval_split"),
           **({"fp_knn_top1": meta["fp_knn_top1"]} if "fp_knn_top1" in meta else {}),
           "outlier_scales": scales,
           "note": "made by scripts/timm_to_hf.py: the same float function as the timm reference model"}
    (out / "vitq_reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    print(f"wrote {out} ({sum(p.numel() for p in hf.parameters())} parameters)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a timm reference model (fmnist-vit, fmnist-deit, fmnist-swin, fmnist-dinov2)")
    ap.add_argument("--out", required=True, help="the folder to write (save_pretrained layout)")
    args = ap.parse_args()
    write_reference(args.name, Path(args.out))


if __name__ == "__main__":
    main()
