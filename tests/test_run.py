"""The run layer: one spec, one execution, one record; run folders remember their data; the Python API is the CLI's."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_vit
from test_cli import expect_error, run
from test_reproduce import imagenet, make_test_vit_weights

import vitq
from vitq.errors import ConfigError, DataError, ModelError
from vitq.run import RunSpec, measured


@pytest.fixture
def rgb(tmp_path: Path) -> SimpleNamespace:
    """A tiny ImageNet-layout folder (3 classes, RGB photos of mixed sizes) and timm's test_vit for it."""
    ckpt = make_test_vit_weights(tmp_path / "weights")
    return SimpleNamespace(root=imagenet(tmp_path / "imagenet"), weights=ckpt.parent, ckpt=str(ckpt), tmp=tmp_path)


def test_quantize_compare_reproduce_and_bench_write_the_same_record(rgb: SimpleNamespace, capsys) -> None:
    """One spec (test_vit, minmax W8A8, 6 calibration images of train/, seed 0, the 12 val images) through the four
    entry points: the same record, timings aside."""
    from bench.common import quantize_row

    from vitq.data import DataSpec, build_dataset, calibration_subset, stack_images
    from vitq.run.inputs import eval_loader, preprocessing

    common = ["--data", str(rgb.root), "--calib-size", "6", "--no-progress"]
    code, _, err = run(["quantize", "test_vit", "--checkpoint", rgb.ckpt, "--recipe", "minmax", "--bits", "W8A8", *common,
                        "--json", str(rgb.tmp / "q.json")], capsys)
    assert code == 0, err
    q = json.loads((rgb.tmp / "q.json").read_text())
    code, _, err = run(["compare", "test_vit", "--checkpoint", rgb.ckpt, "--recipes", "minmax", "--bits", "W8A8", *common,
                        "--json", str(rgb.tmp / "c.json")], capsys)
    assert code == 0, err
    c = json.loads((rgb.tmp / "c.json").read_text())["rows"][0]
    proto = rgb.tmp / "p.yaml"
    proto.write_text("bits: [W8A8]\nmodels:\n  Tiny: {timm: test_vit}\nrecipes:\n  minmax: MinMax\n")
    code, _, err = run(["reproduce", str(proto), "--imagenet", str(rgb.root), "--weights", str(rgb.weights),
                        "--calib-size", "6", "--no-progress", "--json", str(rgb.tmp / "r.json")], capsys)
    assert code == 0, err
    r = json.loads((rgb.tmp / "r.json").read_text())["rows"][0]
    model, _ = vitq.load_model("test_vit", checkpoint=rgb.ckpt)
    pre = preprocessing(model, vitq.run.DataChoice(DataSpec.parse(str(rgb.root))))
    data = SimpleNamespace(calib=stack_images(calibration_subset(build_dataset(str(rgb.root), "train", pre), 6, 0))[0],
                           eval_loader=eval_loader(model, vitq.run.DataChoice(DataSpec.parse(str(rgb.root))), pre))
    b = quantize_row("test_vit", model, data, "minmax", "W8A8", fp=vitq.evaluate(model, data.eval_loader))
    assert q["schema"] == c["schema"] == r["schema"] == b["schema"] == "vitq.result/1"
    assert q["vs_fp"]["n"] == 12 and q["per_seed"][0]["vs_fp"] == q["vs_fp"]
    assert measured(q) == measured(c) == measured(r) == measured(b)


