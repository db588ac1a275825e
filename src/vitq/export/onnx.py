"""ONNX backend: a QDQ graph onnxruntime runs with integer kernels on the CPU.

1. The model in its export form (:func:`vitq.export.lowering.export_form`) is exported with
   ``torch.onnx.export`` (the ``torch.export`` based exporter, opset 21, dynamic batch): activation
   sites of kind ``qdq`` become ``QuantizeLinear`` / ``DequantizeLinear`` pairs; emulated sites their
   float formula; weights their dequantized grid values.
2. Every weight constant is replaced by its integer codes (in the orientation the exported graph
   uses) and a ``DequantizeLinear`` with its per-channel scales and zero points, so onnxruntime's QDQ
   fusions see ``DQ(x) -> MatMul <- DQ(W)`` and run ``MatMulIntegerToFloat`` / ``QLinearMatMul``; the
   weights ship at 1 byte per parameter. The container (``weight_dtype``): ``uint8`` - activations are
   uint8 too, and onnxruntime's u8 x u8 kernels are exact on every CPU - or ``int8`` (u8 x s8), faster
   where the CPU has a u8 x s8 dot product (AVX512-VNNI, AVX-VNNI, AMX, ARM); ``auto`` (the default)
   takes int8 where the exporting CPU runs it exactly and uint8 elsewhere. On
   x86 CPUs with AVX2 and no VNNI onnxruntime computes int8 with ``vpmaddubsw``, which saturates
   the sum of two products at 16 bits: measurably wrong logits (:func:`u8s8_exact` says which CPU
   this is). Either container holds the same codes shifted by a constant, with the zero point
   shifted alike, so the dequantized weights are identical.
3. Node metadata (the exporter's stack traces) is dropped; the file is checked with onnx's checker.

The graph's input is the preprocessed image batch (N, C, H, W float32, name ``pixel_values``) and
its output the logits (``logits``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..batches import as_logits
from ..errors import ModelError
from .lowering import LoweredWeight, SiteLowering, export_form

log = logging.getLogger(__name__)

OPSET = 21
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
#: onnxruntime ops that compute in integers (what "the integer kernels ran" means in a report)
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger",
               "DynamicQuantizeMatMul", "QAttention", "MatMulNBits")
#: weight containers: uint8 (exact everywhere) or int8 (faster with VNNI / AMX / on ARM, wrong on AVX2-only x86);
#: ``auto`` (the default): int8 where this CPU runs it exactly, uint8 elsewhere (:func:`resolve_weight_dtype`)
WEIGHT_DTYPES = ("auto", "uint8", "int8")
DEFAULT_WEIGHT_DTYPE = "auto"
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "avxvnni")
_INSTALL = "install the deployment extra: pip install 'vitq[deploy]' (onnx, onnxruntime)"


def require(module: str) -> Any:
    """Import ``onnx`` / ``onnxruntime`` / ``onnxscript``, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(f"exporting to ONNX needs the {module} package: {_INSTALL}") from None


def cpu_flags() -> Optional[set[str]]:
    """This x86 CPU's ISA flags (``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("flags"):
                    return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def u8s8_exact(machine: Optional[str] = None, flags: Optional[set[str]] = None) -> tuple[Optional[bool], str]:
    """Whether onnxruntime's u8 x s8 integer GEMM is exact on this CPU (int8 weights), and why:
    True on ARM and on x86 with a VNNI / AMX dot product, False on x86 without (AVX2's
    ``vpmaddubsw`` saturates pairs of products at 16 bits), None when the CPU cannot be told."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return True, f"{machine}: onnxruntime's ARM kernels widen before they add"
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None, f"{machine}: not known"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None, "x86 CPU whose ISA flags cannot be read"
    vnni = sorted(f for f in _VNNI if f in flags)
    if vnni:
        return True, f"x86 with {', '.join(vnni)}"
    return False, ("x86 without VNNI (" + ("AVX2" if "avx2" in flags else "no AVX2") +
                   "): onnxruntime's u8 x s8 kernel saturates sums of two products at 16 bits")


def check_weight_dtype(weight_dtype: str) -> str:
    if weight_dtype not in WEIGHT_DTYPES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown weight container {weight_dtype!r}: use auto (int8 where this CPU runs it exactly, "
                          "uint8 elsewhere), uint8 (exact on every CPU) or int8 (faster on CPUs with VNNI / AMX and on "
                          "ARM, wrong on AVX2-only x86)")
    return weight_dtype


#: the widest weight codes an int8 container holds within [-64, 63]: AVX2's ``vpmaddubsw`` adds two u8 x s8 products
#: in 16 bits, 2 x 255 x 64 = 32640 < 32767, so such a file is exact on every CPU (onnxruntime's ``reduce_range``)
SAFE_INT8_WEIGHT_BITS = 7


