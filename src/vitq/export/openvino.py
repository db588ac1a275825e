"""OpenVINO: the second runtime for vitq's ONNX files, and an export form of its own (``--format openvino``).

Two ways a vitq model reaches OpenVINO:

* **the ONNX file** (``--format onnx``, verified with ``--runtime openvino``): OpenVINO's ONNX frontend turns each
  activation ``QuantizeLinear -> DequantizeLinear`` pair into a FakeQuantize with an *integer* output followed by
  Convert / Subtract / Multiply. Its low-precision transformations fuse that pattern into the next MatMul only in
  some places; elsewhere it runs as a stand-alone FakeQuantize plus reorders (bench/results/openvino_profile.md).
* **the OpenVINO form** (``--format openvino``: ``model.xml`` + ``model.bin``, OpenVINO's IR): the same ONNX graph
  with its activation pairs rewritten into FakeQuantize nodes with a *float* output over the pair's grid - the form
  NNCF writes - placed where OpenVINO fuses them (:func:`vitq.export.ov_graph.openvino_form`), converted by
  ``openvino.convert_model`` and saved without fp16 compression. The weights keep their integer codes and ``DequantizeLinear`` (OpenVINO's compressed
  weights). Same grid, same weights: the rewrite changes how the runtime reads the graph, not what it computes
  (only an exact tie may round the other way), and the parity check runs the file in OpenVINO.

:class:`OpenVinoModel` is either file compiled for the CPU, callable on image batches like
:class:`~vitq.export.onnx.OnnxModel`; the digests in ``export.json`` are checked first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import ModelError
from .onnx import check_digest

#: runtimes a vitq ONNX file is verified / timed in
RUNTIMES = ("onnxruntime", "openvino")
#: the OpenVINO form's files: the IR's topology (the file export.json names) and its weights
IR_FILE, IR_WEIGHTS = "model.xml", "model.bin"
_INSTALL = "install the OpenVINO extra: pip install 'vitq[openvino]' (or pip install openvino)"


def require_openvino(what: str = "--runtime openvino") -> Any:
    try:
        import openvino
    except ImportError:
        raise ModelError(f"{what} needs the openvino package: {_INSTALL}") from None
    return openvino


def to_openvino(model: Any, out: Path, example: Tensor, lowering: list[Any], weight_dtype: str) -> dict[str, Any]:
    """The OpenVINO form of ``model`` in ``out`` (:data:`IR_FILE` + :data:`IR_WEIGHTS`): the ONNX export
    (:func:`~vitq.export.onnx.to_onnx`, weight codes in ``weight_dtype`` containers; int8: weights of up to 7 bits
    stored as ``code - zero_point``, the form OpenVINO's INT8 MatMul takes), its activation pairs as FakeQuantize
    nodes where OpenVINO fuses them, converted and saved by OpenVINO (weights as they are: no fp16 compression)."""
    ov = require_openvino("--format openvino")
    import onnx

    from .onnx import to_onnx
    from .ov_graph import openvino_form

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        stats = to_onnx(model, src, example, lowering, weight_dtype, centered=weight_dtype == "int8")
        proto = onnx.load(str(src))
        stats.update(openvino_form(proto))
        stats["onnx_bytes"] = stats.pop("bytes")
        onnx.save(proto, str(src))
        try:
            ir = ov.convert_model(str(src))
        except Exception as e:  # OpenVINO's frontend raises its own types: one line with its first message
            msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise ModelError(f"OpenVINO could not read the exported graph ({(msg[0] if msg else type(e).__name__)[:200]}):"
                             " export --format onnx and run it with --runtime openvino, or report this model") from None
        ov.save_model(ir, str(out / IR_FILE), compress_to_fp16=False)
    stats["bytes"] = (out / IR_FILE).stat().st_size + (out / IR_WEIGHTS).stat().st_size
    stats["openvino"] = ov.__version__.split("-")[0]
    ops: dict[str, int] = {}
    for op in ir.get_ordered_ops():
        t = op.get_type_name()
        ops[t] = ops.get(t, 0) + 1
    stats["ir_ops"] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return stats


class OpenVinoModel:
    """An exported file (ONNX, or the OpenVINO form's ``model.xml``) compiled by OpenVINO for the CPU, callable like a
    model on image batches."""

    def __init__(self, path: "str | Path", threads: Optional[int] = None, precision: Optional[str] = None) -> None:
        ov = require_openvino()
        check_digest(Path(path))
        core = ov.Core()
        config: dict[str, Any] = {} if threads is None else {"INFERENCE_NUM_THREADS": int(threads)}
        if precision is not None:  # "f32": float operations in f32 even where OpenVINO's default is bf16
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        #: what OpenVINO computes float ops in here: "f32", or "bf16" on CPUs with AMX / AVX512-BF16
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def __call__(self, x: Tensor) -> Tensor:
        out = self.compiled(x.detach().cpu().float().numpy())[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def eval(self) -> "OpenVinoModel":
        return self


__all__ = ["IR_FILE", "IR_WEIGHTS", "RUNTIMES", "OpenVinoModel", "require_openvino", "to_openvino"]