def test_a_run_folder_remembers_its_data_and_refuses_other_data(rgb: SimpleNamespace, fmnist_dir: Path, capsys) -> None:
    out = rgb.tmp / "run"
    code, _, err = run(["quantize", "test_vit", "--checkpoint", rgb.ckpt, "--data", str(rgb.root), "--recipe", "minmax",
                        "--calib-size", "6", "--no-progress", "--out", str(out), "--json", str(rgb.tmp / "q.json")], capsys)
    assert code == 0, err
    q = json.loads((rgb.tmp / "q.json").read_text())
    assert q["data"] == str(rgb.root) and q["data_origin"] == "given"
    # eval without --data evaluates on the data the run recorded (not Fashion-MNIST): the same top-1
    code, stdout, err = run(["eval", str(out), "--no-progress", "--json", str(rgb.tmp / "e.json")], capsys)
    assert code == 0, err
    e = json.loads((rgb.tmp / "e.json").read_text())
    assert e["data"] == str(rgb.root) and e["data_origin"] == "recorded" and e["top1"] == q["q_top1"]
    assert e["eval_size"] == 12 and "the data the run recorded" in stdout
    # Fashion-MNIST does not fit this model: one line, before any image is decoded
    for cmd in (["eval", str(out)], ["export", str(out), "--format", "onnx", "--verify", "--out", str(rgb.tmp / "x")],
                ["compare", str(out), str(out)]):
        expect_error([*cmd, "--data", f"fashion-mnist:{fmnist_dir}", "--no-progress"], capsys,
                     r"holds grey \(1-channel\) images of 10 classes, but .* takes 3-channel images and scores 3 classes")
    # the recorded data moved away: one line asking for --data (never a fallback)
    shutil.move(str(rgb.root), str(rgb.tmp / "moved"))
    for cmd in (["eval", str(out)], ["export", str(out), "--format", "onnx", "--verify", "--out", str(rgb.tmp / "x")],
                ["report", str(out), "--out", str(rgb.tmp / "rep")], ["compare", str(out), str(out)]):
        expect_error([*cmd, "--no-progress"], capsys, r"was quantized on .*imagenet, which is not there any more: pass --data")
    # a model that is neither a reference model nor a run folder has no default data
    expect_error(["quantize", "test_vit", "--checkpoint", rgb.ckpt, "--recipe", "minmax", "--no-progress"], capsys,
                 r"test_vit is not a reference model, so there is no data to default to: pass --data")
    # and quantizing a run folder again is refused: it is already quantized
    expect_error(["quantize", str(out), "--data", str(rgb.tmp / "moved"), "--no-progress"], capsys,
                 "is already quantized .*quantize the float model")