def resolve_weight_dtype(weight_dtype: str = DEFAULT_WEIGHT_DTYPE,
                         weight_bits: Optional[int] = None) -> tuple[str, str]:
    """The container a file gets, and why. ``auto``: int8 - onnxruntime's u8 x s8 kernels, the faster ones on CPUs
    with a dot product (bench/results/deploy.md) and as fast as u8 x u8 on AVX2-only ones (deploy_avx2.md) - where it
    is exact: on every CPU when the widest weight codes (``weight_bits``) are at most 7 bits (W4A8: codes in [-8, 7]),
    and at 8-bit weights where :func:`u8s8_exact` says this CPU computes them exactly (VNNI, AMX, ARM); uint8 (u8 x u8,
    exact everywhere) otherwise. An 8-bit-weight int8 file is made for CPUs like the one exporting it."""
    check_weight_dtype(weight_dtype)
    if weight_dtype != "auto":
        return weight_dtype, "asked for"
    if weight_bits is not None and weight_bits <= SAFE_INT8_WEIGHT_BITS:
        return "int8", (f"auto: {weight_bits}-bit weight codes fit [-64, 63], where int8 containers are exact on every "
                        "CPU and run on the faster u8 x s8 kernels")
    exact, why = u8s8_exact()
    if exact:
        return "int8", f"auto: {why}, where 8-bit int8 weights run exactly on the faster u8 x s8 kernels"
    return "uint8", f"auto: {why}; uint8 weights are exact on every CPU"


class LogitsOnly(nn.Module):
    """The model with its output reduced to one tensor, the graph's only output: the logits (a Hugging Face model
    returns an output object), or an encoder's embedding (:func:`vitq.batches.as_embedding`: the pooled output,
    what vitq evaluates it by)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return as_logits(self.model(pixel_values))


def to_onnx(model: nn.Module, path: "str | Path", example: Tensor, lowering: list[SiteLowering],
            weight_dtype: str = DEFAULT_WEIGHT_DTYPE, centered: bool = False) -> dict[str, Any]:
    """Export ``model`` (calibrated, eval mode) to ``path`` with its weight codes in ``weight_dtype``
    containers; returns what was written (weights as codes, sizes). ``centered`` (int8 only): weights of at most 7
    bits are stored as ``code - zero_point`` with a zero point of 0 (:func:`centered_codes`)."""
    weight_dtype = resolve_weight_dtype(weight_dtype)[0]
    onnx = require("onnx")
    require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    wrapped = LogitsOnly(model).eval()
    batch = torch.export.Dim("batch", min=1)
    with export_form(model, lowering) as weights, torch.no_grad():
        values = [(lw, lw.values.detach().cpu().numpy()) for lw in weights]
        try:
            prog = torch.onnx.export(wrapped, (example,), dynamo=True, opset_version=OPSET,
                                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     dynamic_shapes={"pixel_values": {0: batch}}, verbose=False)
        except Exception as e:  # the exporter raises many types; one line with its last message
            msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise ModelError(f"torch.onnx.export failed ({(msg[-1] if msg else type(e).__name__)[:200]}): "
                             "this model or quantizer is not exportable yet") from None
        # saved inside the export form: the program reads parameters (the grid values) when it saves
        assert prog is not None  # dynamo=True returns the program
        prog.save(str(path))
    proto = onnx.load(str(path))
    stats = _weights_to_codes(proto, values, weight_dtype, nibbles=not centered, centered=centered)
    for n in proto.graph.node:
        del n.metadata_props[:]
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    stats["bytes"] = path.stat().st_size
    return stats


def container_codes(codes: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int,
                    weight_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes in ``[qmin, qmax]`` and their zero points moved into a ``weight_dtype`` container by
    one integer shift (so ``(code - zp)`` and every dequantized value are unchanged)."""
    if weight_dtype == "uint8":
        shift = 0 if qmin >= 0 else -128
        dt: Any = np.uint8
    else:
        shift = (qmax + 1) // 2 if qmin >= 0 else 0
        dt = np.int8
    c, z = codes.astype(np.int64) - shift, zero_point.astype(np.int64) - shift
    info = np.iinfo(dt)
    if c.size and (c.min() < info.min or c.max() > info.max) or z.size and (z.min() < info.min or z.max() > info.max):
        raise ModelError(f"weight codes in [{qmin}, {qmax}] do not fit a {weight_dtype} container: report this recipe")
    return c.astype(dt), z.astype(dt)


