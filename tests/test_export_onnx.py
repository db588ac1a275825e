"""ONNX export: a QDQ graph onnxruntime runs with integer kernels, its parity with the simulated
model, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_swin, tiny_vit

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import vitq  # noqa: E402
from vitq.errors import ConfigError, ModelError  # noqa: E402
from vitq.export.deploy import ExportError, export, verify  # noqa: E402
from vitq.export.onnx import OnnxModel  # noqa: E402

TESTS = Path(__file__).resolve().parent


def quantized(make=tiny_vit, recipe="minmax", bits="W8A8", size=16):
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, size, size, generator=g), torch.randn(32, 3, size, size, generator=g)
    return vitq.quantize(make(), recipe, bits, calib_data=calib), x


def logits(m, x):
    with torch.no_grad():
        out = m(x)
    return getattr(out, "logits", out)


def dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight DequantizeLinear of an exported file, evaluated: (codes - zero point) * scale."""
    g = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    for n in g.graph.node:  # 4-bit codes: an INT4 / UINT4 initializer widened by a Cast
        if n.op_type == "Cast" and n.input[0] in init:
            init[n.output[0]] = init[n.input[0]].astype(np.int64)
    out = {}
    for n in g.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"):
            c, s, z = (init[i] for i in n.input)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * c.ndim
            if s.ndim:
                shape[axis] = -1
            out[n.input[0]] = (c.astype(np.int64) - z.astype(np.int64).reshape(shape)) * s.reshape(shape)
    return out


def test_w8a8_export_runs_integer_kernels_with_8bit_weights(tmp_path: Path, monkeypatch) -> None:
    import vitq.export.onnx as vo

    monkeypatch.setattr(vo, "u8s8_exact", lambda: (False, "x86 without VNNI (AVX2)"))  # auto: uint8 on such a CPU
    q, x = quantized()
    rep = export(q, tmp_path, "onnx")
    assert rep["lowering"]["counts"]["int-weight"] == rep["weights_as_codes"] == 10  # 2 blocks x 4 + patch + head
    assert rep["lowering"]["fallbacks"] == []  # minmax: every activation site is 8-bit uniform per tensor
    assert rep["runtime_ops"].get("MatMulIntegerToFloat", 0) >= 8  # onnxruntime fused every Linear
    g = onnx.load(str(tmp_path / "model.onnx"))
    codes = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith("_quantized")]
    # 8-bit weights on an AVX2-only CPU: uint8 (onnxruntime's u8 x u8 kernels are exact on every CPU, its AVX2 u8 x s8
    # kernel saturates)
    assert rep["weight_dtype"] == "uint8" and rep["weight_dtype_why"].startswith("auto") and len(codes) == 10 and all(c.dtype == np.uint8 for c in codes)
    floats = [numpy_helper.to_array(i) for i in g.graph.initializer if numpy_helper.to_array(i).dtype.kind == "f"]
    assert sum(c.size for c in codes) > 4 * max(f.size for f in floats)  # no float copy of a weight is left
    assert not any(n.metadata_props for n in g.graph.node)
    ref, out = logits(q, x), OnnxModel(tmp_path / "model.onnx")(x)
    # the integer kernels compute the simulated model's arithmetic: float rounding apart, the same logits
    # (int8 weights on an AVX2-only CPU were off by 0.2 x the largest logit here)
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    saved = json.loads((tmp_path / "export.json").read_text())
    assert saved["recipe"] == "minmax" and saved["bits"] == "W8A8" and len(saved["sites"]) == len(vitq.manifest(q))


