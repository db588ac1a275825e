"""--format openvino: the ONNX graph rewritten into the form OpenVINO's INT8 transformations fuse (vitq.export.ov_graph),
saved as OpenVINO IR, verified in OpenVINO. Every check that loads OpenVINO runs in its own process (in_own_process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_swin, tiny_vit

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import vitq  # noqa: E402
from vitq.export.onnx import centered_codes  # noqa: E402
from vitq.export.ov_graph import (  # noqa: E402
    fake_quantize_pairs,
    fq_range,
    hoist_fake_quantize,
    merge_split_fake_quantize,
    openvino_form,
)

TESTS = Path(__file__).resolve().parent
HAS_OV = __import__("importlib").util.find_spec("openvino") is not None


def in_own_process(check: str, *args: str) -> None:
    """``check(*args)`` of this module in a fresh Python process: OpenVINO is loaded only there (a pytest-xdist worker
    that had loaded it died of SIGSEGV later in other tests: tests/test_export_onnx.py)."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_export_openvino as t; t.{check}(*{list(args)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(TESTS.parent / "src")})
    assert done.returncode == 0, (done.stdout[-3000:] + done.stderr[-3000:])


# ------------------------------------------------------------------------------------------ graphs to rewrite
def _c(name: str, v: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v), name)


def _qdq(x: str, out: str, scale: float, zp: int, signed: bool, tag: str) -> tuple[list, list]:
    dt = np.int8 if signed else np.uint8
    inits = [_c(f"{tag}_s", np.array(scale, np.float32)), _c(f"{tag}_z", np.array(zp, dt))]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
             helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [out])]
    return nodes, inits


def attention_graph(n: int = 5, heads: int = 2, d: int = 4) -> onnx.ModelProto:
    """A timm-style attention core with quantizers where vitq puts them: X (1, n, 3 h d) -> Reshape (-1, n, 3, h, d)
    -> Transpose (2, 0, 3, 1, 4) -> 3 Slices -> Squeeze; q * 0.125 and k^T and v each through a QDQ pair; softmax
    through one; the output transposed and reshaped to (1, n, h d), then a QDQ pair, then a MatMul with a constant."""
    c = heads * d
    rng = np.random.default_rng(0)
    nodes, inits = [], [_c("shape5", np.array([-1, n, 3, heads, d], np.int64)), _c("shape3", np.array([-1, n, c], np.int64)),
                        _c("eighth", np.array(0.125, np.float32)), _c("ax0", np.array([0], np.int64)),
                        _c("w", rng.standard_normal((c, 3)).astype(np.float32))]
    nodes += [helper.make_node("Reshape", ["X", "shape5"], ["r"]),
              helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4])]
    for i, name in enumerate("qkv"):
        inits += [_c(f"st{i}", np.array([i], np.int64)), _c(f"en{i}", np.array([i + 1], np.int64))]
        nodes += [helper.make_node("Slice", ["t", f"st{i}", f"en{i}", "ax0"], [f"sl{i}"]),
                  helper.make_node("Squeeze", [f"sl{i}", "ax0"], [name])]
    nodes.append(helper.make_node("Mul", ["q", "eighth"], ["qs"]))
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]))
    for src, dst, s, z, signed in (("qs", "q_d", 0.01, 0, True), ("kt", "k_d", 0.05, 0, True), ("v", "v_d", 0.04, 120, False)):
        nn_, ii = _qdq(src, dst, s, z, signed, dst)
        nodes += nn_
        inits += ii
    nodes += [helper.make_node("MatMul", ["q_d", "k_d"], ["logit"]), helper.make_node("Softmax", ["logit"], ["p"], axis=-1)]
    nn_, ii = _qdq("p", "p_d", 1 / 255, 0, False, "p")
    nodes += nn_ + [helper.make_node("MatMul", ["p_d", "v_d"], ["o"]),
                    helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", ["ot", "shape3"], ["o3"])]
    inits += ii
    nn_, ii = _qdq("o3", "o_d", 0.003, 100, False, "proj")
    nodes += nn_ + [helper.make_node("MatMul", ["o_d", "w"], ["Y"])]
    inits += ii
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, n, 3 * c])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _fq_input_producers(m: onnx.ModelProto) -> list[str]:
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    return sorted(prod.get(n.input[0], "input") for n in m.graph.node if n.op_type == "FakeQuantize")


