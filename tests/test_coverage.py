"""Architecture coverage (docs/coverage.md): every architecture of the catalogue behaves as its row says - a supported
one quantizes every Linear, keeps W8A8 output cosine >= 0.99 and exports to ONNX with parity; a refused one is
refused with one line that names it (never a wrong error, never a traceback)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from scripts.coverage import CASES, MIN_COSINE, _logits, check


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_each_architecture_is_what_its_row_says(case) -> None:
    if case.library == "hf":
        pytest.importorskip("transformers")
    if case.supported:
        pytest.importorskip("onnxruntime")
    r = check(case, export=case.supported)
    assert r.taken == case.supported, r.message
    if case.supported:
        assert r.quantized == r.linears > 0, (r.quantized, r.linears)  # every Linear of the model quantized
        assert r.cosine is not None and r.cosine >= MIN_COSINE, r.cosine
        assert not r.message and r.onnx_diff is not None and r.onnx_diff <= 1e-2, (r.message, r.onnx_diff)
    else:
        assert r.message and "\n" not in r.message and "Traceback" not in r.message
        assert re.search(case.refusal or type(case.build()).__name__, r.message), r.message


def test_the_coverage_page_lists_every_architecture() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "coverage.md").read_text()
    for c in CASES:
        assert f"`{c.name}`" in page, f"docs/coverage.md has no row for {c.name}: python -m scripts.coverage"


NEW = ["clip_quickgelu", "siglip", "eva02", "eva02_base", "vit_rope", "beit", "beit_shared", "hf_vit_headless",
       "hf_dinov2_cls", "hf_dinov2_swiglu", "hf_dinov2_reg_cls", "hf_clip_proj", "vit_parallel", "hf_siglip",
       "hf_siglip_cls", "hf_beit", "hf_swin_headless", "swinv2", "hf_swinv2", "hf_swinv2_headless",
       "vit_relpos", "pvt_v2", "cait", "hf_data2vec", "hf_data2vec_headless", "hybrid_r26"]


@pytest.mark.parametrize("recipe", __import__("vitq").list_recipes())
@pytest.mark.parametrize("key", NEW)
def test_every_recipe_runs_on_the_new_families(key: str, recipe: str) -> None:
    """OpenAI CLIP's image tower (QuickGELU), SigLIP's (attention-pool head) and EVA-02 (rotary embeddings, SwiGLU,
    inner LayerNorm): every shipped recipe runs - the post-GELU quantizers (twin uniform, V-2SF) on QuickGELU, whose
    minimum (-0.1636) lies inside GELU's negative range that their grids cover, and not on SwiGLU's signed product
    (GLU_OUT); TanQ / log2 on the pool's cross-attention and on EVA's rotated q / k, through the one core."""
    import torch
    from test_hf import _short

    import vitq

    case = next(c for c in CASES if c.key == key)
    x = case.input(8)
    q = vitq.quantize(case.build(), _short(recipe), "W4A4", calib_data=x)
    with torch.no_grad():
        out = _logits(q(x))
    assert out.shape[0] == 8 and (torch.isfinite(out).all() or recipe.startswith("fq"))
    if key == "siglip" and recipe not in ("fp",):  # the pool's attention is quantized by the recipe's rules
        probs = {m["quantizer"] for m in vitq.manifest(q) if m["site"] == "attn_pool.matmul_av.quant_a"}
        assert probs and probs != {"float"}, vitq.manifest(q)[-12:]


@pytest.mark.parametrize("key", ["siglip", "hf_siglip"])
def test_an_attention_pool_exports_all_integer(tmp_path, key: str) -> None:
    """SigLIP's pool head: its latent query's projection reads a constant, so it stays a float nn.Linear (the runtime
    folds it) instead of taking QKV_IN's channel-wise input quantizer, which has no integer form and left one site
    emulated in float in every SigLIP export; the default recipe at W8A8 now exports with no fallback."""
    pytest.importorskip("onnxruntime")
    from torch import nn

    import vitq
    from vitq.export.deploy import export

    if key.startswith("hf"):
        pytest.importorskip("transformers")
    case = next(c for c in CASES if c.key == key)
    x = case.input(8)
    q = vitq.quantize(case.build(), "best", "W8A8", calib_data=x)
    name = "attn_pool.q" if key == "siglip" else next(n for n, _ in q.named_modules() if n.endswith("head.q"))
    assert type(q.get_submodule(name)) is nn.Linear
    assert not any(m["site"].startswith(name + ".") for m in vitq.manifest(q))
    rep = export(q, tmp_path, "onnx")
    # Hugging Face's head reads the encoder through its own copy of post_layernorm (whose output is also
    # last_hidden_state), so RepQ folds the kv input's channel-wise quantizer into the copy: no fallback there either
    left = [f["site"] for f in rep["lowering"]["fallbacks"]]
    assert left == [], left


@pytest.mark.parametrize("recipe", ["repq", "dopq-calib", "aocq-balance"])
@pytest.mark.parametrize("key", ["siglip", "eva02", "eva02_base", "vit_rope", "beit", "hf_vit_headless",
                                 "hf_dinov2_cls", "hf_dinov2_swiglu", "hf_dinov2_reg_cls", "hf_clip_proj", "vit_parallel", "hf_siglip",
                                 "hf_siglip_cls", "hf_beit", "hf_swin_headless", "pvt_v2", "cait",
                                 "hf_data2vec", "hf_data2vec_headless", "hybrid_r26"])
def test_reparameterizing_the_new_families_keeps_the_float_function(key: str, recipe: str) -> None:
    """RepQ / MOSF fold into every LayerNorm -> Linear pair (SigLIP: the final norm -> the pool's kv and the pool's
    norm -> its MLP; EVA-02: norm1 -> q / k / v, norm2 -> both SwiGLU inputs, the inner norm -> fc2), and AOCQ's
    LN_alpha / Add_alpha balance the stream: with quantization disabled the model is the float model."""
    import torch
    from conftest import unfuse
    from test_hf import _short

    import vitq
    from vitq.adapters import get_adapter

    case = next(c for c in CASES if c.key == key)
    x = case.input(8)
    m = unfuse(case.build())
    if getattr(m, "attn_pool", None) is not None:
        m.attn_pool.fused_attn = False
    pairs = get_adapter(m).ln_consumers(m)
    with torch.no_grad():  # outlier channels (as ImageNet ViTs have), so that the folds have something to do
        for p in pairs:
            m.get_submodule(p.ln_name).weight[:3] *= 20
        ref = _logits(m(x))
    r = (vitq.Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
         if recipe == "aocq-balance" else _short(recipe))
    q = vitq.quantize(m, r, "W4A4", calib_data=x)
    with torch.no_grad(), vitq.disabled(q):  # float32 rounding of the folds (x20 outliers): ~2e-5 at most
        torch.testing.assert_close(_logits(q(x)), ref, rtol=1e-4, atol=5e-5)
    st = vitq.state_of(q)
    if recipe == "aocq-balance":
        assert sum(v["channels_scaled"] for part in ("add_alpha", "ln_alpha") for v in st.balance[part].values()) > 0
    else:  # every LayerNorm -> Linear pair the adapter names was folded
        assert st.reparam[0]["layernorms"] == len(pairs)


@pytest.mark.parametrize("key", NEW)
def test_the_new_families_as_reconstruction_chains_and_wrapped_bit_exact(key: str) -> None:
    """Wrapped with empty slots, each new family computes timm's non-fused float model bit for bit, and its chain of
    pieces (the units reconstruction trains) computes the model."""
    import copy

    import torch
    from conftest import unfuse

    import vitq
    from vitq.adapters import get_adapter
    from vitq.adapters.base import run_chain

    case = next(c for c in CASES if c.key == key)
    m = unfuse(case.build())
    if getattr(m, "attn_pool", None) is not None:
        m.attn_pool.fused_attn = False
    x = case.input(4)
    with torch.no_grad():
        ref = _logits(m(x))
        w = vitq.wrap(copy.deepcopy(m))
        assert torch.equal(_logits(w(x)), ref)
        q = vitq.quantize(copy.deepcopy(m), "minmax", "W4A4", calib_data=x)
        assert torch.equal(run_chain(get_adapter(q).chain(q), x), _logits(q(x)))


@pytest.mark.parametrize("variant", [
    dict(use_shared_relative_position_bias=True),
    dict(use_relative_position_bias=True, use_mean_pooling=False, use_absolute_position_embeddings=True),
    dict(use_relative_position_bias=True, layer_scale_init_value=0.0),
    dict(use_shared_relative_position_bias=True, headless=True),
], ids=["shared_bias", "cls_token_abs_pos", "no_layer_scale", "headless_encoder"])
def test_hugging_face_beit_variants_wrap_exactly_and_balance(variant: dict) -> None:
    """The BEiT layouts checkpoints use (a per-layer or a model-wide relative position bias, mean or class-token
    pooling, with or without layer scale, the bare BeitModel encoder): wrapped with empty slots the model is the float
    model bit for bit, the chain computes it, and AOCQ's stream balance keeps the float function."""
    import copy

    import torch
    from scripts.coverage import _HF_VIT, _hf

    import vitq
    from vitq.adapters import get_adapter
    from vitq.adapters.base import run_chain

    pytest.importorskip("transformers")
    kw = dict(variant)
    headless = kw.pop("headless", False)
    cfg = {k: v for k, v in _HF_VIT.items() if not (headless and k == "num_labels")}
    m = _hf("BeitModel" if headless else "BeitForImageClassification", "BeitConfig", **cfg, **kw)()
    with torch.no_grad():  # an outlier channel after every pre-attention LayerNorm, as trained ViTs have
        for layer in m.modules():
            if type(layer).__name__ == "BeitLayer":
                layer.layernorm_before.weight[3] *= 24.0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = _logits(m(x))
        assert torch.equal(_logits(vitq.wrap(copy.deepcopy(m))(x)), ref)
        q = vitq.quantize(copy.deepcopy(m), "minmax", "W4A4", calib_data=x)
        assert torch.equal(run_chain(get_adapter(q).chain(q), x), _logits(q(x)))
    r = vitq.Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
    fp = vitq.quantize(copy.deepcopy(m), r, "W4A4", calib_data=x)
    with torch.no_grad(), vitq.disabled(fp):
        torch.testing.assert_close(_logits(fp(x)), ref, rtol=1e-4, atol=1e-4)
    st = vitq.state_of(fp)
    assert sum(v["channels_scaled"] for part in ("add_alpha", "ln_alpha") for v in st.balance[part].values()) > 0