def test_run_folders_saved_before_runs_were_recorded_use_their_result_data(rgb: SimpleNamespace, capsys) -> None:
    """Folders of earlier versions hold the data only in result.json's copy inside vitq.json: it is used too."""
    from vitq.export.integrity import seal

    out = rgb.tmp / "run"
    code, _, err = run(["quantize", "test_vit", "--checkpoint", rgb.ckpt, "--data", str(rgb.root), "--recipe", "minmax",
                        "--calib-size", "6", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    meta = json.loads((out / "vitq.json").read_text())
    meta.pop("run")
    meta.pop("integrity", None)
    (out / "vitq.json").write_text(json.dumps(seal(meta, out, ["model.safetensors"])))
    code, stdout, err = run(["eval", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert f"of {rgb.root} (the data the run recorded)" in stdout


def test_run_spec_checks_every_value_once_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a seed is given twice"):
        RunSpec(seeds=(0, 0))
    with pytest.raises(ConfigError, match="needs one budget"):
        RunSpec(bits="auto")
    with pytest.raises(ConfigError, match="--budget chooses bits per site"):
        RunSpec(bits="W4A4", budget=4.0)
    with pytest.raises(ConfigError, match="--budget-mb nan: give a finite number"):
        RunSpec(bits="auto", budget_mb=float("nan"))
    with pytest.raises(ConfigError, match="writes into the --out folder"):
        RunSpec(export="onnx")
    with pytest.raises(ConfigError, match="single --seed with --out"):
        RunSpec(out=str(tmp_path), seeds=(0, 1))
    with pytest.raises(ConfigError, match="has no pass with option"):
        RunSpec(recipe="minmax", options={"lr_round": 0.1})
    s = RunSpec(recipe="qdrop", bits="W4A4", options={"iters": 7}, export="onnx", out=str(tmp_path))
    assert s.effective_target == "onnx" and [pc.opts.iters for pc in s.recipe_obj.passes if pc.name == "reconstruct"] == [7]
    assert RunSpec.from_dict(s.to_dict()) == s and RunSpec().recipe_obj.name == vitq.DEFAULT_RECIPE


def test_one_bit_width_rule_everywhere(tmp_path: Path) -> None:
    from vitq.quantizers.base import QuantSpec
    from vitq.recipes import load_recipe

    for make in (lambda: vitq.Bits.parse("W9A8"), lambda: QuantSpec(bits=9), lambda: QuantSpec(bits=1),
                 lambda: vitq.bits.parse_run_bits("autoA9")):
        with pytest.raises(ConfigError, match=r"out of range: use .*2.*8"):
            make()
    for text in ('rules:\n  "act:*": {bits: 10}\n', 'when:\n  A<=9:\n    rules: {}\n'):
        f = tmp_path / "r.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=r"out of range: use an integer from 2 to 8"):
            load_recipe(str(f))


def test_python_api_is_the_clis(tmp_path: Path) -> None:
    import inspect

    assert inspect.signature(vitq.quantize).parameters["recipe"].default == vitq.DEFAULT_RECIPE == "best"
    from vitq.cli import build_parser

    args = build_parser().parse_args(["quantize"])
    assert RunSpec.from_cli(args).recipe_obj.name == vitq.DEFAULT_RECIPE
    x = torch.randn(8, 3, 16, 16)
    q = vitq.quantize(tiny_vit(), bits="W8A8", calib_data=x)
    assert vitq.state_of(q).recipe.name == "best"
    with pytest.raises(ModelError, match=r"already quantized \(recipe best, W8A8\)"):
        vitq.quantize(q, "minmax", "W8A8", calib_data=x)
    with pytest.raises(ModelError, match="already quantized"):
        vitq.run(model="fmnist-vit", recipe="minmax", float_model=q)
    # vitq.evaluate is callable, and takes (images, labels) tensors as well as a loader
    y = tiny_vit()(x).argmax(-1)
    a, b = vitq.evaluate(q, (x, y), batch_size=3), vitq.evaluate.evaluate(q, [(x[:5], y[:5]), (x[5:], y[5:])])
    assert a["top1"] == b["top1"] and a["n"] == 8 and torch.equal(a["predictions"].top1, b["predictions"].top1)
    with pytest.raises(DataError, match="is the string"):
        vitq.evaluate(q, "images/")


def test_python_export_and_save_without_a_source(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import timm

    x = torch.randn(6, 3, 16, 16)
    q = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=x)
    rep = vitq.export(q, tmp_path / "onnx", format="onnx", verify_data=(x, q(x).argmax(-1)))
    assert (tmp_path / "onnx" / "model.onnx").is_file() and rep["verify"]["agreement"] >= 99.0
    # a model built directly has no name any library can rebuild it from: one line naming the fix
    with pytest.raises(ModelError, match="cannot tell how to rebuild this VisionTransformer"):
        vitq.save_quantized(q, tmp_path / "q")
    # one made by timm.create_model names its architecture; one from vitq.load_model recorded its source
    torch.manual_seed(0)
    t = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    xt = torch.randn(2, 3, 160, 160)
    qt = vitq.quantize(t, "minmax", "W8A8", calib_data=xt)
    vitq.save_quantized(qt, tmp_path / "t")
    assert torch.equal(vitq.load_quantized(tmp_path / "t")(xt), qt(xt))
    ref, _ = vitq.load_model("fmnist-vit") if _has_ref() else (None, None)
    if ref is not None:
        xr = torch.randn(4, 1, 28, 28)
        qr = vitq.quantize(ref, "minmax", "W8A8", calib_data=xr)
        vitq.save_quantized(qr, tmp_path / "r")
        assert torch.equal(vitq.load_quantized(tmp_path / "r")(xr), qr(xr))
    with pytest.raises(ModelError, match="only a model quantized by vitq"):
        vitq.save_quantized(tiny_vit(), tmp_path / "f")


def _has_ref() -> bool:
    from conftest import has_reference_weights

    return has_reference_weights("fmnist-vit")


def test_calibrating_with_your_own_loop_equals_quantize() -> None:
    x = torch.randn(12, 3, 16, 16)
    for recipe in ("minmax", "percentile"):
        ref = vitq.quantize(tiny_vit(), recipe, "W4A8", calib_data=x, batch_size=4)
        with vitq.calibrating(tiny_vit(), recipe, "W4A8") as q:
            for i in range(0, 12, 4):
                q(x[i:i + 4])
        assert torch.equal(q(x), ref(x)), recipe
    with pytest.raises(ConfigError, match="recipe repq runs reparam beside the range calibration, which needs the calibration images up front"):
        with vitq.calibrating(tiny_vit(), "repq", "W4A4"):
            pass
    with pytest.raises(ModelError, match="already quantized"):
        with vitq.calibrating(copy.deepcopy(ref), "minmax", "W8A8"):
            pass


def test_python_preprocessing_is_the_clis(rgb: SimpleNamespace) -> None:
    """vitq.transforms(model) on a PIL image gives what the CLI's evaluation loader gives for that file."""
    from PIL import Image

    from vitq.run.inputs import open_model_and_data

    opened = [open_model_and_data("test_vit", str(rgb.root), checkpoint=rgb.ckpt)]
    if _has_ref():  # a Hugging Face model: its own image processor (grey, 28 px) on the same RGB photos
        opened.append(open_model_and_data("fmnist-vit-hf", str(rgb.root)))
    for o in opened:
        path, _ = o.loader.dataset.samples[5]
        with Image.open(path) as im:
            mine = vitq.transforms(o.model)(im)
        assert torch.equal(mine, o.loader.dataset[5][0]) and mine.shape == vitq.data_config(o.model).input_size


def test_quantizer_options_are_typed_once() -> None:
    """Each quantizer's options are one frozen dataclass: defaults live there, unknown keys and bad values are refused
    for every quantizer, and the spec keeps only what was given (so manifests and exports are unchanged)."""
    from vitq.quantizers.base import QuantSpec

    v = QuantSpec(quantizer="v2sf", options={"mode": "gelu", "shifts": [2, 3]})
    assert v.opts.shift == 4 and v.opts.shifts == (2, 3) and v.opts.negative == "own_scale"
    assert v.to_dict()["options"] == {"mode": "gelu", "shifts": [2, 3]}
    assert QuantSpec(quantizer="twin_uniform").opts.shift == 7 and QuantSpec(quantizer="tanq").opts.initial_theta == 0.9
    assert QuantSpec(quantizer="tanq", options={"level_fn": "logtan"}).opts.initial_theta == 0.5
    for q, opts, msg in (("uniform", {"foo": 1}, r"quantizer uniform has no option\(s\) \['foo'\]"),
                         ("log2", {"round_domian": "log"}, r"quantizer log2 has no option\(s\) \['round_domian'\]"),
                         ("tanq", {"theta": 2}, "theta 2 must be a number strictly between 0 and 1"),
                         ("v2sf", {"shift": 2.5}, "option shift=2.5 must be an integer"),
                         ("v2sf", {"search_alpha": 2.0, "search_beta": 1.0}, "search_beta 1.0 must be >= search_alpha")):
        with pytest.raises(ConfigError, match=msg):
            QuantSpec(quantizer=q, options=opts, granularity="tensor")


def test_knn_votes_rank_the_classes_of_the_nearest_neighbours() -> None:
    from vitq.features import knn_predict

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    top = knn_predict(bank, labels, q, k=3)
    assert top[:, 0].tolist() == [0, 1, 2] and top.shape == (3, 3)
    with pytest.raises(DataError, match="needs labelled images"):
        knn_predict(bank, torch.tensor([0, 0, 1, 1, -1]), q)


def test_an_encoder_is_judged_by_knn_and_embedding_agreement(rgb: SimpleNamespace, capsys) -> None:
    """A model without a head (timm num_classes=0, here a checkpoint without one): quantize, eval and compare report
    k-NN top-1 against a bank of train-split embeddings, paired against the float model, and the embeddings' cosine
    and SQNR against the float model's - in the same record as a classifier's."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    enc = rgb.tmp / "enc.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), str(enc))
    base = ["--checkpoint", str(enc), "--data", str(rgb.root), "--calib-size", "6", "--no-progress"]
    code, out, err = run(["quantize", "test_vit", *base, "--recipe", "minmax", "--bits", "W8A8", "--out",
                          str(rgb.tmp / "run"), "--json", str(rgb.tmp / "q.json")], capsys)
    assert code == 0, err
    q = json.loads((rgb.tmp / "q.json").read_text())
    assert q["task"] == "features" and q["knn"]["k"] == 20 and q["knn"]["bank"] == 12
    assert 0.99 <= q["emb_cosine_mean"] <= 1.0 and q["emb_cosine_p5"] <= q["emb_cosine_mean"] and q["emb_sqnr_db"] > 20
    assert q["vs_fp"]["n"] == 12 and q["per_seed"][0]["emb_cosine_mean"] == q["emb_cosine_mean"]
    assert "k-NN top-1" in out and "embeddings against the float model's: cosine" in out
    # the run folder evaluates as an encoder on its recorded data: the same k-NN top-1
    code, out, err = run(["eval", str(rgb.tmp / "run"), "--no-progress", "--json", str(rgb.tmp / "e.json")], capsys)
    assert code == 0, err
    e = json.loads((rgb.tmp / "e.json").read_text())
    assert e["task"] == "features" and e["top1"] == q["q_top1"] and "k-NN top-1" in out
    code, _, err = run(["compare", "test_vit", *base, "--recipes", "minmax,percentile", "--bits", "W8A8,W4A4",
                        "--json", str(rgb.tmp / "c.json")], capsys)
    assert code == 0, err
    rows = json.loads((rgb.tmp / "c.json").read_text())["rows"]
    assert all(r["task"] == "features" and 0.0 < r["emb_cosine_mean"] <= 1.0 for r in rows)
    w8 = next(r for r in rows if r["recipe"] == "minmax" and r["bits"] == "W8A8")
    assert measured(w8) == measured(q)  # the same record through compare
    w4 = next(r for r in rows if r["recipe"] == "minmax" and r["bits"] == "W4A4")
    assert w4["emb_sqnr_db"] < w8["emb_sqnr_db"]  # more bits, less error
    expect_error(["quantize", "test_vit", *base, "--task", "classify"], capsys, "has no classification head")
    # vitq report: each site's sensitivity is how far it alone moves the embeddings; the page and its JSON say so
    pytest.importorskip("matplotlib")
    code, out, err = run(["report", "test_vit", *base, "--recipe", "minmax", "--bits", "W4A4", "--out",
                          str(rgb.tmp / "rep"), "--sensitivity-size", "8", "--error-images", "8"], capsys)
    assert code == 0, err
    rep = json.loads((rgb.tmp / "rep" / "report.json").read_text())
    assert rep["meta"]["FP k-NN top-1"] == w4["fp_top1"] and rep["meta"]["quantized k-NN top-1"] == w4["q_top1"]
    assert rep["meta"]["embedding SQNR dB"] == w4["emb_sqnr_db"]
    sens = [r for r in rep["sites"] if r["emb_sqnr_db"] is not None]
    assert len(sens) == len(rep["sites"]) and all(0.0 < r["emb_cosine_p5"] <= r["emb_cosine_mean"] <= 1.0 for r in sens)
    # one site alone moves the embeddings less than all sites together
    assert min(r["emb_sqnr_db"] for r in sens) > w4["emb_sqnr_db"]
    assert "embedding SQNR" in (rgb.tmp / "rep" / "report.html").read_text() and "k-NN top-1" in out
    # the export's parity check of an encoder: its embeddings against the simulated ones, on the recorded data
    pytest.importorskip("onnxruntime")
    code, out, err = run(["export", str(rgb.tmp / "run"), "--format", "onnx", "--verify", "--no-progress",
                          "--json", str(rgb.tmp / "x.json")], capsys)
    assert code == 0, err
    v = json.loads((rgb.tmp / "x.json").read_text())["verify"]
    assert v["task"] == "features" and v["images"] == 12 and v["embedding_cosine_min"] >= 0.999 and "embeddings" in out


def test_a_hugging_face_encoder_goes_through_the_cli(rgb: SimpleNamespace, capsys) -> None:
    """A saved transformers ViTModel (no head, a pooler): loaded from hf:DIR, judged by k-NN and embedding agreement."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    d = rgb.tmp / "hf-enc"
    transformers.ViTModel(cfg).save_pretrained(str(d))
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(d))
    code, out, err = run(["quantize", f"hf:{d}", "--data", str(rgb.root), "--recipe", "repq", "--bits", "W8A8",
                          "--calib-size", "6", "--no-progress", "--json", str(rgb.tmp / "h.json")], capsys)
    assert code == 0, err
    r = json.loads((rgb.tmp / "h.json").read_text())
    assert r["task"] == "features" and r["source"]["kind"] == "hf" and r["emb_cosine_mean"] > 0.98
    assert any(m["site"].endswith("pooler.dense.weight_quant") and m["quantizer"] != "float" for m in r["manifest"])


def test_a_dinov2_folder_with_its_own_image_processor(rgb: SimpleNamespace, capsys) -> None:
    """A DINOv2 encoder saved as DINOv2 ships: a config built for 518 px (position embeddings interpolated) and an
    image processor that resizes the shorter side to 256 and crops 224 - judged on 224 px crops, by k-NN."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=70, patch_size=14)
    torch.manual_seed(0)
    d = rgb.tmp / "dinov2"
    transformers.Dinov2Model(cfg).save_pretrained(str(d))
    transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                   do_center_crop=True).save_pretrained(str(d))
    code, out, err = run(["quantize", f"hf:{d}", "--data", str(rgb.root), "--recipe", "minmax", "--bits", "W8A8",
                          "--calib-size", "6", "--no-progress", "--json", str(rgb.tmp / "d.json")], capsys)
    assert code == 0, err
    r = json.loads((rgb.tmp / "d.json").read_text())
    assert r["task"] == "features" and r["preprocessing"]["input_size"] == [3, 56, 56]
    assert r["preprocessing"]["crop_pct"] == pytest.approx(56 / 64) and r["emb_cosine_mean"] > 0.98