def test_fq_range_is_the_quantizers_grid() -> None:
    """FakeQuantize over fq_range with qmax - qmin + 1 levels gives the code QuantizeLinear gives (shifted by qmin),
    and the value DequantizeLinear gives, for uint8 / int8 grids with zero points (OpenVINO's formula, in numpy)."""
    x = np.random.default_rng(1).standard_normal(20000).astype(np.float64) * 3
    for scale, zp, qmin, qmax in ((0.013, 120, 0, 255), (0.02, 0, -128, 127), (0.0071, -5, -128, 127)):
        lo, hi = fq_range(scale, zp, qmin, qmax)
        levels = qmax - qmin + 1
        fq = np.round((np.clip(x, lo, hi) - lo) / (hi - lo) * (levels - 1)) / (levels - 1) * (hi - lo) + lo
        qdq = (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale
        assert np.abs(fq - qdq).max() < 1e-9 * max(1.0, abs(lo), abs(hi)) + scale * 1e-6 or \
            np.mean(np.abs(fq - qdq) > 1e-6) < 1e-3  # only exact ties may round the other way


def test_rewrites_move_every_quantizer_where_openvino_fuses_it() -> None:
    """The attention graph: 5 QDQ pairs -> 5 FakeQuantize; q / k / v's three become one per-channel FakeQuantize on the
    projection output (ranges of q divided by the 0.125 it was scaled by); the output projection's quantizer moves
    above Reshape and Transpose onto the attention MatMul. Nothing else changes."""
    m = attention_graph()
    assert fake_quantize_pairs(m) == 5 and "QuantizeLinear" not in _ops(m) and "DequantizeLinear" not in _ops(m)
    assert merge_split_fake_quantize(m) == 1
    fqs = [n for n in m.graph.node if n.op_type == "FakeQuantize"]
    assert len(fqs) == 3
    vals = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    merged = next(n for n in fqs if n.input[0] == "X")
    lo = vals[merged.input[1]]
    assert lo.shape == (3 * 8,)
    np.testing.assert_allclose(lo[:8], fq_range(0.01, 0, -128, 127)[0] / 0.125, rtol=1e-6)  # q, unscaled
    np.testing.assert_allclose(lo[8:16], fq_range(0.05, 0, -128, 127)[0], rtol=1e-6)  # k
    np.testing.assert_allclose(lo[16:], fq_range(0.04, 120, 0, 255)[0], rtol=1e-6)  # v
    assert hoist_fake_quantize(m) == 2
    assert _fq_input_producers(m) == ["MatMul", "Softmax", "input"]
    onnx.checker.check_model(m)
    # all three in one call; a graph without the pattern is left as it is
    again = attention_graph()
    assert openvino_form(again) == {"fake_quantize": 5, "merged_projections": 1, "hoisted": 2}
    plain = attention_graph()
    plain.graph.node[1].attribute[0].ints[:] = [0, 2, 3, 1, 4]  # the Transpose no longer puts the 3 first
    assert fake_quantize_pairs(plain) == 5 and merge_split_fake_quantize(plain) == 0


def test_a_per_channel_quantizer_stays_below_a_reshape() -> None:
    """hoist_fake_quantize moves only per-tensor FakeQuantize nodes above Reshape / Transpose (a per-channel one
    would change which channel each range applies to)."""
    m = attention_graph()
    fake_quantize_pairs(m)
    merge_split_fake_quantize(m)
    merged = next(n for n in m.graph.node if n.op_type == "FakeQuantize" and n.input[0] == "X")
    merged.input[0] = "Xr"  # put a Reshape between the input and the merged quantizer
    m.graph.initializer.append(_c("same", np.array([1, 5, 24], np.int64)))
    m.graph.node.insert(0, helper.make_node("Reshape", ["X", "same"], ["Xr"]))
    assert hoist_fake_quantize(m) == 2  # the output projection's, not the per-channel one
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    assert prod[next(n for n in m.graph.node if n.name.startswith("vitq_fqc")).input[0]] == "Reshape"


def test_centered_codes_keep_the_dequantized_weights() -> None:
    """4-bit asymmetric codes as code - zero point in int8 with zero point 0: the same weights (what OpenVINO's INT8
    MatMul needs); 8-bit asymmetric codes do not fit and stay as they are."""
    rng = np.random.default_rng(0)
    codes, zp, scale = rng.integers(0, 16, (6, 10)), rng.integers(0, 16, (6, 1)), rng.random((6, 1)) + 0.1
    c = centered_codes(codes, zp, 0, 15)
    assert c is not None and c.dtype == np.int8
    np.testing.assert_array_equal(c.astype(np.float64) * scale, (codes - zp) * scale)
    assert centered_codes(rng.integers(0, 256, (4, 4)), np.full((4, 1), 7), 0, 255) is None


# ------------------------------------------------------------------------------------------ in OpenVINO
@pytest.mark.skipif(not HAS_OV, reason="the openvino extra is not installed")
def test_rewritten_graph_computes_what_the_qdq_graph_computes() -> None:
    """In OpenVINO (f32): the attention graph after each rewrite gives the outputs of the QDQ graph as written (the
    rewrites move quantizers, never change what they compute)."""
    in_own_process("_same_outputs")


def _same_outputs() -> None:
    import openvino as ov

    core = ov.Core()
    x = np.random.default_rng(3).standard_normal((1, 5, 24)).astype(np.float32) * 2

    def run(m: onnx.ModelProto) -> np.ndarray:
        c = core.compile_model(core.read_model(m.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(c(x)[0])

    ref = run(attention_graph())
    m = attention_graph()
    for step in (fake_quantize_pairs, merge_split_fake_quantize, hoist_fake_quantize):
        assert step(m) > 0
        np.testing.assert_allclose(run(m), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.skipif(not HAS_OV, reason="the openvino extra is not installed")
def test_openvino_form_parity_fusion_and_digests(tmp_path: Path) -> None:
    """vitq.export(q, dir, "openvino"): model.xml + model.bin sealed in export.json; the file gives the simulated
    model's predictions in OpenVINO (W8A8, W4A8, a Swin); every activation quantizer but the input's is fused into
    a compute op in OpenVINO's compiled graph (no stand-alone FakeQuantize); 4-bit weights reach OpenVINO without a
    zero-point Subtract; a changed model.bin is refused before OpenVINO reads it."""
    in_own_process("_openvino_form_checks", str(tmp_path))


def _openvino_form_checks(tmp: str) -> None:
    import openvino as ov

    from vitq.errors import ModelError
    from vitq.export.deploy import export, load_runtime, verify

    tmp_path = Path(tmp)
    for make, bits in ((tiny_vit, "W8A8"), (tiny_vit, "W4A8"), (tiny_swin, "W8A8")):
        model, g = make(), torch.Generator().manual_seed(0)
        size = vitq.data_config(model).input_size
        calib, x = torch.randn(16, *size, generator=g), torch.randn(32, *size, generator=g)
        q = vitq.quantize(model, "best", bits, calib_data=calib)
        out = tmp_path / f"{make.__name__}_{bits}"
        rep = export(q, out, "openvino")
        assert rep["file"] == "model.xml" and set(rep["companions"]) == {"model.bin"} and (out / "model.bin").is_file()
        assert rep["fake_quantize"] > 0 and rep["hoisted"] > 0
        assert rep["merged_projections"] == (2 if make is tiny_vit else 4)  # one per block (fused qkv)
        with torch.no_grad():
            ref = q(x)
        rt = load_runtime(out, "openvino")
        got = rt(x)
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), (make.__name__, bits)
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
        res = verify(q, out, [(x, ref.argmax(-1))], "openvino", max_top1_diff=10.0)
        assert res["runtime"] == "openvino" and res["format"] == "openvino"
        exec_fq = [op for op in rt.compiled.get_runtime_model().get_ordered_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "FakeQuantize"]
        if make is tiny_vit:  # only the input's quantizer runs alone (before the patch embedding's convolution)
            assert len(exec_fq) == 1, [op.get_friendly_name() for op in exec_fq]
        if bits == "W4A8":
            ir = ov.Core().read_model(str(out / "model.xml"))
            assert rep["weights_centered"] > 0
            assert not [op for op in ir.get_ordered_ops() if op.get_type_name() == "Subtract"
                        and op.input_value(0).get_node().get_type_name() == "Convert"
                        and op.input_value(0).get_node().input_value(0).get_node().get_type_name() == "Constant"]
    with open(out / "model.bin", "r+b") as f:  # one byte of the weights changed
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ModelError, match="model.bin is changed or damaged"):
        load_runtime(out, "openvino")
    (out / "model.bin").unlink()
    with pytest.raises(ModelError, match="model.bin is missing"):
        load_runtime(out, "openvino")


@pytest.mark.skipif(not HAS_OV, reason="the openvino extra is not installed")
def test_cli_export_openvino(tmp_path: Path) -> None:
    """vitq quantize --export openvino writes openvino/ in the run folder, verifies it in OpenVINO and times it against
    the float file; vitq export RUN --format openvino and the float model's --format openvino work; --runtime with
    the OpenVINO form is one line."""
    in_own_process("_cli_checks", str(tmp_path))


def _cli_checks(tmp: str) -> None:
    import contextlib
    import io

    from vitq.cli import main

    tmp_path = Path(tmp)
    run = tmp_path / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["quantize", "fmnist-vit", "--eval-size", "300", "--no-progress", "--skip-fp", "--out", str(run),
                     "--export", "openvino", "--max-top1-diff", "1.0", "--json", str(tmp_path / "r.json")])
    out = buf.getvalue()
    assert code == 0, out
    assert "openvino/model.xml + model.bin" in out and "openvino top-1" in out and "in openvino, batch 1" in out, out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["export"]["format"] == "openvino" and abs(rec["export"]["verify"]["top1_diff"]) <= 1.0
    assert (run / "openvino" / "model.xml").is_file() and not (run / "model.onnx").exists()
    speed = json.loads((run / "openvino" / "export.json").read_text())["speed"]  # timed against the float file, in OV
    assert speed["runtime"] == "openvino" and speed["float_precision"] in ("f32", "bf16") and speed["float_ips"] > 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), "--format", "openvino", "--out", str(tmp_path / "again"), "--no-progress"]) == 0
        assert main(["export", "fmnist-vit", "--format", "openvino", "--out", str(tmp_path / "fp"), "--verify",
                     "--eval-size", "100", "--no-progress"]) == 0
        assert main(["export", str(run), "--format", "openvino", "--runtime", "openvino", "--verify",
                     "--no-progress"]) == 2
    fp = json.loads((tmp_path / "fp" / "export.json").read_text())
    assert fp["format"] == "openvino" and fp["fake_quantize"] == 0 and fp["verify"]["top1_diff"] == 0


