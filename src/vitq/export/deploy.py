"""Deployment exports: one backend registry, the per-site lowering report, and the parity check.

``export(model, out_dir, "onnx")`` writes ``model.onnx`` and ``export.json`` (what every site was
lowered to, the fallbacks, the ops onnxruntime runs after its optimizations, sizes).
``verify(model, out_dir, loader)`` evaluates the exported file in its runtime beside the simulated
model on the same images and refuses (one line, exit 2) when their top-1 differ by more than the
threshold.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..batches import batch_images, forward_logits
from ..devices import model_device
from ..errors import ConfigError, VitqError
from ..evaluate import compare_paired, evaluate
from ..state import state_of
from .lowering import EMULATE_MODES, check_exportable, check_lowerable, plan, summary

log = logging.getLogger(__name__)

REPORT_FILE = "export.json"
DEFAULT_MAX_TOP1_DIFF = 0.1
#: sites without an integer form: emulated exactly in float ops (``uniform8``: an 8-bit uniform post-Softmax)
DEFAULT_EMULATE = "exact"
#: an encoder's parity: the smallest image-by-image cosine of the file's embeddings against the simulated ones
DEFAULT_MIN_COSINE = 0.999
#: formats a runtime executes (a graph of integer kernels and QDQ / FakeQuantize sites), as opposed to vitq's packed
#: weights
RUNTIME_FORMATS = ("onnx", "openvino")


class ExportError(VitqError):
    """An export that does not keep the simulated accuracy, or cannot be written."""


@dataclass(frozen=True)
class Backend:
    name: str
    file: str
    write: Callable[..., dict[str, Any]]
    #: builds a callable model from the written file, for the parity check
    load: Callable[[Path], Any]
    description: str
    #: other files the written one reads (sealed in export.json beside it)
    companions: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {}


def register_backend(b: Backend) -> Backend:
    BACKENDS[b.name] = b
    return b


def _onnx_write(model: nn.Module, out: Path, example: Tensor, lowering: list[Any], source: Any,
                weight_dtype: Optional[str] = None) -> dict[str, Any]:
    from .onnx import (
        DEFAULT_WEIGHT_DTYPE,
        SAFE_INT8_WEIGHT_BITS,
        SESSION_CONFIG,
        resolve_weight_dtype,
        runtime_ops,
        to_onnx,
        u8s8_exact,
    )

    wbits = [lw.bits for lw in lowering if lw.how == "int-weight" and lw.bits is not None]
    wd, why = resolve_weight_dtype(weight_dtype or DEFAULT_WEIGHT_DTYPE, max(wbits) if wbits else None)
    stats = to_onnx(model, out / "model.onnx", example, lowering, wd)
    stats["weight_dtype_why"] = why
    stats["int8_exact_everywhere"] = wd == "int8" and bool(wbits) and max(wbits) <= SAFE_INT8_WEIGHT_BITS
    if wd == "int8" and not stats["int8_exact_everywhere"]:
        exact, why = u8s8_exact()
        stats["int8_exact_here"] = exact
        if exact is False:
            log.warning("int8 weights on this CPU (%s): onnxruntime's results here will differ from the simulated "
                        "model; export with --weight-dtype uint8 for CPUs like this one", why)
    with tempfile.TemporaryDirectory() as tmp:
        stats["runtime_ops"] = runtime_ops(out / "model.onnx", tmp)
    # what a user's own onnxruntime session must set to run the simulated model's arithmetic (SESSION_CONFIG)
    stats["session_config"] = dict(SESSION_CONFIG)
    return stats


def _onnx_load(out: Path) -> Any:
    from .onnx import OnnxModel

    return OnnxModel(out / "model.onnx")


def _openvino_write(model: nn.Module, out: Path, example: Tensor, lowering: list[Any], source: Any,
                    weight_dtype: Optional[str] = None) -> dict[str, Any]:
    from .onnx import check_weight_dtype
    from .openvino import to_openvino

    # OpenVINO runs a MatMul on its INT8 kernels when the weights are int8 codes with a zero point of 0 (symmetric:
    # vitq's default at 8 bits); uint8 containers hold the same codes shifted by 128, which it runs in float
    wd = check_weight_dtype(weight_dtype or "auto")
    wd, why = ("int8", "auto: OpenVINO's INT8 MatMul reads int8 weight codes") if wd == "auto" else (wd, "asked for")
    stats = to_openvino(model, out, example, lowering, wd)
    stats["weight_dtype_why"] = why
    return stats


def _openvino_load(out: Path) -> Any:
    from .openvino import OpenVinoModel

    return OpenVinoModel(out / "model.xml")


register_backend(Backend("onnx", "model.onnx", _onnx_write, _onnx_load,
                         "ONNX QDQ graph (opset 21) for onnxruntime: 8-bit weight codes (uint8, or int8 for VNNI / ARM "
                         "targets), QuantizeLinear / DequantizeLinear activations, integer kernels after onnxruntime's "
                         "fusions"))


def _packed_write(model: nn.Module, out: Path, example: Tensor, lowering: list[Any], src: Any,
                  weight_dtype: Optional[str] = None) -> dict[str, Any]:
    from .packed import save_packed

    if weight_dtype is not None:
        raise ConfigError("--weight-dtype chooses the ONNX file's weight containers: the packed format stores codes "
                          "at their own bit-width; drop it, or use --format onnx")
    if src is None:
        raise ConfigError("the packed format needs the model's source (how to rebuild its architecture): "
                          "export a vitq quantize --out folder, or pass a model from vitq.load_model")
    return save_packed(model, out, src)


def _packed_load(out: Path) -> Any:
    from . import load_quantized

    return load_quantized(out)


register_backend(Backend("openvino", "model.xml", _openvino_write, _openvino_load,
                         "OpenVINO IR (model.xml + model.bin): the ONNX graph's activation quantizers as FakeQuantize "
                         "nodes, int8 weight codes; OpenVINO's INT8 kernels", companions=("model.bin",)))

register_backend(Backend("vitq", "model.safetensors", _packed_write, _packed_load,
                         "packed safetensors: weight codes at their bit-width, loadable without the float weights"))


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown export format {name!r}: use one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def example_input(model: nn.Module, batch: int = 2) -> Tensor:
    """A random batch of the model's input shape (what the exporter traces with)."""
    from ..models import data_config

    return torch.randn(batch, *data_config(model).input_size)