@pytest.mark.parametrize("key", ["swinv2", "hf_swinv2"])
def test_swin_v2_post_norm_blocks_balance_exactly_and_fold_their_qkv_bias(key: str, tmp_path: Any) -> None:
    """Swin V2 (post-norm, cosine attention), timm and Hugging Face: timm's q / v biases are folded into the qkv
    Linear exactly; RepQ-ViT finds no LayerNorm -> Linear pair and says so, changing nothing; AOCQ's Add_alpha
    balances an outlier the post-norms write into the stream (read by the q / k / v and fc1 columns and the next
    merging's reduction) keeping the float function; save -> load gives the same outputs."""
    import copy

    import torch

    import vitq
    from vitq.adapters import get_adapter

    if key.startswith("hf"):
        pytest.importorskip("transformers")
    case = next(c for c in CASES if c.key == key)
    m = case.build()
    timm_model = key == "swinv2"
    blocks = m.layers[0].blocks if timm_model else m.swinv2.encoder.layers[0].blocks
    with torch.no_grad():  # an outlier channel in what the first stage's post-norms write, as trained Swins have
        for blk in blocks:
            for ln in ((blk.norm1, blk.norm2) if timm_model else (blk.layernorm_before, blk.layernorm_after)):
                ln.weight[3] *= 24.0
    x = case.input(4)
    with torch.no_grad():
        ref = _logits(m(x))
    w = vitq.wrap(copy.deepcopy(m))
    if timm_model:
        att = m.layers[1].blocks[0].attn
        bias = torch.cat((att.q_bias, att.k_bias, att.v_bias)).detach()
        assert torch.equal(w.layers[1].blocks[0].attn.qkv.bias, bias) and w.layers[1].blocks[0].attn.q_bias is None
    assert get_adapter(w).ln_consumers(w) == []
    q = vitq.quantize(copy.deepcopy(m), "repq", "W8A8", calib_data=x)
    with torch.no_grad(), vitq.disabled(q):
        assert torch.equal(_logits(q(x)), ref)
    assert vitq.state_of(q).reparam[0]["layernorms"] == 0
    r = vitq.Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
    fp = vitq.quantize(copy.deepcopy(m), r, "W4A4", calib_data=x)
    with torch.no_grad(), vitq.disabled(fp):
        torch.testing.assert_close(_logits(fp(x)), ref, rtol=1e-4, atol=1e-4)
    assert vitq.state_of(fp).balance["add_alpha"]["stage0"]["channels_scaled"] > 0
    source = None
    if timm_model:  # a timm model built with custom arguments: rebuilt from its pickle
        torch.save(m, tmp_path / "float.pt")
        source = vitq.ModelSource("pickle", str(tmp_path / "float.pt"))
    vitq.save_quantized(fp, tmp_path / "q", source=source)
    back = vitq.load_quantized(tmp_path / "q", trust_pickle=timm_model)
    with torch.no_grad():
        assert torch.equal(_logits(back(x)), _logits(fp(x)))