def test_int8_weights_hold_the_same_dequantized_values(tmp_path: Path, monkeypatch) -> None:
    q, x = quantized()
    rep = export(q, tmp_path / "s8", "onnx", weight_dtype="int8")
    export(q, tmp_path / "u8", "onnx")
    g = onnx.load(str(tmp_path / "s8" / "model.onnx"))
    codes = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith("_quantized")]
    assert rep["weight_dtype"] == "int8" and len(codes) == 10 and all(c.dtype == np.int8 for c in codes)
    s8, u8 = dequantized_weights(tmp_path / "s8" / "model.onnx"), dequantized_weights(tmp_path / "u8" / "model.onnx")
    assert s8.keys() == u8.keys() and len(s8) == 10
    assert all(np.array_equal(s8[k], u8[k]) for k in s8)
    assert json.loads((tmp_path / "s8" / "export.json").read_text())["weight_dtype"] == "int8"
    with pytest.raises(ConfigError, match="unknown weight container 'int4'"):
        export(q, tmp_path / "x", "onnx", weight_dtype="int4")
    # a failed parity check of an int8 file on a CPU without VNNI names the likely cause and the fix
    import vitq.export.onnx as vo

    monkeypatch.setattr(vo, "u8s8_exact", lambda: (False, "x86 without VNNI (AVX2)"))
    with torch.no_grad():
        q.head.weight.neg_()
    with pytest.raises(ExportError, match="re-export with --weight-dtype uint8"):
        verify(q, tmp_path / "s8", [(x, logits(q, x).argmax(-1))], max_top1_diff=0.0)


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (-8, 7), (-4, 3), (0, 255), (0, 15)])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_container_codes_keep_code_minus_zero_point(qmin: int, qmax: int, dtype: str) -> None:
    from vitq.export.onnx import container_codes

    codes = np.arange(qmin, qmax + 1).reshape(1, -1).repeat(3, 0)
    zp = np.array([qmin, (qmin + qmax) // 2, qmax])
    c, z = container_codes(codes, zp, qmin, qmax, dtype)
    assert c.dtype == np.dtype(dtype) and z.dtype == np.dtype(dtype)
    assert np.array_equal(c.astype(np.int64) - z.astype(np.int64)[:, None], codes - zp[:, None])


def test_auto_weight_containers(monkeypatch) -> None:
    """--weight-dtype auto (the default): int8 (u8 x s8, the faster kernels on CPUs with a dot product) wherever it is
    exact - at <= 7-bit weights on every CPU, at 8 bits where this CPU has VNNI / AMX / ARM - else uint8."""
    import vitq.export.onnx as vo

    for cpu, w8 in (((True, "x86 with avx512_vnni"), "int8"), ((False, "x86 without VNNI (AVX2)"), "uint8"),
                    ((None, "not known"), "uint8")):
        monkeypatch.setattr(vo, "u8s8_exact", lambda cpu=cpu: cpu)
        assert vo.resolve_weight_dtype("auto", 8)[0] == w8
        assert vo.resolve_weight_dtype("auto", None)[0] == w8
        for bits in (2, 4, 7):
            dt, why = vo.resolve_weight_dtype("auto", bits)
            assert dt == "int8" and "every CPU" in why
        assert vo.resolve_weight_dtype("uint8", 4) == ("uint8", "asked for")


def test_int8_containers_of_7_bit_codes_cannot_saturate_avx2() -> None:
    """The arithmetic behind SAFE_INT8_WEIGHT_BITS: AVX2's vpmaddubsw adds two u8 x s8 products in a saturating
    int16. Every 7-bit code in an int8 container lies in [-64, 63], so a pair sums to at most 2 x 255 x 64 < 32767;
    8-bit codes (-128 .. 127) overflow it."""
    from vitq.export.onnx import SAFE_INT8_WEIGHT_BITS, container_codes

    def pairs_exact(a: np.ndarray, w: np.ndarray) -> bool:
        s = a[0::2].astype(np.int64) * w[0::2] + a[1::2].astype(np.int64) * w[1::2]
        return bool((np.clip(s, -32768, 32767) == s).all())

    a = np.full(64, 255, np.int64)
    for bits in range(2, 9):
        for qmin, qmax in ((0, (1 << bits) - 1), (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)):
            codes = np.arange(qmin, qmax + 1)
            c, _ = container_codes(codes.reshape(1, -1), np.array([qmin]), qmin, qmax, "int8")
            worst = np.array([c.min(), c.min()] * 32, np.int64), np.array([c.max(), c.max()] * 32, np.int64)
            assert all(pairs_exact(a, w) for w in worst) == (bits <= SAFE_INT8_WEIGHT_BITS), (bits, qmin, qmax)


def test_u8s8_exact_by_cpu() -> None:
    from vitq.export.onnx import u8s8_exact

    assert u8s8_exact("x86_64", {"avx2", "fma"})[0] is False
    assert u8s8_exact("x86_64", {"avx2", "avx512f", "avx512_vnni"})[0] is True
    assert u8s8_exact("x86_64", {"avx2", "avx_vnni"})[0] is True
    assert u8s8_exact("aarch64", set())[0] is True
    assert "saturates" in u8s8_exact("x86_64", {"avx2"})[1]


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_4bit_weights_are_stored_in_4_bits_and_run_as_the_8bit_file(tmp_path: Path, monkeypatch,
                                                                      weight_dtype: str) -> None:
    """W4 codes in an 8-bit container made a W4A8 file as large as the W8A8 one: they are INT4 / UINT4 initializers
    now, widened by a Cast that onnxruntime folds at load, so the file is smaller and runs the same integer
    kernels with the same outputs, bit for bit."""
    import ml_dtypes

    import vitq.export.onnx as vo

    assert vo.nibble_codes(np.array([0, 16]), np.array([0]), "uint8") is None  # 17 values: not 4 bits
    assert vo.nibble_codes(np.array([-8, 7]), np.array([0]), "int8")[1].tolist() == [0]  # symmetric: zero point kept
    q, x = quantized(recipe="minmax", bits="W4A8")
    rep = export(q, tmp_path / "four", "onnx", weight_dtype=weight_dtype)
    monkeypatch.setattr(vo, "nibble_codes", lambda *a: None)  # the file as it was: 4-bit codes in 8-bit containers
    rep8 = export(q, tmp_path / "eight", "onnx", weight_dtype=weight_dtype)
    g = onnx.load(str(tmp_path / "four" / "model.onnx"))
    four = ml_dtypes.int4 if weight_dtype == "int8" else ml_dtypes.uint4
    packed = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith("_4bit")]
    assert rep["weights_in_4_bits"] == rep["weights_as_codes"] == len(packed) == 10 and rep8["weights_in_4_bits"] == 0
    assert all(p.dtype == four for p in packed)
    assert sum(n.op_type == "Cast" for n in g.graph.node) == 10
    a, b = dequantized_weights(tmp_path / "four" / "model.onnx"), dequantized_weights(tmp_path / "eight" / "model.onnx")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert rep["bytes"] < 0.8 * rep8["bytes"]
    assert rep["runtime_ops"] == rep8["runtime_ops"] and "Cast" not in rep["runtime_ops"]  # folded: same kernels
    out4, out8 = OnnxModel(tmp_path / "four" / "model.onnx")(x), OnnxModel(tmp_path / "eight" / "model.onnx")(x)
    assert torch.equal(out4, out8)
    assert all("stored in 4 bits" in s["note"] for s in rep["sites"] if s["how"] == "int-weight")


def test_repq_w4a8_folds_fractional_zero_points_and_emulates_log_sqrt2(tmp_path: Path) -> None:
    q, x = quantized(recipe="repq", bits="W4A8")
    fracs = [m for m in q.modules() if isinstance(m, vitq.nn.FakeQuant) and m.kind == "act" and m.enabled
             and m.spec.quantizer == "uniform" and abs(float(m.zero_point) - round(float(m.zero_point))) > 1e-6]
    assert fracs  # RepQ's per-tensor zero points are means: fractional
    before = {k: v.clone() for k, v in q.state_dict().items()}
    rep = export(q, tmp_path, "onnx")
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())  # the export form is undone
    folded = [s for s in rep["sites"] if "folded" in s["note"]]
    assert folded and all(s["how"] == "qdq" for s in folded)
    assert {f["role"] for f in rep["lowering"]["fallbacks"]} == {"ATTN_PROBS"}  # log-sqrt2: emulated, exact
    # each fallback's line says what that kind was measured to cost (bench/results/fallback_cost.md)
    assert all("measured: this kind at every block cost 50-66 %" in f["note"] for f in rep["lowering"]["fallbacks"])
    ref, out = logits(q, x), OnnxModel(tmp_path / "model.onnx")(x)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (out - ref).abs().mean() < 0.02 * ref.abs().max()


