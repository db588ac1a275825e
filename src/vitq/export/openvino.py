"""OpenVINO as a second runtime for vitq's ONNX files (``vitq export --verify --runtime openvino``).

OpenVINO's ONNX frontend reads the QDQ graph as it is: QuantizeLinear / DequantizeLinear pairs become FakeQuantize
nodes, which its low-precision transformations turn into INT8 kernels where the pattern allows (symmetric weights:
docs/deploy.md). :class:`OpenVinoModel` is the file compiled for the CPU, callable on image batches like
:class:`~vitq.export.onnx.OnnxModel`; the file's digest is checked first, as for onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import ModelError
from .onnx import check_digest

#: runtimes a vitq ONNX file is verified / timed in
RUNTIMES = ("onnxruntime", "openvino")
_INSTALL = "install the OpenVINO extra: pip install 'vitq[openvino]' (or pip install openvino)"


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ModelError(f"--runtime openvino needs the openvino package: {_INSTALL}") from None
    return openvino


class OpenVinoModel:
    """An exported ONNX file compiled by OpenVINO for the CPU, callable like a model on image batches."""

    def __init__(self, path: "str | Path", threads: Optional[int] = None) -> None:
        ov = require_openvino()
        check_digest(Path(path))
        core = ov.Core()
        config = {} if threads is None else {"INFERENCE_NUM_THREADS": int(threads)}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, x: Tensor) -> Tensor:
        out = self.compiled(x.detach().cpu().float().numpy())[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def eval(self) -> "OpenVinoModel":
        return self


__all__ = ["RUNTIMES", "OpenVinoModel", "require_openvino"]