def test_parity_is_checked_in_f32_and_openvinos_bf16_default_measured_beside(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    """On a CPU with AMX / AVX512-BF16 OpenVINO computes float operations in bf16 by default (f16 on ARM). --verify
    checks the file in f32 (a file that is right passes: the trained DINOv2-style encoder's embeddings reach cosine
    0.998 in bf16 against the 0.999 limit and failed before), and measures the default beside it: recorded in the
    verify record, printed, a warning naming the f32 hint when it is outside the limit. A file wrong in f32 fails."""
    import vitq.export.deploy as deploy
    from vitq.cli import _print_default_precision

    q = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(8, 3, 16, 16))
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = [(x, torch.zeros(16, dtype=torch.long))]

    class Runtime:
        def __init__(self, precision: str, right: bool) -> None:
            self.precision, self.right = precision, right

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return q(images) if self.right else torch.randn(images.shape[0], 5)  # another model's outputs

        def eval(self) -> "Runtime":
            return self

    asked: list[object] = []

    def fake(default: Runtime, f32: Runtime):
        def load_runtime(out, fmt, runtime=None, precision=None):
            asked.append(precision)
            return f32 if precision == "f32" else default
        return load_runtime

    monkeypatch.setattr(deploy, "load_runtime", fake(Runtime("bf16", False), Runtime("f32", True)))
    res = deploy.verify(q, tmp_path, batches, "openvino")
    assert asked == [None, "f32"] and res["ok"] and res["top1_diff"] == 0
    d = res["default_precision"]
    assert d["precision"] == "bf16" and not d["within_limit"] and d["agreement"] < 100
    enc = deploy.verify(q, tmp_path, batches, "openvino", embeddings=True)
    assert enc["ok"] and enc["embedding_cosine_min"] > 0.99999
    assert enc["default_precision"]["embedding_cosine_min"] < 0.9 and not enc["default_precision"]["within_limit"]
    with caplog.at_level("WARNING", logger="vitq"):
        _print_default_precision(enc)
    assert "INFERENCE_PRECISION_HINT': 'f32'" in caplog.text and "bf16" in caplog.text

    # the same outputs in the default precision: measured, within the limit, no warning
    monkeypatch.setattr(deploy, "load_runtime", fake(Runtime("bf16", True), Runtime("f32", True)))
    res = deploy.verify(q, tmp_path, batches, "openvino")
    assert res["default_precision"]["within_limit"] and res["default_precision"]["top1_diff"] == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitq"):
        _print_default_precision(res)
    assert caplog.text == ""

    # wrong in f32: the file is wrong, and the line says nothing of bf16
    monkeypatch.setattr(deploy, "load_runtime", fake(Runtime("bf16", True), Runtime("f32", False)))
    with pytest.raises(deploy.ExportError) as e:
        deploy.verify(q, tmp_path, batches, "openvino")
    assert "bf16" not in str(e.value)
    # a runtime whose default is f32: one compile, no default_precision
    asked.clear()
    monkeypatch.setattr(deploy, "load_runtime", fake(Runtime("f32", True), Runtime("f32", False)))
    res = deploy.verify(q, tmp_path, batches, "openvino")
    assert asked == [None] and "default_precision" not in res