def test_target_onnx_quantizes_post_softmax_on_the_integer_grid_it_ships(tmp_path: Path) -> None:
    """repq at A8 for onnx: log-sqrt2 post-Softmax becomes 8-bit uniform before calibration, so nothing
    falls back, both attention matmuls run as integer kernels, and what was simulated is what runs."""
    from vitq.recipes import for_target, load_recipe

    r, changes = for_target(load_recipe("repq"), "W8A8", "onnx")
    assert r.name == "repq@onnx" and len(changes) == 1 and "log_sqrt2" in changes[0]
    assert for_target(load_recipe("repq"), "W4A4", "onnx")[1] == []  # A4: integer kernels take 8-bit inputs anyway
    assert for_target(load_recipe("minmax"), "W8A8", "onnx") == (load_recipe("minmax"), [])  # already integer
    with pytest.raises(ConfigError, match="unknown target 'tflite'"):
        for_target(load_recipe("repq"), "W8A8", "tflite")
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)
    plain = vitq.quantize(tiny_vit(), "repq", "W8A8", calib_data=calib)
    q = vitq.quantize(tiny_vit(), "repq", "W8A8", calib_data=calib, target="onnx")
    probs = [m for m in q.modules() if isinstance(m, vitq.nn.FakeQuant) and m.role == vitq.roles.Role.ATTN_PROBS]
    assert probs and all(m.spec.quantizer == "uniform" and m.spec.bits == 8 for m in probs)
    rep, rep_plain = export(q, tmp_path / "t", "onnx"), export(plain, tmp_path / "p", "onnx")
    assert rep["lowering"]["fallbacks"] == [] and len(rep_plain["lowering"]["fallbacks"]) == len(probs)
    integer = sum(v for k, v in rep["runtime_ops"].items() if k in ("MatMulIntegerToFloat", "QLinearMatMul"))
    integer_plain = sum(v for k, v in rep_plain["runtime_ops"].items() if k in ("MatMulIntegerToFloat", "QLinearMatMul"))
    assert integer >= integer_plain + len(probs)  # probabilities x V: now an integer matmul in every block
    ref, out = logits(q, x), OnnxModel(tmp_path / "t" / "model.onnx")(x)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_swin_and_hf_models_export(tmp_path: Path) -> None:
    q, x = quantized(tiny_swin, "percentile", "W8A8", 32)
    export(q, tmp_path / "swin", "onnx")
    assert (OnnxModel(tmp_path / "swin" / "model.onnx")(x).argmax(-1) == logits(q, x).argmax(-1)).float().mean() >= 0.9
    pytest.importorskip("transformers")
    from scripts.timm_to_hf import convert

    hf = vitq.quantize(convert(tiny_vit()), "minmax", "W8A8", calib_data=torch.randn(16, 3, 16, 16))
    rep = export(hf, tmp_path / "hf", "onnx")
    assert rep["runtime_ops"].get("MatMulIntegerToFloat", 0) >= 8
    out = OnnxModel(tmp_path / "hf" / "model.onnx")(x[:, :, :16, :16])
    assert out.shape == (32, 5)