def export_float(model: nn.Module, out_dir: "str | Path", example: Optional[Tensor] = None,
                 fmt: str = "onnx") -> dict[str, Any]:
    """The float model as an ONNX file (``fmt="openvino"``: OpenVINO IR) with the conventions of a quantized export
    (vitq's wrapped graph: the input ``pixel_values``, the same attention order, ``export.json`` with its sha256), so
    a user compares a quantized file with its float model like with like. ``model`` is not changed (a wrapped copy is
    exported)."""
    import copy

    from ..pipeline import quantize
    from ..recipes import load_recipe

    fp = quantize(copy.deepcopy(model).cpu(), load_recipe("fp"), "W8A8", calib_data=None)
    if fmt not in RUNTIME_FORMATS:
        raise ConfigError(f"a float model exports as {' or '.join(RUNTIME_FORMATS)}, not {fmt}")
    return export(fp, out_dir, fmt, example=example, _float=True)


def export(model: nn.Module, out_dir: "str | Path", fmt: str = "onnx", example: Optional[Tensor] = None,
           emulate: str = DEFAULT_EMULATE, source: Any = None, weight_dtype: Optional[str] = None,
           _float: bool = False) -> dict[str, Any]:
    """Write ``model`` (quantized by vitq) in format ``fmt`` to ``out_dir``; returns the report (also
    written to ``out_dir/export.json``). ``source``: the :class:`~vitq.adapters.ModelSource` of the
    float model (``vitq.load_model``'s second value), which the packed format needs when the model's
    state does not have it yet. ``weight_dtype`` (onnx only): the weight codes' container, ``uint8``
    (default: exact on every CPU) or ``int8`` (faster on CPUs with VNNI and on ARM; onnxruntime's
    AVX2 kernel saturates it)."""
    backend = get_backend(fmt)
    if weight_dtype is not None:
        from .onnx import check_weight_dtype

        check_weight_dtype(weight_dtype)
    if emulate not in EMULATE_MODES:
        raise ConfigError(f"unknown lowering {emulate!r} for inexpressible sites: use one of {', '.join(EMULATE_MODES)}")
    check_exportable(model, float_ok=_float)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export destination {out} is a file: pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    if model_device(model).type != "cpu":  # the files are device-neutral: trace a CPU copy
        model = copy.deepcopy(model).cpu()
    lowering = plan(model, emulate)
    if fmt in RUNTIME_FORMATS and not _float:
        check_lowerable(lowering, fmt)
    t0 = time.perf_counter()
    st = state_of(model)
    src = source if source is not None else (None if st is None else st.source)
    stats = backend.write(model, out, example if example is not None else example_input(model), lowering, src,
                          weight_dtype=weight_dtype)
    from .integrity import file_sha256

    report = {"format": fmt, "file": backend.file, "sha256": file_sha256(out / backend.file),
              **({"companions": {c: file_sha256(out / c) for c in backend.companions}} if backend.companions else {}),
              "emulate": emulate, "seconds": round(time.perf_counter() - t0, 2),
              "recipe": None if st is None or st.recipe is None else st.recipe.name,
              "bits": None if st is None or st.bits is None else str(st.bits),
              **stats, "lowering": summary(lowering), "sites": [s.to_dict() for s in lowering]}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _logits(model: Any, loader: Any, limit: int) -> Tensor:
    out, n = [], 0
    with torch.no_grad():
        for b in loader:
            x = batch_images(b)[: limit - n]
            out.append(forward_logits(model, x.to(model_device(model))).float().cpu())
            n += x.shape[0]
            if n >= limit:
                break
    return torch.cat(out)