@pytest.mark.parametrize("variant", [
    dict(),
    dict(shared_rel_pos=True, rel_pos_type="bias"),
    dict(class_token=True, global_pool="token", init_values=0.1, rel_pos_type="mlp_swin"),
    dict(fc_norm=True, rel_pos_type="bias"),
    dict(block_fn="post"),
], ids=["mlp_bias", "shared_table", "cls_token_layer_scale", "fc_norm", "res_post_norm"])
def test_timm_relpos_variants_wrap_exactly_reparameterize_and_balance(variant: dict) -> None:
    """VisionTransformerRelPos as its checkpoints come (an MLP or a table bias per block, one shared by all blocks,
    class-token pooling with LayerScale, fc_norm, residual post-norm blocks): wrapped with empty slots it is timm's
    non-fused model bit for bit, the chain computes it, RepQ-ViT keeps the float function (folding every pre-norm
    pair, none in post-norm blocks), and Add_alpha balances an outlier keeping it too."""
    import copy

    import timm
    import torch
    from conftest import unfuse
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock

    import vitq
    from vitq.adapters import get_adapter
    from vitq.adapters.base import run_chain

    kw = dict(variant)
    if kw.pop("block_fn", None) == "post":
        kw["block_fn"] = ResPostRelPosBlock
    torch.manual_seed(0)
    m = unfuse(timm.create_model("vit_relpos_small_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                                 img_size=32, patch_size=8, num_classes=5, **kw).eval())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("relative_position_bias_table"):  # timm starts tables at zero
                p.normal_(0.0, 0.5)
        m.patch_embed.proj.weight[3] *= 24.0  # an outlier channel in the stream, as trained ViTs have
        for blk in m.blocks:
            if isinstance(blk, ResPostRelPosBlock):
                blk.norm1.weight.add_(1.0)  # timm starts the post-norms at zero: the block would add nothing
                blk.norm2.weight.add_(1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(vitq.wrap(copy.deepcopy(m))(x), ref)
        q = vitq.quantize(copy.deepcopy(m), "minmax", "W4A4", calib_data=x)
        assert torch.equal(run_chain(get_adapter(q).chain(q), x), q(x))
    rq = vitq.quantize(copy.deepcopy(m), "repq", "W4A4", calib_data=x)
    with torch.no_grad(), vitq.disabled(rq):
        torch.testing.assert_close(rq(x), ref, rtol=1e-4, atol=1e-5)
    assert vitq.state_of(rq).reparam[0]["layernorms"] == len(get_adapter(rq).ln_consumers(rq))
    r = vitq.Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
    fp = vitq.quantize(copy.deepcopy(m), r, "W4A4", calib_data=x)
    with torch.no_grad(), vitq.disabled(fp):
        torch.testing.assert_close(fp(x), ref, rtol=1e-4, atol=1e-4)
    assert vitq.state_of(fp).balance["add_alpha"]["stream"]["channels_scaled"] > 0


def test_pvt_v2_spatial_reduction_folds_exactly_and_round_trips(tmp_path: Any) -> None:
    """PVTv2's spatial-reduction conv reads norm1's output as tokens, beside q: RepQ-ViT folds norm1 into both (the
    conv's unpadded-window case of the fold) and keeps the float function; PTQ4ViT searches the token conv per output
    channel (in the every-recipe test); save -> load gives the same outputs."""
    import copy

    import torch

    import vitq
    from vitq.adapters.timm.pvt import TokenConv

    case = next(c for c in CASES if c.key == "pvt_v2")
    m = case.build()
    with torch.no_grad():  # outlier channels after every norm1, as trained models have
        for stage in m.stages:
            for blk in stage.blocks:
                blk.norm1.weight[2] *= 24.0
    x = case.input(4)
    with torch.no_grad():
        ref = _logits(m(x))
    q = vitq.quantize(copy.deepcopy(m), "repq", "W4A4", calib_data=x)
    srs = [mod for mod in q.modules() if isinstance(mod, TokenConv)]
    assert len(srs) == 3 and all(s.input_quant.spec.granularity.__class__.__name__ == "PerTensor" for s in srs)
    with torch.no_grad(), vitq.disabled(q):
        torch.testing.assert_close(_logits(q(x)), ref, rtol=1e-4, atol=1e-5)
    p = vitq.quantize(copy.deepcopy(m), "minmax", "W4A8", calib_data=x)
    torch.save(m, tmp_path / "float.pt")
    vitq.save_quantized(p, tmp_path / "q", source=vitq.ModelSource("pickle", str(tmp_path / "float.pt")))
    back = vitq.load_quantized(tmp_path / "q", trust_pickle=True)
    with torch.no_grad():
        assert torch.equal(_logits(back(x)), _logits(p(x)))


@pytest.mark.parametrize("key", ["hf_beit", "hf_data2vec"])
def test_a_fold_that_gives_a_bias_free_key_a_bias_saves_and_loads(key: str, tmp_path) -> None:
    """BEiT's and data2vec's key Linear has no bias; RepQ-ViT's fold gives it one (the LayerNorm's shift through its
    weight). The saved run holds that bias, the architecture rebuilt from the config does not: loading makes room for
    it (it was refused as an unexpected key, so `vitq export RUN` failed) and gives the same outputs."""
    import json

    import torch

    import vitq

    case = next(c for c in CASES if c.key == key)
    hf = case.build()
    folder = tmp_path / key
    hf.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32},
                                                                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    model, source = vitq.load_model(f"hf:{folder}")
    x = case.input(8)
    before = set(model.state_dict())
    q = vitq.quantize(model, "repq", "W8A8", calib_data=x)
    gained = [k for k in q.state_dict() if k.endswith(".bias") and k not in before]
    assert gained and all(".key." in k or ".k_proj." in k for k in gained), gained
    vitq.save_quantized(q, tmp_path / "run", source)
    back = vitq.load_quantized(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(_logits(back(x)), _logits(q(x)))


@pytest.mark.parametrize("case", [c for c in CASES if c.supported], ids=[c.key for c in CASES if c.supported])
def test_what_stays_float_by_design_is_named_in_the_run_record(case) -> None:
    """The run record's ``float_parts`` (and the CLI's "float by design" lines) name exactly the layers a supported
    architecture keeps float: their Linears are the coverage row's constant ones, none holds a quantization slot,
    and a hybrid ViT's CNN stem is one of them."""
    from torch import nn

    import vitq
    from vitq.nn import QConv2d, QLinear
    from vitq.run.execute import float_parts

    if case.library == "hf":
        pytest.importorskip("transformers")
    q = vitq.wrap(case.build())
    parts = float_parts(q)
    mods = [q.get_submodule(p["module"]) for p in parts]
    assert all(p["why"] for p in parts)
    assert not any(isinstance(m, (QLinear, QConv2d)) for mod in mods for m in mod.modules())
    assert sum(isinstance(m, nn.Linear) for mod in mods for m in mod.modules()) == case.constant_linears
    assert ("patch_embed.backbone" in [p["module"] for p in parts]) == (case.key == "hybrid_r26")


def test_the_cli_groups_float_parts_by_reason() -> None:
    from vitq.cli import _group_float_parts

    parts = [{"module": "a.cpb", "why": "constant"}, {"module": "stem", "why": "cnn"}, {"module": "b.cpb", "why": "constant"}]
    assert _group_float_parts(parts) == [("constant", ["a.cpb", "b.cpb"]), ("cnn", ["stem"])]


def test_hf_siglip_pool_folds_into_its_own_norm_and_leaves_the_patch_features(tmp_path) -> None:
    """Hugging Face's SigLIP pool head reads the encoder through its own copy of post_layernorm, so RepQ-ViT folds the
    kv input's channel-wise quantizer into the copy: the pooled embedding is the float one with quantization disabled,
    ``last_hidden_state`` (the patch features, post_layernorm's output) is untouched by the fold, and the run saves and
    loads with the copy."""
    import json

    import torch

    import vitq

    pytest.importorskip("transformers")
    case = next(c for c in CASES if c.key == "hf_siglip")
    hf = case.build()
    with torch.no_grad():
        hf.post_layernorm.weight[:3] *= 20  # outlier channels, so that the fold has something to do
    folder = tmp_path / "siglip"
    hf.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32},
                                                                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    model, source = vitq.load_model(f"hf:{folder}")
    x = case.input(8)
    with torch.no_grad():
        ref = model(x)
    post = {k: v.clone() for k, v in model.post_layernorm.state_dict().items()}
    q = vitq.quantize(model, "repq", "W8A8", calib_data=x)
    head = q.get_submodule("head")
    assert not torch.allclose(head.norm.weight, post["weight"])  # folded into the copy ...
    assert all(torch.equal(q.post_layernorm.state_dict()[k], v) for k, v in post.items())  # ... not the shared norm
    with torch.no_grad(), vitq.disabled(q):
        out = q(x)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=5e-5)
    vitq.save_quantized(q, tmp_path / "run", source)
    back = vitq.load_quantized(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(back(x).pooler_output, q(x).pooler_output)
    from vitq.errors import ModelError

    with pytest.raises(ModelError, match="output_hidden_states: the quantized SigLIP tower returns last_hidden_state"):
        q(x, output_hidden_states=True)  # not a silent None