def test_verify_reports_parity_and_refuses_a_drifted_export(tmp_path: Path) -> None:
    q, x = quantized()
    loader = [(x, logits(q, x).argmax(-1))]
    export(q, tmp_path, "onnx")
    res = verify(q, tmp_path, loader, max_top1_diff=100.0)
    assert res["ok"] and res["images"] == 32 and res["agreement"] >= 90
    assert json.loads((tmp_path / "export.json").read_text())["verify"]["exported_top1"] == res["exported_top1"]
    with torch.no_grad():  # the simulated model drifts away from what was exported
        q.head.weight.neg_()
    with pytest.raises(ExportError, match="differs from the simulated"):
        verify(q, tmp_path, loader, max_top1_diff=0.0)
    from vitq.export.deploy import parity_failure  # one image of 500 is 0.2 points: the limit 0.1 is not resolvable

    one = {"images": 500, "top1_diff": -0.2, "exported_top1": 88.4, "simulated_top1": 88.6}
    assert "1 of 500 images, and one image is 0.20 points on 500: verify on at least 1000 images" in \
        parity_failure(one, "onnx", 0.1)
    many = {**one, "images": 10000, "top1_diff": -0.5}  # 50 images: a real difference, no such hint
    assert "verify on at least" not in parity_failure(many, "onnx", 0.1)
    assert "verify on at least" not in parity_failure(one, "onnx", 0.0)