def _write_verify(out: Path, res: dict[str, Any], key: str = "verify") -> None:
    rep_file = out / REPORT_FILE
    if rep_file.is_file():
        rep = json.loads(rep_file.read_text())
        rep[key] = res
        rep_file.write_text(json.dumps(rep, indent=2) + "\n")


def _embedding_agreement(s: Tensor, e: Tensor) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(s.double(), e.double(), dim=1)
    return {"embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "max_abs_diff": float((s - e).abs().max())}


def verify_embeddings(model: nn.Module, runtime: Any, out: Path, loader: Any, fmt: str,
                      min_cosine: float = DEFAULT_MIN_COSINE, default: Any = None) -> dict[str, Any]:
    """An encoder's parity check: the exported file's embeddings against the simulated model's, image by image
    (cosine: mean and smallest; max |difference|). Raises :class:`ExportError` when an image's cosine is below
    ``min_cosine``. ``default``: the same file in its runtime's default precision where that is not f32 (OpenVINO's
    bf16), measured beside the check (``default_precision``), not checked."""
    from ..batches import as_embedding

    sims, exps, defs = [], [], []
    with torch.no_grad():
        for b in loader:
            x = batch_images(b)
            sims.append(as_embedding(model(x.to(model_device(model)))).float().cpu())
            exps.append(as_embedding(runtime(x)).float().cpu())
            if default is not None:
                defs.append(as_embedding(default(x)).float().cpu())
    s, e = torch.cat(sims), torch.cat(exps)
    res: dict[str, Any] = {"format": fmt, "task": "features", "images": int(s.shape[0]), **_embedding_agreement(s, e),
                           "min_cosine": min_cosine}
    if default is not None:
        d = _embedding_agreement(s, torch.cat(defs))
        res["default_precision"] = {"precision": default.precision, **d,
                                    "within_limit": d["embedding_cosine_min"] >= min_cosine}
    _write_verify(out, res)
    worst = res["embedding_cosine_min"]
    res["ok"] = worst >= min_cosine
    if not res["ok"]:
        raise ExportError(f"the {fmt} export's embeddings differ from the simulated ones: cosine down to "
                          f"{worst:.5f} (limit {min_cosine}): {_int8_hint(out)}see the fallback sites in export.json")
    return res


def load_runtime(out: Path, fmt: str, runtime: Optional[str] = None, precision: Optional[str] = None) -> Any:
    """The written file as a callable model in ``runtime`` (None: the format's own: onnxruntime for onnx, PyTorch for
    the packed format; ``openvino``: an ONNX file compiled by OpenVINO). ``precision``: OpenVINO's inference
    precision (``f32``; None: its default, bf16 on CPUs with AMX / AVX512-BF16)."""
    backend = get_backend(fmt)
    if fmt == "openvino":
        if runtime not in (None, "openvino"):
            raise ConfigError(f"the OpenVINO form runs in OpenVINO, not {runtime}: drop --runtime, or export "
                              "--format onnx for onnxruntime")
        if precision is not None:
            from .openvino import OpenVinoModel

            return OpenVinoModel(out / backend.file, precision=precision)
        return backend.load(out)
    if runtime in (None, "onnxruntime") or fmt != "onnx":
        if runtime not in (None, "onnxruntime"):
            raise ConfigError(f"--runtime {runtime} runs ONNX files: use it with --format onnx")
        return backend.load(out)
    from .openvino import RUNTIMES, OpenVinoModel

    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return OpenVinoModel(out / backend.file, precision=precision)


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a quantized model with every quantization slot emptied: its float function (reparameterized folds
    are exact), in the same graph form, to export as the float baseline of a quantized file."""
    from ..passes.quantize import iter_slots

    fp = copy.deepcopy(model).cpu()
    for _, mod, slot, _, _ in list(iter_slots(fp)):
        setattr(mod, slot, None)
    return fp


#: the runtime that executes each runtime format when --runtime is not given
_RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}


def time_against_float(model: nn.Module, out: Path, runtime: Optional[str] = None, batch: int = 1,
                       seconds: float = 3.0, fmt: str = "onnx") -> dict[str, Any]:
    """The exported file (format ``fmt``)'s images / s against the float ONNX of the same model (:func:`float_copy`,
    exported with the same conventions to a temporary folder), both in ``runtime`` (the format's own when None) on
    this host, timed in alternating rounds (so a busy neighbour slows both alike): medians of ``seconds`` each at
    ``batch``."""
    import numpy as np

    from ..models import data_config

    x = torch.randn(batch, *data_config(model).input_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        export(float_copy(model), tmp, "onnx", _float=True)
        runtime = runtime or _RUNTIME_OF.get(fmt, "onnxruntime")
        q, f = load_runtime(out, fmt, runtime if fmt == "onnx" else None), load_runtime(Path(tmp), "onnx", runtime)
        times: dict[str, list[float]] = {"q": [], "f": []}
        for m in (q, f):
            m(x)  # warm-up
        t_end = time.perf_counter() + 2 * seconds
        while time.perf_counter() < t_end or min(len(v) for v in times.values()) < 5:
            for k, m in (("q", q), ("f", f)):
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    ips = {k: batch / float(np.median(v)) for k, v in times.items()}
    res = {"runtime": runtime, "batch": batch, "quantized_ips": round(ips["q"], 2),
           "float_ips": round(ips["f"], 2), "speedup": round(ips["q"] / ips["f"], 3),
           "threads": torch.get_num_threads(),
           # OpenVINO computes a float model in bf16 on CPUs with AMX / AVX512-BF16: the float baseline is a bf16 one
           **({"float_precision": f.precision} if getattr(f, "precision", None) else {})}
    _write_verify(out, res, key="speed")
    return res


def verify(model: nn.Module, out_dir: "str | Path", loader: Any, fmt: str = "onnx",
           max_top1_diff: float = DEFAULT_MAX_TOP1_DIFF, logit_images: int = 1024,
           progress: bool = False, embeddings: bool = False, runtime: Optional[str] = None) -> dict[str, Any]:
    """The parity check: the exported file in its runtime against the simulated model on ``loader``'s
    images: both top-1s, the paired test, prediction agreement, max / mean |logit difference| (on the
    first ``logit_images``). Raises :class:`ExportError` when |Δ top-1| > ``max_top1_diff`` points.
    ``embeddings``: the model is an encoder, checked by :func:`verify_embeddings` instead. ``runtime``: which
    runtime runs an ONNX file (``onnxruntime``, the default, or ``openvino``)."""
    if not max_top1_diff >= 0:
        raise ConfigError(f"--max-top1-diff {max_top1_diff} must be >= 0 (points of top-1)")
    out = Path(out_dir)
    rt_model = load_runtime(out, fmt, runtime)
    fmt_label = fmt if runtime in (None, "onnxruntime") or fmt == runtime else f"{fmt} in {runtime}"
    default = None
    if getattr(rt_model, "precision", "f32") != "f32":
        # OpenVINO computes float operations in bf16 (AMX / AVX512-BF16) or f16 (ARM) by default: the check is of the
        # file, in f32; the runtime's default is measured beside it (default_precision), for the user to read
        default, rt_model = rt_model, load_runtime(out, fmt, runtime, precision="f32")
    if embeddings:
        return verify_embeddings(model, rt_model, out, loader, fmt_label, default=default)
    sim = evaluate(model, loader, progress=progress, desc="eval simulated")
    exp = evaluate(rt_model, loader, progress=progress, desc=f"eval {fmt_label}")
    cmp = compare_paired(sim["predictions"], exp["predictions"])
    ls, le = _logits(model, loader, logit_images), _logits(rt_model, loader, logit_images)
    d = (ls - le).abs()
    res = {"format": fmt_label, "runtime": runtime or _RUNTIME_OF.get(fmt, "torch"), "images": sim["n"], "simulated_top1": round(sim["top1"], 2), "exported_top1": round(exp["top1"], 2),
           "top1_diff": round(exp["top1"] - sim["top1"], 2), "agreement": round(cmp.agree, 2),
           "p_value": cmp.p_value, "max_logit_diff": float(d.max()), "mean_logit_diff": float(d.mean()),
           "logit_images": int(ls.shape[0]), "max_top1_diff": max_top1_diff,
           "simulated_seconds": round(sim["seconds"], 2), "exported_seconds": round(exp["seconds"], 2)}
    if default is not None:
        dflt = evaluate(default, loader, progress=progress, desc=f"eval {fmt_label} ({default.precision})")
        diff = round(dflt["top1"] - sim["top1"], 2)
        res["default_precision"] = {"precision": default.precision, "exported_top1": round(dflt["top1"], 2),
                                    "top1_diff": diff, "within_limit": abs(diff) <= max_top1_diff,
                                    "agreement": round(compare_paired(sim["predictions"], dflt["predictions"]).agree, 2)}
    _write_verify(out, res)
    res["ok"] = abs(res["top1_diff"]) <= max_top1_diff
    if not res["ok"]:
        raise ExportError(parity_failure(res, fmt_label, max_top1_diff, _int8_hint(out)))
    return res


def parity_failure(res: dict[str, Any], fmt_label: str, limit: float, hint: str = "") -> str:
    """The one line of a failed parity check. When the difference is one or two images and one image weighs more
    than the limit on this many images, it says so: the check cannot resolve the limit there (one flipped image of
    500 is 0.2 points against the default 0.1)."""
    n = res["images"]
    flips = round(abs(res["top1_diff"]) * n / 100)
    small = (f"{flips} of {n} images, and one image is {100 / n:.2f} points on {n}: verify on at least "
             f"{math.ceil(100 / limit)} images (--eval-size), " if limit > 0 and flips <= 2 and 100 / n > limit else "")
    return (f"the {fmt_label} export's top-1 {res['exported_top1']:.2f}% differs from the simulated "
            f"{res['simulated_top1']:.2f}% by {res['top1_diff']:+.2f} points (limit {limit}): {small}{hint}see the "
            "fallback sites in export.json, or raise the limit with --max-top1-diff")


def _int8_hint(out: Path) -> str:
    """The likely cause when an int8-weight file fails its parity check on a CPU without VNNI."""
    try:
        rep = json.loads((out / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return ""
    if rep.get("weight_dtype") != "int8" or rep.get("int8_exact_everywhere"):
        return ""
    from .onnx import u8s8_exact

    exact, why = u8s8_exact()
    return "" if exact is not False else f"its int8 weights are not exact on this CPU ({why}): re-export with --weight-dtype uint8; "


__all__ = ["BACKENDS", "Backend", "RUNTIME_FORMATS", "DEFAULT_EMULATE", "DEFAULT_MAX_TOP1_DIFF", "DEFAULT_MIN_COSINE", "ExportError", "verify_embeddings", "export", "export_float", "float_copy", "get_backend", "load_runtime", "register_backend",
           "time_against_float", "verify"]