def nibble_codes(codes: np.ndarray, zero_point: np.ndarray, weight_dtype: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Container codes (and zero points) moved, by one integer shift where needed, into the 4-bit range of the
    container's signedness ([-8, 7] for int8, [0, 15] for uint8), so they can be stored as INT4 / UINT4; None
    when they span more than 16 values. ``(code - zp)`` is unchanged; a shift is only made when the codes do not
    fit as they are (so symmetric int8 weights keep their zero point 0, which OpenVINO's int8 kernels need)."""
    lo, hi = (-8, 7) if weight_dtype == "int8" else (0, 15)
    if not codes.size:
        return None
    c, z = codes.astype(np.int64), zero_point.astype(np.int64)
    if c.min() < lo or c.max() > hi:
        c, z = c - (c.min() - lo), z - (c.min() - lo)
    info = np.iinfo(np.int8 if weight_dtype == "int8" else np.uint8)
    if c.max() > hi or z.size and (z.min() < info.min or z.max() > info.max):
        return None
    return c, z


def centered_codes(codes: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> Optional[np.ndarray]:
    """``code - zero_point`` as int8 with a zero point of 0 - the same dequantized weights, symmetric in form - when
    it fits int8 (codes of at most 7 bits: a 4-bit asymmetric code minus its zero point lies in [-15, 15]); None
    otherwise. OpenVINO runs a MatMul on its INT8 kernels only for weights without a zero point: asymmetric 4-bit
    weights, stored as 4-bit codes and zero points, run in bf16 / f32 there (bench/results/openvino_fq.md)."""
    if qmax - qmin > 127:
        return None
    d = codes.astype(np.int64) - zero_point.astype(np.int64)
    if d.size and (d.min() < -128 or d.max() > 127):
        return None
    return d.astype(np.int8)


def _weights_to_codes(proto: Any, weights: list[tuple[LoweredWeight, np.ndarray]],
                      weight_dtype: str = DEFAULT_WEIGHT_DTYPE, nibbles: bool = True,
                      centered: bool = False) -> dict[str, Any]:
    """Replace every weight constant of ``proto`` by its codes and a DequantizeLinear (in place). ``nibbles``:
    codes that span at most 16 values (weights of 4 bits or fewer) are stored as INT4 / UINT4 and widened by a
    ``Cast`` to the 8-bit container, which onnxruntime and OpenVINO fold at load time: the file holds 4 bits per
    weight and runs the 8-bit file's integer kernels (bench/results/int4_weights.md)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    table: dict[bytes, tuple[LoweredWeight, bool]] = {}
    for lw, v in weights:
        table.setdefault(np.ascontiguousarray(v).tobytes(), (lw, False))
        if v.ndim == 2:
            table.setdefault(np.ascontiguousarray(v.T).tobytes(), (lw, True))
    inits = {i.name: i for i in proto.graph.initializer}
    new_nodes: list[Any] = []
    replaced: set[str] = set()
    done: dict[str, str] = {}
    nibble_count = n_centered = 0
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in done:
                node.input[k] = done[name]
                continue
            arr = numpy_helper.to_array(inits[name])
            if arr.dtype != np.float32:
                continue
            hit = table.get(arr.tobytes())
            if hit is None:
                continue
            lw, transposed = hit
            codes = lw.codes.cpu().numpy().astype(np.int64)
            zp = np.round(lw.zero_point.cpu().numpy()).astype(np.int64)
            if transposed:
                codes = codes.T
            cen = centered_codes(codes, zp.reshape((1, -1) if transposed else (-1,) + (1,) * (codes.ndim - 1))
                                 if lw.per_channel else zp.reshape(-1)[:1], lw.qmin, lw.qmax) if centered else None
            if cen is not None:
                codes, zp = cen, np.zeros_like(zp, dtype=np.int8)
                n_centered += 1
            else:
                codes, zp = container_codes(codes, zp, lw.qmin, lw.qmax, weight_dtype)
            q = f"{name}_quantized"
            nib = nibble_codes(codes, zp, weight_dtype) if nibbles and lw.qmax - lw.qmin < 16 else None
            codes_name = q
            if nib is not None:
                codes4, zp4 = nib
                zp = zp4.astype(codes.dtype)
                codes_name = f"{q}_4bit"
                four = ml_dtypes.int4 if weight_dtype == "int8" else ml_dtypes.uint4
                proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes4.astype(four)), codes_name))
                new_nodes.append(helper.make_node("Cast", [codes_name], [q], name=f"{q}_widen",
                                                  to=TensorProto.INT8 if weight_dtype == "int8" else TensorProto.UINT8))
                nibble_count += 1
            else:
                proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes), q))
            proto.graph.initializer.extend([
                numpy_helper.from_array(lw.scale.cpu().numpy().astype(np.float32) if lw.per_channel
                                        else np.array(float(lw.scale.reshape(-1)[0]), np.float32), f"{q}_scale"),
                numpy_helper.from_array(zp if lw.per_channel else zp.reshape(-1)[:1].reshape(()), f"{q}_zero_point"),
            ])
            kw: dict[str, Any] = {"axis": (1 if transposed else 0)} if lw.per_channel else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [q, f"{q}_scale", f"{q}_zero_point"], [f"{q}_dq"],
                                              name=f"{q}_dq", **kw))
            node.input[k] = done[name] = f"{q}_dq"
            replaced.add(lw.site)
    for n in reversed(new_nodes):
        proto.graph.node.insert(0, n)
    used = {i for n in proto.graph.node for i in n.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    missing = [lw.site for lw, _ in weights if lw.site not in replaced]
    if missing:
        raise ModelError(f"{len(missing)} quantized weight(s) were not found in the exported graph ({missing[0]}, ...): "
                         "the exporter folded them into other constants; report this model")
    return {"weights_as_codes": len(replaced), "weight_dtype": weight_dtype, "weights_in_4_bits": nibble_count,
            **({"weights_centered": n_centered} if centered else {})}


#: onnxruntime session settings an exported file needs to compute what the simulated model computes. Its
#: graph optimizer fuses a DequantizeLinear of integer weights that meets a *float* activation (a site emulated
#: in float: V-2SF / two-scale, PTF, per-channel; every sub-8-bit site until 2026-12-06) with the MatMul into
#: ``MatMulNBits`` with accuracy level 4 by default, which quantizes that activation again, to int8 per block
#: of 32 values at run time: fmnist-vit minmax W4A4 lost 0.35 points of top-1 to it (onnxruntime 1.32). Level 1 computes in float.
#: ``export.json`` records these for users who open the file in their own session.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def session(path: "str | Path", threads: Optional[int] = None, optimized_path: Optional[str] = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads; None: onnxruntime's), with
    :data:`SESSION_CONFIG`."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    if threads:
        so.intra_op_num_threads = int(threads)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def runtime_ops(path: "str | Path", tmp_dir: "str | Path") -> dict[str, int]:
    """The ops onnxruntime runs after its graph optimizations (integer kernels fused or not)."""
    onnx = require("onnx")
    opt = Path(tmp_dir) / "optimized.onnx"
    session(path, optimized_path=str(opt))
    ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    opt.unlink(missing_ok=True)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def check_digest(path: Path) -> None:
    """A file vitq exported is sealed: ``export.json`` beside it records its sha256; a file that differs (changed or
    damaged) is refused in one line before onnxruntime reads it. A file without that record is run as it is."""
    import json

    from ..errors import ModelError
    from .integrity import file_sha256

    rep = path.parent / "export.json"
    if not rep.is_file():
        return
    try:
        rec = json.loads(rep.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{rep} is not readable JSON (truncated or damaged): export the model again") from None
    want = rec.get("sha256") if isinstance(rec, dict) and rec.get("file") == path.name else None
    if want is not None and file_sha256(path) != want:
        raise ModelError(f"{path} does not match the sha256 recorded in {rep.name} (changed or damaged): export the "
                         "model again")
    # files the main one reads (the OpenVINO form's weights, model.bin): sealed alike
    for name, sha in (rec.get("companions") or {}).items() if want is not None else ():
        other = path.parent / name
        if not other.is_file() or file_sha256(other) != sha:
            raise ModelError(f"{other} is " + ("missing" if not other.is_file() else "changed or damaged") +
                             f" (its sha256 is recorded in {rep.name}): export the model again")


class OnnxModel:
    """An exported file run by onnxruntime, callable like a model on image batches (for evaluation)."""

    def __init__(self, path: "str | Path", threads: Optional[int] = None) -> None:
        check_digest(Path(path))
        self.sess = session(path, threads)
        self.input = self.sess.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.sess.run(None, {self.input: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self) -> "OnnxModel":
        return self


__all__ = ["DEFAULT_WEIGHT_DTYPE", "INPUT_NAME", "INTEGER_OPS", "OPSET", "OUTPUT_NAME", "WEIGHT_DTYPES", "LogitsOnly",
           "OnnxModel", "SESSION_CONFIG", "check_digest", "check_weight_dtype", "resolve_weight_dtype", "SAFE_INT8_WEIGHT_BITS", "centered_codes", "container_codes", "cpu_flags", "runtime_ops", "session", "to_onnx",
           "u8s8_exact"]