OV_FAMILIES = ["eva02", "siglip", "swinv2", "cait", "pvt_v2", "hybrid_r26", "hf_siglip", "hf_swinv2", "hf_dinov2_reg_cls"]


@pytest.mark.skipif(not HAS_OV, reason="the openvino extra is not installed")
def test_the_openvino_form_of_each_attention_kind_computes_the_simulated_model() -> None:
    """The rewrites on every kind of attention graph vitq exports (RoPE, attention pooling, cosine attention, class
    attention, spatial reduction, a CNN stem, Hugging Face's separate q / k / v, registers): the OpenVINO form in f32
    gives the simulated model's outputs (cosine >= 0.999 image by image; the check of the rewrites themselves - bf16 is
    the user's CPU's choice, see test_parity_is_checked_in_f32_and_openvinos_bf16_default_measured_beside)."""
    in_own_process("_families_in_openvino")


def _families_in_openvino() -> None:
    import tempfile

    sys.path.insert(0, str(TESTS.parent))
    from scripts.coverage import CASES, _logits

    from vitq.export.deploy import export, load_runtime

    torch.set_num_threads(1)
    bad = []
    for key in OV_FAMILIES:
        case = next(c for c in CASES if c.key == key)
        model, x = case.build(), case.input()
        q = vitq.quantize(model, "best", "W8A8", calib_data=x)
        with torch.no_grad():
            y = _logits(q(x)).float()
        with tempfile.TemporaryDirectory() as d:
            export(q, d, "openvino")
            rt = load_runtime(Path(d), "openvino", precision="f32")  # what --verify checks with
            assert rt.precision == "f32"
            got = rt(x).float().reshape(y.shape)
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), y.flatten(1)).min())
        if not cos >= 0.999:
            bad.append((key, cos))
    assert not bad, bad