def test_export_refusals(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelError, match="only a model quantized by vitq"):
        export(tiny_vit(), tmp_path, "onnx")
    q = vitq.prepare(tiny_vit(), "minmax", "W8A8")
    with pytest.raises(ModelError, match="not calibrated"):
        export(q, tmp_path, "onnx")
    q, _ = quantized()
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export(q, tmp_path, "tflite")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export(q, tmp_path / "file", "onnx")
    fp = vitq.quantize(tiny_vit(), "fp", "W8A8")
    with pytest.raises(ModelError, match="recipe fp quantizes no site"):
        export(fp, tmp_path / "fp", "onnx")
    recipe = tmp_path / "logw.yaml"  # log2 weights, per-token activations: nothing ONNX runs as integers
    recipe.write_text('rules:\n  "weight:*": {quantizer: log2, bits: W}\n  "act:*": {granularity: token}\n')
    lw = vitq.quantize(tiny_vit(), str(recipe), "W4A4", calib_data=torch.randn(8, 3, 16, 16))
    with pytest.raises(ModelError, match="no quantization site of this model has an integer form in onnx"):
        export(lw, tmp_path / "lw", "onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModelError, match=r"pip install 'vitq\[deploy\]'"):
        export(q, tmp_path / "x", "onnx")


def test_cli_quantize_export_verify(tmp_path: Path, capsys) -> None:
    from vitq.cli import main

    run = tmp_path / "run"
    assert main(["quantize", "fmnist-vit", "--recipe", "minmax", "--bits", "W8A8", "--eval-size", "500", "--no-progress", "--out", str(run),
                 "--export", "onnx", "--max-top1-diff", "1.0", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert abs(r["export"]["verify"]["top1_diff"]) <= 1.0 and (run / "model.onnx").is_file()
    assert r["recipe"] == "minmax" and r["export"]["lowering"]["fallbacks"] == []  # minmax needs no target change
    assert main(["quantize", "fmnist-vit", "--recipe", "repq", "--eval-size", "300", "--no-progress", "--skip-fp",
                 "--out", str(tmp_path / "rq"), "--export", "onnx", "--json", str(tmp_path / "rq.json")]) == 0
    r = json.loads((tmp_path / "rq.json").read_text())
    assert r["recipe"] == "repq@onnx" and r["export"]["lowering"]["fallbacks"] == []  # --export onnx implies --target
    assert json.loads((tmp_path / "rq" / "vitq.json").read_text())["recipe"]["name"] == "repq@onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--verify", "--eval-size", "200", "--no-progress", "--max-top1-diff", "1.0",
                 "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out  # --verify also times the file against the float ONNX, and records it
    assert re.search(r"speed: [\d.]+ images/s against the float ONNX's [\d.]+ \([\d.]+x\) in onnxruntime", out), out
    assert json.loads((tmp_path / "again" / "export.json").read_text())["speed"]["runtime"] == "onnxruntime"
    if importlib.util.find_spec("openvino") is not None:  # in its own process: see in_own_process
        in_own_process("_openvino_cli", str(run), str(tmp_path / "ov"))
    assert main(["export", "fmnist-vit", "--no-progress"]) == 2  # not a quantize --out folder
    assert main(["export", str(run), "--format", "vitq", "--weight-dtype", "int8", "--no-progress"]) == 2  # onnx only
    assert main(["quantize", "fmnist-vit", "--export", "onnx", "--no-progress"]) == 2  # --export needs --out


def _openvino_cli(run: str, out_dir: str) -> None:
    import contextlib
    import io

    from vitq.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", run, "--verify", "--eval-size", "200", "--no-progress", "--max-top1-diff", "1.0",
                     "--out", out_dir, "--runtime", "openvino"])
    out = buf.getvalue()
    assert code == 0, out
    assert "onnx in openvino top-1" in out and "in openvino, batch 1" in out, out


@pytest.mark.parametrize("quantizer,bits,options", [("log2", 4, ()), ("log2", 4, (("extra_zero", True),)),
                                                    ("log_sqrt2", 8, ()), ("tanq", 4, ()),
                                                    ("twin_uniform", 6, (("mode", "softmax"),))])
def test_lut_emulation_equals_the_fake_quant(quantizer: str, bits: int, options) -> None:
    """Non-uniform post-Softmax sites are exported as codes + a table of levels: the same values."""
    from vitq.export.lowering import LUTQuant, lut_lowerable
    from vitq.nn import FakeQuant
    from vitq.quantizers import QuantSpec
    from vitq.roles import Role

    x = torch.rand(4, 2, 50, 50, generator=torch.Generator().manual_seed(0)).softmax(-1)
    fq = FakeQuant(QuantSpec(quantizer, bits, options=options), Role.ATTN_PROBS, "probs")
    fq.start_calibration()
    fq(x)
    fq.finish_calibration()
    assert lut_lowerable(fq)
    assert torch.equal(LUTQuant(fq)(x), fq(x))


@pytest.mark.parametrize("bits", ["W3A3", "W4A4", "W8A8"])
def test_the_default_recipe_exports_with_parity(tmp_path: Path, bits: str) -> None:
    """`best` (the CLI's default) in each of its width regimes - V-2SF post-GELU and TanQ's log-tan levels at
    3 bits, reconstruction with TanQ at 4, MOSF + calibration only at 8 - quantized for onnx as `--export
    onnx` does: the file onnxruntime runs gives the simulated logits, with integer weights throughout."""
    from vitq.recipes import load_recipe, set_pass_options

    recipe = set_pass_options(load_recipe("best"), {"iters": 2})  # its passes, not its CPU budget
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)
    q = vitq.quantize(tiny_vit(), recipe, bits, calib_data=calib, target="onnx")
    rep = export(q, tmp_path, "onnx")
    assert rep["lowering"]["counts"]["int-weight"] == 10  # every Linear's weight as integer codes
    emulated = {f["role"] for f in rep["lowering"]["fallbacks"]}
    # 3- and 4-bit uniform activations are QDQ in 8-bit containers (clipped to their code range): integer kernels
    assert rep["lowering"]["counts"]["qdq"] >= 14 and rep["runtime_ops"].get("MatMulIntegerToFloat", 0) >= 6
    assert ("FC2_IN" in emulated) == (bits == "W3A3")  # V-2SF has no QuantizeLinear form: emulated exactly, in float
    assert all("cost 86-89 %" in f["note"] for f in rep["lowering"]["fallbacks"] if f["role"] == "FC2_IN")
    # a float activation meets integer weights there: onnxruntime's default MatMulNBits fusion would quantize it
    # again to int8 (20-30 % of the largest logit here); the session (and export.json) set accuracy level 1
    assert rep["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "1"}
    ref, out = logits(q, x), OnnxModel(tmp_path / "model.onnx")(x)
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("bits", ["W8A8", "W4A8"])
def test_the_default_recipe_is_all_integer_on_the_two_step_path(tmp_path: Path, bits: str) -> None:
    """Issue 43, integer by default: `vitq quantize` without --target / --export, saved, then `vitq export RUN` -
    the default recipe at 8-bit activations is made of quantizers onnxruntime runs as integers (its post-Softmax
    uniform 8-bit, not TanQ), so the file has no float fallback and the attention's probs x V is integer too."""
    from vitq.recipes import for_target, load_recipe

    recipe = load_recipe("best")
    assert for_target(recipe, bits, "onnx")[1] == []  # nothing for --target onnx to change
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)
    q = vitq.quantize(tiny_vit(), recipe, bits, calib_data=calib)
    vitq.save_quantized(q, tmp_path / "run", vitq.ModelSource("pickle", str(_pickled(tmp_path))))
    back = vitq.load_quantized(tmp_path / "run", trust_pickle=True)
    rep = export(back, tmp_path / "onnx", "onnx")
    assert rep["lowering"]["fallbacks"] == [], rep["lowering"]["fallbacks"]
    assert rep["runtime_ops"].get("QLinearMatMul", 0) + rep["runtime_ops"].get("MatMulInteger", 0) >= 2  # probs x V
    ref, out = logits(q, x), OnnxModel(tmp_path / "onnx" / "model.onnx")(x)
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()
    # q and k carry no zero point at 8-bit activations (OpenVINO runs the attention in int8 only then), and 8-bit
    # weights none either; 4-bit weights keep theirs (symmetric 4-bit weights cost about 0.5 points)
    man = vitq.manifest(back)
    assert {e["symmetric"] for e in man if e["role"] in ("ATTN_Q", "ATTN_K")} == {True}
    assert {e["symmetric"] for e in man if e["kind"] == "weight"} == {bits == "W8A8"}
    g = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    const = set(inits) | {n.output[0] for n in g.node if n.op_type == "Cast" and n.input[0] in inits}  # 4-bit codes
    wzp = [inits[n.input[2]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in const
           and len(n.input) > 2 and n.input[2] in inits]
    assert wzp and all((z == 0).all() for z in wzp) == (bits == "W8A8")


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, False), (4, True), (8, False)])
def test_qdq_of_fewer_bit_codes_equals_the_fake_quant(tmp_path: Path, bits: int, symmetric: bool) -> None:
    """A 3- or 4-bit uniform activation is a QDQ pair in an 8-bit container: the clip before the quantize keeps
    its code range (``QuantizeLinear`` saturates only to the container's), so the values are the fake-quant's
    (ties apart), in eager and in onnxruntime alike."""
    from vitq.export.lowering import QDQ
    from vitq.nn import FakeQuant
    from vitq.quantizers import QuantSpec
    from vitq.roles import Role

    g = torch.Generator().manual_seed(0)
    fq = FakeQuant(QuantSpec("uniform", bits, symmetric=symmetric), Role.FC1_IN, "x")
    fq.start_calibration()
    fq(torch.randn(64, 32, generator=g))
    fq.finish_calibration()
    assert fq.spec.integer_act
    x = 3 * torch.randn(64, 32, generator=g)  # well outside the calibrated range too
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    qdq = QDQ(float(fq.scale), int(round(float(fq.zero_point))), qmin, qmax)
    assert (qdq.clip is None) == (bits == 8)
    with torch.no_grad():
        ref, eager = fq(x), qdq(x)
    assert (eager - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert len(torch.unique(eager)) <= 1 << bits
    from vitq.export.onnx import session

    torch.onnx.export(qdq, (x,), str(tmp_path / "qdq.onnx"), dynamo=True, opset_version=21, verbose=False)
    s = session(tmp_path / "qdq.onnx")
    out = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_an_onnx_export_is_sealed(tmp_path: Path) -> None:
    """export.json records the file's sha256; a changed model.onnx is refused in one line before onnxruntime reads it
    (a tampered file ran unnoticed before); the intact file runs."""
    q, x = quantized()
    rep = export(q, tmp_path, "onnx")
    assert len(rep["sha256"]) == 64 and json.loads((tmp_path / "export.json").read_text())["sha256"] == rep["sha256"]
    ref = OnnxModel(tmp_path / "model.onnx")(x)
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model.onnx does not match the sha256 recorded in export.json"):
        OnnxModel(tmp_path / "model.onnx")
    data[len(data) // 2] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    assert torch.equal(OnnxModel(tmp_path / "model.onnx")(x), ref)


def test_the_float_model_exports_as_the_baseline(tmp_path: Path, capsys) -> None:
    """vitq export MODEL (a float model, not a run folder) --format onnx --out DIR: the float ONNX file with a quantized
    export's conventions (input pixel_values, export.json with its sha256), its outputs the float model's."""
    from vitq.cli import main

    assert main(["export", "fmnist-vit", "--format", "onnx", "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    assert "exported the float model fmnist-vit" in capsys.readouterr().out
    rep = json.loads((tmp_path / "f" / "export.json").read_text())
    assert rep["lowering"]["counts"] == {"float": rep["lowering"]["counts"]["float"]} and len(rep["sha256"]) == 64
    m, _ = vitq.load_model("fmnist-vit")
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(OnnxModel(tmp_path / "f" / "model.onnx")(x), logits(m, x), atol=1e-4, rtol=1e-4)
    assert main(["export", "fmnist-vit", "--format", "onnx", "--no-progress"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_a_saved_reparameterized_model_exports_as_the_one_in_memory(tmp_path: Path) -> None:
    """RepQ-ViT makes its channel-wise post-LayerNorm sites per-tensor after calibration; a saved run reloaded them as
    channel-wise (the recipe's spec), so `vitq export RUN` emulated them in float where the in-memory export had
    integer QDQ (the two-step path of issue 43: fewer integer kernels, slower). The loaded model's manifest and its
    export's lowering now equal the in-memory model's."""
    q, x = quantized(recipe="repq", bits="W4A8")
    vitq.save_quantized(q, tmp_path / "run", vitq.ModelSource("pickle", str(_pickled(tmp_path))))
    back = vitq.load_quantized(tmp_path / "run", trust_pickle=True)
    assert vitq.manifest(back) == vitq.manifest(q)
    a, b = export(q, tmp_path / "a", "onnx"), export(back, tmp_path / "b", "onnx")
    assert a["lowering"]["counts"] == b["lowering"]["counts"]
    assert torch.equal(OnnxModel(tmp_path / "a" / "model.onnx")(x), OnnxModel(tmp_path / "b" / "model.onnx")(x))


def _pickled(tmp_path: Path) -> Path:
    p = tmp_path / "float.pt"
    torch.save(tiny_vit(), p)
    return p


def in_own_process(check: str, *args: str) -> None:
    """Run ``check(*args)`` of this module in a fresh Python process. OpenVINO is loaded only there: a pytest-xdist
    worker that had loaded it died of SIGSEGV (no Python frame, faulthandler silent) in about half of the full runs,
    always later, inside another test's wait on a subprocess (mypy's, a lock test's), so the suite went red."""
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_export_onnx as t; t.{check}(*{list(args)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(TESTS.parent / "src")})
    assert done.returncode == 0, (done.stdout[-3000:] + done.stderr[-3000:])


def test_openvino_runs_the_same_file_with_parity_and_digest(tmp_path: Path) -> None:
    """--runtime openvino: OpenVINO compiles vitq's ONNX file as it is (QDQ -> FakeQuantize) and gives the simulated
    predictions; the file's digest is checked first, as for onnxruntime."""
    pytest.importorskip("openvino")
    in_own_process("_openvino_checks", str(tmp_path))


def _openvino_checks(tmp: str) -> None:
    from vitq.export.deploy import load_runtime

    tmp_path = Path(tmp)

    q, x = quantized(recipe="best", bits="W8A8")
    export(q, tmp_path, "onnx")
    ref = logits(q, x)
    out = load_runtime(tmp_path, "onnx", "openvino")(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() and (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    res = verify(q, tmp_path, [(x, ref.argmax(-1))], max_top1_diff=10.0, runtime="openvino")
    assert res["runtime"] == "openvino" and res["format"] == "onnx in openvino"
    with pytest.raises(ConfigError, match="--runtime openvino runs ONNX files"):
        load_runtime(tmp_path, "vitq", "openvino")
    with open(tmp_path / "model.onnx", "r+b") as f:  # one byte changed: refused before OpenVINO reads it
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ModelError, match="does not match the sha256"):
        load_runtime(tmp_path, "onnx", "openvino")


def test_verify_times_the_file_against_the_float_onnx(tmp_path: Path) -> None:
    """--verify also times the file against the float ONNX of the same model (same runtime, this host) and records it
    (export.json's speed); the float copy is the quantized model with its slots emptied: its outputs are the float
    model's (reparameterization is exact)."""
    from vitq.export.deploy import float_copy, time_against_float

    q, x = quantized(recipe="repq", bits="W8A8")
    fp = float_copy(q)
    assert not any(m["quantizer"] != "float" for m in vitq.manifest(fp))
    torch.testing.assert_close(logits(fp, x), logits(tiny_vit(), x), rtol=1e-4, atol=1e-4)
    export(q, tmp_path, "onnx")
    sp = time_against_float(q, tmp_path, seconds=0.2)
    assert sp["quantized_ips"] > 0 and sp["float_ips"] > 0 and sp["speedup"] == pytest.approx(
        sp["quantized_ips"] / sp["float_ips"], rel=1e-2)
    assert json.loads((tmp_path / "export.json").read_text())["speed"] == sp
