"""Hugging Face models: the adapters, hf:DIR loading, and "same function, same result" against timm.

The HF twins are made by ``scripts/timm_to_hf.py`` from tiny timm models (random weights): the same
float function, so a calibration-only recipe must give the same quantized logits on both.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_deit, tiny_swin, tiny_vit, unfuse

pytest.importorskip("transformers")
import transformers  # noqa: E402

import vitq  # noqa: E402
from vitq.adapters import get_adapter, run_chain  # noqa: E402
from vitq.errors import ModelError  # noqa: E402
from vitq.nn import QAttentionCore, disabled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from scripts.timm_to_hf import convert  # noqa: E402  (pyproject: pytest pythonpath = ".")

SIZES = {"vit": 16, "deit": 16, "swin": 32}
# head_dim 16 everywhere: the softmax scale 1/4 is a power of two, so timm's (q * s) @ k^T and the
# library's (q @ k^T) * s round identically (the reference models have head_dim 16 too)
MAKERS = {"vit": tiny_vit, "deit": tiny_deit, "swin": lambda: tiny_swin(num_heads=(1, 2))}


def pair(family: str):
    """(timm model on its explicit attention path, its HF twin, calibration images, test images)."""
    timm_model = unfuse(MAKERS[family]())
    hf = convert(timm_model)
    g = torch.Generator().manual_seed(3)
    s = SIZES[family]
    return timm_model, hf, torch.randn(16, 3, s, s, generator=g), torch.randn(8, 3, s, s, generator=g)


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", sorted(SIZES))
def test_converter_is_the_same_float_function(family: str) -> None:
    t, hf, _, x = pair(family)
    assert torch.equal(logits(hf, x), logits(t, x))  # bit-exact with timm's explicit attention path


def test_converter_other_head_dims_agree_to_rounding() -> None:
    """With a softmax scale that is not a power of two the two libraries' orders of operations round
    differently (timm scales q, transformers the scores): equal to float rounding, not bit for bit."""
    t = unfuse(tiny_swin())  # head_dim 8
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(convert(t), x), logits(t, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(SIZES))
def test_wrapped_hf_equals_float_and_disabled_equals_float(family: str) -> None:
    _, hf, calib, x = pair(family)
    ref = logits(hf, x)
    wrapped = vitq.wrap(copy.deepcopy(hf))
    cores = [m for m in wrapped.modules() if isinstance(m, QAttentionCore)]
    assert len(cores) == hf.config.num_hidden_layers if family != "swin" else len(cores) == sum(hf.config.depths)
    assert torch.equal(logits(wrapped, x), ref)
    q = vitq.quantize(copy.deepcopy(hf), "minmax", "W4A4", calib_data=calib)
    assert not torch.equal(logits(q, x), ref)  # quantization does something
    with disabled(q):
        assert torch.equal(logits(q, x), ref)
    assert isinstance(q(x), transformers.modeling_outputs.ModelOutput)  # still an HF model to its user
    pieces = get_adapter(q).chain(q)
    assert torch.equal(run_chain(pieces, x), logits(q, x))


@pytest.mark.parametrize("recipe", ["minmax", "percentile", "omse", "repq", "dopq-calib", "tsptq"])
@pytest.mark.parametrize("family", sorted(SIZES))
def test_calibration_recipes_give_the_timm_twins_logits(family: str, recipe: str) -> None:
    t, hf, calib, x = pair(family)
    qt = vitq.quantize(copy.deepcopy(t), recipe, "W4A4", calib_data=calib)
    qh = vitq.quantize(copy.deepcopy(hf), recipe, "W4A4", calib_data=calib)
    # q_proj / k_proj / v_proj are three sites over the same LayerNorm output: same samples, same params
    assert torch.equal(logits(qh, x), logits(qt, x))


def test_ptq4vit_differs_only_by_its_per_linear_search() -> None:
    """PTQ4ViT searches each Linear's scales by that Linear's own output error, and its weights are
    per tensor: HF's q / k / v get three searches and three weight scales (PTQ4ViT's own q/k/v
    grouping), timm's fused qkv one. Everything else is the same: with the qkv sites in float the two
    agree exactly."""
    t, hf, calib, x = pair("vit")
    keep_float = vitq.Recipe.from_dict({"extends": "ptq4vit", "name": "ptq4vit-noqkv",
                                        "rules": {"act:QKV_IN": None, "weight:QKV_IN": None}})
    qt = vitq.quantize(copy.deepcopy(t), keep_float, "W6A6", calib_data=calib)
    qh = vitq.quantize(copy.deepcopy(hf), keep_float, "W6A6", calib_data=calib)
    assert torch.equal(logits(qh, x), logits(qt, x))
    qt = vitq.quantize(copy.deepcopy(t), "ptq4vit", "W6A6", calib_data=calib)
    qh = vitq.quantize(copy.deepcopy(hf), "ptq4vit", "W6A6", calib_data=calib)
    assert not torch.equal(logits(qh, x), logits(qt, x))


@pytest.mark.parametrize("recipe", ["brecq", "qdrop", "oas", "aocq"])
def test_reconstruction_recipes_run_on_hf(recipe: str) -> None:
    _, hf, calib, x = pair("swin" if recipe == "oas" else "vit")
    r = vitq.load_recipe(recipe)
    from vitq.recipes import override_pass_options

    r = override_pass_options(r, iters=4, num_samples=16, batch_size=8, val_iters=2 if recipe == "oas" else None,
                              val_images=4 if recipe == "oas" else None, steps=1 if recipe == "aocq" else None)
    q = vitq.quantize(copy.deepcopy(hf), r, "W4A4", calib_data=calib)
    out = logits(q, x)
    assert torch.isfinite(out).all()
    st = vitq.state_of(q)
    assert st is not None and st.adapter.startswith("hf-") and st.reconstruction


def _short(recipe: str):
    """A shipped recipe with every reconstruction / search cut to a few steps (tests run it end to end)."""
    from vitq.passes import get_pass
    from vitq.recipes import set_pass_options

    r = vitq.load_recipe(recipe)
    short = {"iters": 2, "num_samples": 8, "batch_size": 4, "val_iters": 1, "val_images": 2, "steps": 1,
             "max_images": 8, "rounds": 1}
    names = {pc.name for pc in r.passes}
    take = {k: v for k, v in short.items() if any(k in get_pass(n).options for n in names)}
    if "ptq4vit_search" in names:
        take["steps"] = 2  # ptq4vit's grid points (aocq_act_scales' steps are search rounds)
    if "oas" in names:
        take["candidates"] = ["half", "model"]  # two candidates (+ block, the guard's preference)
    return set_pass_options(r, take)


@pytest.mark.parametrize("recipe", vitq.list_recipes())
@pytest.mark.parametrize("family", ["deit", "swin"])
def test_every_recipe_runs_on_hf(family: str, recipe: str) -> None:
    _, hf, calib, x = pair(family)
    q = vitq.quantize(copy.deepcopy(hf), _short(recipe), "W4A4", calib_data=calib[:8])
    out = logits(q, x)
    assert out.shape == (8, 5)
    assert torch.isfinite(out).all() or recipe.startswith("fq")  # fully-quantized 4-bit may saturate


def test_deit_without_teacher_and_dict_batches() -> None:
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, patch_size=4, num_channels=3, num_labels=5,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = transformers.DeiTForImageClassification(config).eval()
    m.config._attn_implementation = "eager"
    x = torch.randn(8, 3, 16, 16)
    ref = logits(m, x)
    batches = [{"pixel_values": x[:4], "labels": torch.zeros(4, dtype=torch.long)}, {"pixel_values": x[4:]}]
    q = vitq.quantize(copy.deepcopy(m), "percentile", "W8A8", calib_data=batches)
    with disabled(q):
        assert torch.equal(logits(q, x), ref)
    from vitq.evaluate import evaluate

    res = evaluate(q, [{"pixel_values": x, "labels": ref.argmax(-1)}])
    assert res["n"] == 8 and res["top1"] >= 75.0  # W8A8 keeps most float predictions


def _save(hf: torch.nn.Module, folder: Path, preprocessor: dict | None = None) -> Path:
    hf.save_pretrained(str(folder))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def test_hf_dir_loads_and_exports_self_contained(tmp_path: Path) -> None:
    _, hf, calib, x = pair("vit")
    folder = _save(hf, tmp_path / "vit", {"size": {"height": 16, "width": 16}, "image_mean": [0.5, 0.5, 0.5],
                                          "image_std": [0.25, 0.25, 0.25], "resample": 3})
    model, source = vitq.load_model(f"hf:{folder}")
    assert torch.equal(logits(model, x), logits(hf, x))
    cfg = vitq.data_config(model)
    assert cfg.input_size == (3, 16, 16) and cfg.mean == (0.5,) * 3 and cfg.interpolation == "bicubic"
    q = vitq.quantize(model, "repq", "W4A4", calib_data=calib)
    vitq.save_quantized(q, tmp_path / "export", source)
    shutil.rmtree(folder)  # the export must not need the original folder
    back = vitq.load_quantized(tmp_path / "export")
    assert torch.equal(logits(back, x), logits(q, x))
    assert vitq.data_config(back) == cfg


def test_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        vitq.load_model(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        vitq.load_model(f"hf:{tmp_path / 'empty'}")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            architectures=["BertForMaskedLM"]).save_pretrained(str(bert))
    with pytest.raises(ModelError, match="BertForMaskedLM: vitq supports ViTForImageClassification"):
        vitq.load_model(f"hf:{bert}")
    _, hf, _, _ = pair("vit")
    hf.config.save_pretrained(str(tmp_path / "noweights"))
    with pytest.raises(ModelError, match="has no weights"):
        vitq.load_model(f"hf:{tmp_path / 'noweights'}")
    folder = _save(hf, tmp_path / "vit")
    with pytest.raises(ModelError, match="drop --checkpoint"):
        vitq.load_model(f"hf:{folder}", checkpoint="x.pth")
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match="cannot load"):
        vitq.load_model(f"hf:{folder}")


def test_missing_transformers_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"pip install 'vitq\[hf\]'"):
        vitq.load_model(f"hf:{folder}")


def test_unsupported_hf_activation_is_refused() -> None:
    _, hf, calib, _ = pair("vit")
    hf.config.hidden_act = "relu"
    with pytest.raises(ModelError, match="hidden_act 'gelu' only"):
        vitq.wrap(hf)


def test_shipped_hf_reference_is_the_timm_reference() -> None:
    from vitq.reference import load_reference, reference_fp_top1

    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in ("fmnist-vit", "fmnist-vit-outlier"):
        hf_name = name.replace("fmnist-vit", "fmnist-vit-hf")
        t, hf = load_reference(name), load_reference(hf_name)
        torch.testing.assert_close(logits(hf, x), logits(t, x), atol=1e-5, rtol=1e-5)  # timm's SDPA path: rounding
        assert torch.equal(logits(hf, x), logits(vitq.wrap(copy.deepcopy(t)), x))  # the explicit path: exact
        assert vitq.data_config(hf) == vitq.data_config(t)
        assert reference_fp_top1(hf_name) == reference_fp_top1(name)


def test_cli_quantizes_the_hf_reference(tmp_path: Path, capsys) -> None:
    from vitq.cli import main

    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-vit-hf", "--recipe", "minmax", "--bits", "W8A8", "--eval-size", "64",
                 "--no-progress", "--json", str(out), "--out", str(tmp_path / "run")]) == 0
    r = json.loads(out.read_text())
    assert r["q_top1"] > 50 and any(".q_proj." in m["site"] for m in r["manifest"])
    assert main(["eval", str(tmp_path / "run"), "--eval-size", "64", "--no-progress"]) == 0
    assert f"{r['q_top1']:.2f}%" in capsys.readouterr().out


FAMILY_CLASS = re.compile(
    r"\b(VisionTransformer|VisionTransformerDistilled|SwinTransformer|SwinTransformerBlock|WindowAttention|"
    r"PatchMerging|Block|Attention|ViTFor\w+|DeiTFor\w+|SwinFor\w+|ViT(?:Layer|Attention|MLP|Model)|"
    r"DeiT(?:Layer|Attention|MLP|Model)|Swin(?:Layer|Attention|MLP|Model|Stage|PatchMerging))\b")


def test_only_adapters_know_model_families() -> None:
    """No module outside adapters/ imports timm or transformers model code or names a family's class."""
    src = ROOT / "src" / "vitq"
    bad = []
    for p in sorted(src.rglob("*.py")):
        rel = p.relative_to(src).as_posix()
        if rel.startswith("adapters/"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"^\s*(from|import)\s+(timm|transformers)\b", line) or FAMILY_CLASS.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "family knowledge outside adapters/:\n" + "\n".join(bad)


