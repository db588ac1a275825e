"""Which architectures go into vitq: every timm ViT-family architecture and Hugging Face vision class we know of,
as a tiny random-weight configuration, tried the way a user would - ``vitq.quantize(model, "minmax", "W8A8")``,
the output against the float model, every ``nn.Linear`` of the model counted against the quantized ones, and
the ONNX export's parity in onnxruntime - or, where vitq refuses it, the one line it says.

    .venv/bin/python -m scripts.coverage            # writes docs/coverage.md

``tests/test_coverage.py`` holds every case to its row: a supported architecture must quantize every Linear
of its blocks, keep W8A8 output cosine >= 0.99 and export with parity; a refused one must be refused with one
line naming the architecture.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "coverage.md"
#: the bar a supported architecture meets at W8A8 (minmax): output cosine against the float model
MIN_COSINE = 0.99


@dataclass(frozen=True)
class Case:
    """One architecture: how to build a tiny one, and whether vitq takes it today (``supported``) or which part it
    refuses (``refused``: the reason a user is given, for the table)."""

    key: str
    library: str  # timm | hf
    name: str  # a timm model name, or a transformers class name
    build: Callable[[], nn.Module] = field(compare=False, repr=False)
    supported: bool = False
    note: str = ""
    size: int = 32
    #: what the refusal must name (a regex; default: the model's class name)
    refusal: str = ""
    #: Linear weight matrices the model's output does not depend on, which the adapter removes
    unused_linears: int = 0
    #: Linear layers that stay float by design: they read constants, not the image (Swin V2's position-bias MLP)
    constant_linears: int = 0

    def input(self, n: int = 4) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, self.size, self.size, generator=g)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, **kw).eval()
        with torch.no_grad():  # timm starts Swin V2's q / v biases and its residual post-norms at zero (a block adds
            # nothing) and its logit scales equal: trained ones are not
            for mod in m.modules():
                if isinstance(mod, nn.LayerNorm) and mod.weight is not None and not mod.weight.any():
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0.0, 0.1)
            for pname, p in m.named_parameters():
                if pname.endswith(("q_bias", "v_bias")):
                    p.normal_(0.0, 0.05)
                elif pname.endswith("logit_scale"):
                    p.uniform_(1.5, 3.0)
        return m
    return build


def _timm_any_size(name: str, size: int, **kw: Any) -> Callable[[], nn.Module]:
    """A timm model without a fixed input size (PVTv2): its preprocessing (and so its export's example input) set to
    the test's image size, as a user's pretrained_cfg would say."""
    build = _timm(name, **kw)

    def sized() -> nn.Module:
        m = build()
        m.pretrained_cfg = {**getattr(m, "pretrained_cfg", {}), "input_size": (3, size, size)}
        return m
    return sized


def _timm_cait() -> Callable[[], nn.Module]:
    """CaiT as trained ones are: timm starts its layer scales at 1e-5 (the blocks add almost nothing) and the
    talking heads' mixes near zero (every head's scores all but erased); a trained mix is near the identity."""
    build = _timm("cait_xxs24_224", **_VIT, depth_token_only=1, init_values=0.5)

    def cait() -> nn.Module:
        m = build()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, mod in m.named_modules():
                if name.endswith(("proj_l", "proj_w")):
                    h = mod.weight.shape[0]
                    mod.weight.copy_(torch.eye(h) + 0.3 * torch.randn(h, h, generator=g))
        return m
    return cait


_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5)
_SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), img_size=32, patch_size=2, window_size=4, num_classes=5)


def _hf(cls: str, config: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        torch.manual_seed(0)
        cfg = getattr(tf, config)(**kw)
        cfg._attn_implementation = "eager"
        m = getattr(tf, cls)(cfg).eval()
        with torch.no_grad():  # transformers starts relative position bias tables at zero: a trained one is not
            for name, p in m.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.normal_(0.0, 0.5)
                elif name.endswith("logit_scale"):  # Swin V2's, all log(10) at the start
                    p.uniform_(1.5, 3.0)
        return m
    return build


def _hf_siglip_cls() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.SiglipVisionConfig(**{k: v for k, v in _HF_VIT.items() if k != "num_labels"})
    cfg = tf.SiglipConfig(vision_config=vision.to_dict(), num_labels=5)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return tf.SiglipForImageClassification(cfg).eval()


_HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_labels=5)
_HF_SWIN = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=32, patch_size=2, window_size=4, num_labels=5)

CASES: list[Case] = [
    # timm: taken
    Case("vit", "timm", "vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", **_VIT), True, "ViT"),
    Case("deit", "timm", "deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", **_VIT), True, "DeiT"),
    Case("deit_distilled", "timm", "deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224", **_VIT),
         True, "DeiT with distillation token"),
    Case("deit3", "timm", "deit3_small_patch16_224", _timm("deit3_small_patch16_224", **_VIT), True,
         "DeiT-III (LayerScale)"),
    Case("dinov2", "timm", "vit_small_patch14_dinov2", _timm("vit_small_patch14_dinov2", **_VIT), True,
         "DINOv2 (LayerScale)"),
    Case("dinov2_reg", "timm", "vit_small_patch14_reg4_dinov2", _timm("vit_small_patch14_reg4_dinov2", **_VIT), True,
         "DINOv2 with registers"),
    Case("openclip", "timm", "vit_base_patch16_clip_224", _timm("vit_base_patch16_clip_224", **_VIT), True,
         "OpenCLIP image tower (pre-norm, GELU)"),
    Case("flexivit", "timm", "flexivit_small", _timm("flexivit_small", **_VIT), True, "FlexiViT"),
    Case("vit_gap", "timm", "vit_medium_patch16_gap_256", _timm("vit_medium_patch16_gap_256", **_VIT), True,
         "ViT with global average pooling"),
    Case("swin", "timm", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224", **_SWIN), True, "Swin"),
    # timm: refused today
    Case("eva02", "timm", "eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", **_VIT), True,
         "EVA-02 Ti / S: rotary embeddings, packed SwiGLU, fused qkv with q / v biases (Eva)"),
    Case("eva02_base", "timm", "eva02_base_patch14_224", _timm("eva02_base_patch14_224", **_VIT), True,
         "EVA-02 B / L: rotary embeddings, SwiGLU with its inner LayerNorm, separate q / k / v (Eva)"),
    Case("vit_rope", "timm", "vit_base_patch16_rope_224", _timm("vit_base_patch16_rope_224", **_VIT), True,
         "ViT with rotary embeddings (Eva with AttentionRope)"),
    Case("siglip", "timm", "vit_base_patch16_siglip_224", _timm("vit_base_patch16_siglip_224", **_VIT), True,
         "SigLIP image tower (attention-pool head, global_pool='map'; its latent query's projection reads a constant and "
         "stays float)", constant_linears=1),
    Case("clip_quickgelu", "timm", "vit_base_patch16_clip_quickgelu_224",
         _timm("vit_base_patch16_clip_quickgelu_224", **_VIT), True, "OpenAI CLIP image tower (QuickGELU)"),
    Case("beit", "timm", "beit_base_patch16_224", _timm("beit_base_patch16_224", **_VIT), True,
         "BEiT: relative position bias per block, layer scale"),
    Case("beit_shared", "timm", "beitv2_base_patch16_224",
         _timm("beitv2_base_patch16_224", **_VIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True), True,
         "BEiT v2 with a shared relative position bias"),
    Case("swinv2", "timm", "swinv2_tiny_window8_256", _timm("swinv2_tiny_window8_256", **_SWIN), True,
         "Swin V2: cosine attention, continuous position bias (its MLP, 2 Linears a block, reads constant "
         "coordinates and stays float)", constant_linears=8),
    Case("vit_relpos", "timm", "vit_relpos_small_patch16_224", _timm("vit_relpos_small_patch16_224", **_VIT), True,
         "ViT with relative position bias (VisionTransformerRelPos; the bias MLP, 2 Linears a block, reads constant coordinates and stays float)", constant_linears=4),
    Case("vit_parallel", "timm", "vit_small_patch16_18x2_224", _timm("vit_small_patch16_18x2_224", **_VIT), True,
         "ViT with parallel blocks (two attention and two MLP branches, summed)"),
    Case("cait", "timm", "cait_xxs24_224", _timm_cait(), True,
         "CaiT: talking-heads attention (its head-mixing Linears, 2 a block, heads x heads, stay float), "
         "class-attention blocks", constant_linears=4),
    Case("hybrid_r26", "timm", "vit_small_r26_s32_224",
         _timm("vit_small_r26_s32_224", embed_dim=32, depth=2, num_heads=2, img_size=64, num_classes=5), True,
         "hybrid ViT with a ResNet stem (the stem's convolutions stay float, said in the run record; the 1x1 "
         "projection's weight is quantized)", size=64),
    Case("pvt_v2", "timm", "pvt_v2_b0", _timm_any_size("pvt_v2_b0", 64, num_classes=5, depths=(1, 1, 1, 1),
                                                        embed_dims=(16, 32, 40, 64)), True,
         "PVT v2: spatial-reduction attention, depthwise-conv MLP", size=64),
    Case("xcit", "timm", "xcit_nano_12_p16_224",
         _timm("xcit_nano_12_p16_224", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=16, num_classes=5),
         False, "XCiT (not planned now)"),
    Case("levit", "timm", "levit_128s", _timm("levit_128s", num_classes=5, img_size=32), False, "LeViT (not planned now)"),
    Case("mvitv2", "timm", "mvitv2_tiny", _timm("mvitv2_tiny", num_classes=5, img_size=32), False,
         "MViTv2 (not planned now)"),
    Case("twins", "timm", "twins_pcpvt_small", _timm("twins_pcpvt_small", num_classes=5, img_size=32), False,
         "Twins (not planned now)"),
    Case("hiera", "timm", "hiera_tiny_224", _timm("hiera_tiny_224", num_classes=5, img_size=32), False,
         "Hiera (not planned now)"),
    # Hugging Face: taken
    Case("hf_vit", "hf", "ViTForImageClassification", _hf("ViTForImageClassification", "ViTConfig", **_HF_VIT), True,
         "ViT classifier"),
    Case("hf_deit", "hf", "DeiTForImageClassification", _hf("DeiTForImageClassification", "DeiTConfig", **_HF_VIT),
         True, "DeiT classifier"),
    Case("hf_deit_teacher", "hf", "DeiTForImageClassificationWithTeacher",
         _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_HF_VIT), True, "DeiT with distillation token"),
    Case("hf_swin", "hf", "SwinForImageClassification", _hf("SwinForImageClassification", "SwinConfig", **_HF_SWIN),
         True, "Swin classifier"),
    # Hugging Face: refused today
    Case("hf_vit_headless", "hf", "ViTModel", _hf("ViTModel", "ViTConfig", **_HF_VIT), True,
         "ViT encoder (no head; the pooler's output)"),
    Case("hf_deit_headless", "hf", "DeiTModel", _hf("DeiTModel", "DeiTConfig", **_HF_VIT), True, "DeiT encoder"),
    Case("hf_swin_headless", "hf", "SwinModel", _hf("SwinModel", "SwinConfig", **_HF_SWIN), True,
         "Swin encoder (the pooled embedding)"),
    Case("hf_dinov2", "hf", "Dinov2Model", _hf("Dinov2Model", "Dinov2Config", **_HF_VIT), True,
         "DINOv2 encoder (layer scale)"),
    Case("hf_dinov2_cls", "hf", "Dinov2ForImageClassification",
         _hf("Dinov2ForImageClassification", "Dinov2Config", **_HF_VIT), True,
         "DINOv2 classifier (class token beside the mean patch token)"),
    Case("hf_dinov2_swiglu", "hf", "Dinov2Model (use_swiglu_ffn)",
         _hf("Dinov2Model", "Dinov2Config", **_HF_VIT, use_swiglu_ffn=True), True, "DINOv2 giant-style SwiGLU FFN"),
    Case("hf_dinov2_reg", "hf", "Dinov2WithRegistersModel",
         _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", **_HF_VIT), True, "DINOv2 with registers"),
    Case("hf_dinov2_reg_cls", "hf", "Dinov2WithRegistersForImageClassification",
         _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", **_HF_VIT), True,
         "DINOv2 with registers, classifier"),
    Case("hf_clip", "hf", "CLIPVisionModel", _hf("CLIPVisionModel", "CLIPVisionConfig", **{
        k: v for k, v in _HF_VIT.items() if k != "num_labels"}), True, "CLIP image tower (QuickGELU)"),
    Case("hf_clip_proj", "hf", "CLIPVisionModelWithProjection", _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", **{
        k: v for k, v in _HF_VIT.items() if k != "num_labels"}, projection_dim=16), True,
        "CLIP image tower + projection (image_embeds)"),
    Case("hf_siglip", "hf", "SiglipVisionModel", _hf("SiglipVisionModel", "SiglipVisionConfig", **{
        k: v for k, v in _HF_VIT.items() if k != "num_labels"}), True, "SigLIP image tower (attention-pool head; its probe's "
        "projection reads a constant and stays float)", constant_linears=1),
    Case("hf_siglip_cls", "hf", "SiglipForImageClassification", _hf_siglip_cls, True,
         "SigLIP classifier (the mean token; its unused pool head removed)", unused_linears=5),
    Case("hf_beit", "hf", "BeitForImageClassification", _hf("BeitForImageClassification", "BeitConfig", **_HF_VIT,
                                                                        use_relative_position_bias=True), True,
         "BEiT classifier"),
    Case("hf_data2vec", "hf", "Data2VecVisionForImageClassification",
         _hf("Data2VecVisionForImageClassification", "Data2VecVisionConfig", **_HF_VIT,
             use_relative_position_bias=True), True,
         "data2vec-vision classifier (BEiT in transformers' older module layout; relative position bias per layer, "
         "mean pooling)"),
    Case("hf_data2vec_headless", "hf", "Data2VecVisionModel",
         _hf("Data2VecVisionModel", "Data2VecVisionConfig", **{k: v for k, v in _HF_VIT.items() if k != "num_labels"},
             use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, use_mean_pooling=False),
         True, "data2vec-vision encoder (a shared relative position bias, absolute position embeddings; the class "
         "token)"),
    # Swin V2 at transformers' initializer_range 0.02: the logits of a random tiny model are ~0.01 and almost equal
    # across classes (post-norm blocks), and a per-image cosine of them measures noise; 0.1 gives image-dependent ones
    Case("hf_swinv2", "hf", "Swinv2ForImageClassification",
         _hf("Swinv2ForImageClassification", "Swinv2Config", **_HF_SWIN, initializer_range=0.1), True,
         "Swin V2 classifier (the position-bias MLP, 2 Linears a layer, stays float)", constant_linears=8),
    Case("hf_swinv2_headless", "hf", "Swinv2Model", _hf("Swinv2Model", "Swinv2Config", **_HF_SWIN, initializer_range=0.1), True,
         "Swin V2 encoder (the pooled embedding)", constant_linears=8),
    Case("hf_vitmsn", "hf", "ViTMSNForImageClassification",
         _hf("ViTMSNForImageClassification", "ViTMSNConfig", **_HF_VIT), True, "ViT-MSN classifier"),
]


@dataclass
class Result:
    case: Case
    taken: bool
    message: str = ""  # the refusal's one line
    linears: int = 0  # nn.Linear modules of the float model
    quantized: int = 0  # Linear-like modules whose weight site is quantized
    cosine: Optional[float] = None
    onnx_diff: Optional[float] = None  # max |logit diff| / max |logit|, onnxruntime against the simulation
    seconds: float = 0.0


def _logits(y: Any) -> torch.Tensor:
    """A classifier's logits, or an encoder's embedding as vitq takes it (:func:`vitq.batches.as_embedding`)."""
    from vitq.batches import as_embedding

    v = getattr(y, "logits", None)
    if isinstance(v, torch.Tensor):
        return v
    return y if isinstance(y, torch.Tensor) else as_embedding(y)


def check(case: Case, export: bool = True) -> Result:
    """Try ``case`` as a user would; never raises for a refusal (it is the result)."""
    import vitq
    from vitq.errors import VitqError
    from vitq.nn import QConv2d, QLinear

    t0 = time.perf_counter()
    model = case.build()
    x = case.input()
    with torch.no_grad():
        ref = _logits(model(x)).float()
    # weight matrices: every nn.Linear, and a MultiheadAttention's packed in-projection as the two vitq quantizes it
    # as (the query's rows, the key / value rows); a module the model's output does not depend on is not counted
    # when the adapter removes it (SigLIP's classifier has a pool head it does not use)
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear)) + 2 * sum(
        1 for m in model.modules() if isinstance(m, nn.MultiheadAttention)) - case.unused_linears - case.constant_linears
    try:
        q = vitq.quantize(model, "minmax", "W8A8", calib_data=x)
    except VitqError as e:
        return Result(case, False, str(e).splitlines()[0], linears, seconds=time.perf_counter() - t0)
    res = Result(case, True, linears=linears)
    res.quantized = sum(1 for m in q.modules() if isinstance(m, (QLinear, QConv2d)) and not isinstance(m, QConv2d)
                        and getattr(m, "weight_quant", None) is not None)
    with torch.no_grad():
        y = _logits(q(x)).float()
    res.cosine = float(torch.nn.functional.cosine_similarity(y.flatten(1), ref.flatten(1)).min())
    if export:
        try:
            from vitq.export.deploy import export as do_export
            from vitq.export.onnx import session

            with tempfile.TemporaryDirectory() as d:
                do_export(q, d, "onnx")
                sess = session(Path(d) / "model.onnx")
                out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            yo = torch.from_numpy(out).float().reshape(y.shape)
            res.onnx_diff = float((yo - y).abs().max() / y.abs().max().clamp_min(1e-12))
        except VitqError as e:
            res.message = f"onnx: {str(e).splitlines()[0]}"
    res.seconds = time.perf_counter() - t0
    return res


def render(results: list[Result]) -> list[str]:
    from bench.common import md_table  # the one table writer (bench/common.py)

    lines = ["# Architecture coverage", "",
             "Generated by `scripts/coverage.py` (`python -m scripts.coverage`); `tests/test_coverage.py` holds every row "
             "to what it says. Each architecture is a tiny random-weight configuration (2 blocks, 32-dim, 32 px), "
             "quantized with `vitq.quantize(model, \"minmax\", \"W8A8\")` as a user would: **Linears** = the float model's "
             "`nn.Linear` modules (a MultiheadAttention's packed in-projection counts as its query and key / value "
             "matrices) against those with a quantized weight; **cosine** = the smallest per-image output "
             f"cosine against the float model (the bar: {MIN_COSINE}); **ONNX** = the largest |output difference| of the "
             "exported file in onnxruntime, relative to the largest output. A refused architecture shows the one line "
             "vitq says. The refused ones (XCiT, LeViT, MViTv2, Twins, Hiera) are not planned now.", ""]
    for lib, title in (("timm", "timm"), ("hf", "Hugging Face (transformers)")):
        rows = []
        for r in (r for r in results if r.case.library == lib):
            c = r.case
            if r.taken:
                status = "supported" + ("" if not r.message else f" ({r.message})")
                rows.append([f"`{c.name}`", c.note, status, f"{r.quantized} / {r.linears}",
                             "-" if r.cosine is None else f"{r.cosine:.4f}",
                             "-" if r.onnx_diff is None else f"{r.onnx_diff:.1e}"])
            else:
                said = r.message.split(": vitq supports")[0].replace("|", "/")
                rows.append([f"`{c.name}`", c.note, f"refused: {said}", "-", "-", "-"])
        n_ok = sum(1 for r in results if r.case.library == lib and r.taken)
        n = sum(1 for r in results if r.case.library == lib)
        lines += [f"## {title}: {n_ok} of {n} supported", ""]
        lines += md_table(["architecture", "what", "vitq", "Linears quantized", "cosine W8A8", "ONNX"], rows,
                          align="llllrr")
        lines.append("")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for c in CASES:
        r = check(c, export=not args.no_export)
        results.append(r)
        print(f"{c.key:<18} {'taken' if r.taken else 'refused'}  {r.message[:100]}"
              + ("" if r.cosine is None else f"  cosine {r.cosine:.4f}")
              + ("" if r.onnx_diff is None else f"  onnx {r.onnx_diff:.1e}"), flush=True)
    from bench.common import write_md

    write_md(Path(args.out), render(results))
    print(f"wrote {args.out}")
    bad = [r.case.key for r in results if r.taken != r.case.supported or (r.taken and not (
        r.cosine is not None and r.cosine >= MIN_COSINE and math.isfinite(r.cosine)))]
    if bad:
        print("rows that disagree with the catalogue: " + ", ".join(bad), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