def test_a_folder_whose_weights_do_not_match_its_config_is_refused(tmp_path: Path, capsys) -> None:
    """transformers fills missing weights at random with only a notice: a weight file missing one tensor, a config
    that claims one layer more than the weights hold, or weights the config does not know are one line naming the
    keys, exit 2 - never a quantized result of a half-random model."""
    from safetensors.torch import load_file, save_file

    from vitq.cli import main

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    good = tmp_path / "good"
    transformers.ViTForImageClassification(cfg).save_pretrained(str(good))
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(good))
    model, _ = vitq.load_model(f"hf:{good}")  # a healthy folder loads
    assert model.config.num_hidden_layers == 2
    capsys.readouterr()  # what building the folder printed

    def variant(name: str, edit_weights: Any = None, edit_config: Any = None) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_weights is not None:
            sd = load_file(str(d / "model.safetensors"))
            edit_weights(sd)
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        if edit_config is not None:
            c = json.loads((d / "config.json").read_text())
            edit_config(c)
            (d / "config.json").write_text(json.dumps(c))
        return d

    one = variant("one_missing", edit_weights=lambda sd: sd.pop(next(k for k in sd if k.endswith("1.output.dense.weight"))))
    more = variant("more_layers", edit_config=lambda c: c.update(num_hidden_layers=3))
    extra = variant("extra", edit_weights=lambda sd: sd.update({"vit.extra.weight": torch.zeros(2)}))
    # a config whose image size or channels differ from the weights': transformers raised with a multi-line report
    bigger = variant("bigger", edit_config=lambda c: c.update(image_size=64))
    for d, what in ((one, r"missing weights vit\.layers\.1\.mlp\.fc2\.weight"), (more, r"missing weights vit\.layers\.2\."),
                    (extra, r"unexpected weights vit\.extra\.weight"),
                    (bigger, r"another shape: vit\.embeddings\.position_embeddings \[1, 17, 32\] in the weights, "
                             r"\[1, 65, 32\] by the config")):
        with pytest.raises(ModelError, match=what):
            vitq.load_model(f"hf:{d}")
        assert main(["quantize", f"hf:{d}", "--recipe", "minmax", "--bits", "W8A8", "--no-progress"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("vitq: error: ") and "do not match its config.json" in err[0], err


def test_a_folder_without_its_image_processor_or_with_another_models_is_refused(tmp_path: Path) -> None:
    """The preprocessing comes from the folder's preprocessor_config.json: without one vitq would guess size, mean and
    std (it ran with ViTImageProcessor's defaults before); a mean / std of 3 values for a 1-channel model is another
    model's processor (it was averaged before). One value for every channel is the processors' own shorthand."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=28, patch_size=7, num_channels=1, num_labels=3)
    torch.manual_seed(0)
    d = tmp_path / "grey"
    transformers.ViTForImageClassification(cfg).save_pretrained(str(d))
    with pytest.raises(ModelError, match=r"no preprocessor_config.json: .*\(processor\.save_pretrained"):
        vitq.load_model(f"hf:{d}")
    pre = {"size": {"height": 28, "width": 28}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ModelError, match=r"image_mean in preprocessor_config.json has 3 values for a model of 1 input"):
        vitq.data_config(vitq.load_model(f"hf:{d}")[0])
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": 0.3, "image_std": [0.2]}))
    c = vitq.data_config(vitq.load_model(f"hf:{d}")[0])
    assert c.mean == (0.3,) and c.std == (0.2,) and c.input_size == (1, 28, 28)
    # a zero std divided the images by zero: "NaN values reached a quantization site" during calibration
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": 0.3, "image_std": [0.0]}))
    with pytest.raises(ModelError, match=r"image_std in preprocessor_config.json is \[0.0\]: give positive numbers"):
        vitq.data_config(vitq.load_model(f"hf:{d}")[0])


def test_shipped_hf_dinov2_reference_is_the_timm_encoder(tmp_path: Path, capsys) -> None:
    """fmnist-dinov2-hf (Dinov2WithRegistersModel, converted by scripts/timm_to_hf.py) computes fmnist-dinov2's
    embedding (its pooler output: the class token after the final LayerNorm), twins included, and goes through the
    CLI as an encoder (k-NN top-1, embedding agreement)."""
    from vitq.batches import as_embedding
    from vitq.cli import main
    from vitq.reference import load_reference, reference_fp_top1

    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in ("fmnist-dinov2", "fmnist-dinov2-outlier"):
        hf_name = name.replace("fmnist-dinov2", "fmnist-dinov2-hf")
        t, hf = load_reference(name), load_reference(hf_name)
        assert type(hf).__name__ == "Dinov2WithRegistersModel"
        with torch.no_grad():
            torch.testing.assert_close(as_embedding(hf(x)), as_embedding(t(x)), atol=1e-5, rtol=1e-5)
        assert vitq.data_config(hf) == vitq.data_config(t)
        assert reference_fp_top1(hf_name) == reference_fp_top1(name) is not None
    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-dinov2-hf", "--recipe", "minmax", "--bits", "W8A8", "--eval-size", "64",
                 "--knn-bank", "500", "--no-progress", "--json", str(out)]) == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["task"] == "features" and r["emb_cosine_mean"] > 0.98 and r["knn"]["bank"] == 500
