"""Save and load quantized models: ``model.safetensors`` + ``vitq.json``.

The JSON records how to rebuild the float architecture (model source), the full recipe and
bits, so loading = rebuild -> prepare (same structure, empty quantizers) -> load every tensor,
including each FakeQuant's parameters. What you calibrated is exactly what you load.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .._callable import make_callable
from ..bits import Bits
from ..checkpoints import load_into, load_state_file
from ..errors import ModelError
from ..evaluate import batches_of
from ..models import ModelSource, rebuild, source_from_model
from ..pipeline import prepare
from ..recipes import Recipe
from ..state import ensure_state, state_of
from .deploy import DEFAULT_MAX_TOP1_DIFF, verify
from .deploy import export as deploy_export
from .integrity import begin_write, check, finish_write, read_meta
from .packed import PACKED_FORMAT, load_packed

EXPORT_FORMAT = "vitq.quantized/1"
#: a model loaded with --trust-pickle: the export keeps a copy of the pickle (its architecture) under this name
PICKLE_FILE = "float_model.pt"
PICKLE_IN_EXPORT = "in-export"


def _in_export(source: ModelSource, folder: Path) -> ModelSource:
    """A pickle source kept inside the export, as the path of that copy."""
    if source.kind == "pickle" and source.checkpoint == PICKLE_IN_EXPORT:
        return replace(source, name=str(folder / source.name), checkpoint=None)
    return source


def source_of(model: nn.Module, source: Optional[ModelSource] = None) -> ModelSource:
    """Where ``model``'s float architecture comes from, for an export to rebuild it: ``source`` when given,
    else what :func:`vitq.load_model` recorded, else what the model's library can tell from the model itself
    (a Hugging Face model carries its config; a timm model its architecture name, checked by rebuilding it).
    A model nothing can rebuild is a one-line ModelError naming the fix."""
    if source is not None:
        if not isinstance(source, ModelSource):
            raise ModelError(f"source must be the ModelSource vitq.load_model returned, got {type(source).__name__}")
        return source
    st = state_of(model)
    if st is not None and st.source is not None:
        return st.source
    found = source_from_model(model)
    if found is None:
        raise ModelError(f"vitq cannot tell how to rebuild this {type(model).__name__} when the export is loaded: load "
                         "the float model with vitq.load_model (which records its source), or pass "
                         "source=vitq.models.ModelSource(...)")
    return found


def save_quantized(model: nn.Module, out_dir: "str | Path", source: Optional[ModelSource] = None,
                   extra: Optional[dict[str, Any]] = None) -> Path:
    """Save a quantized model: ``model.safetensors`` + ``vitq.json`` (source, recipe, bits, the run record).
    ``source`` (where the float architecture comes from) defaults to what :func:`source_of` finds."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"save_quantized takes the quantized nn.Module, got {type(model).__name__}")
    st = state_of(model)
    recipe: Any = None if st is None else st.recipe  # a Recipe (RecipeLike in the state, which sits below recipes)
    bits: Optional[Bits] = None if st is None else st.bits
    if recipe is None or bits is None:
        raise ModelError("only a model quantized by vitq (vitq.quantize / run_recipe) can be saved with save_quantized: "
                         "quantize it first")
    source = source_of(model, source)
    from safetensors.torch import save_file

    if source.kind == "pickle" and not Path(source.name).is_file():
        raise ModelError(f"the pickled model {source.name} this model was loaded from is gone, so the export could "
                         "not rebuild its architecture: save from the run that loaded it")
    stage = begin_write(out_dir)  # the files are staged, then moved into out_dir (vitq.json last)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(stage / "model.safetensors"))
    files = ["model.safetensors"]
    if source.kind == "pickle":  # the export holds its own copy of the architecture: no path to the user's file
        shutil.copyfile(source.name, stage / PICKLE_FILE)
        source = replace(source, name=PICKLE_FILE, checkpoint=PICKLE_IN_EXPORT)
        files.append(PICKLE_FILE)
    meta = {"format": EXPORT_FORMAT, "source": source.to_dict(), "recipe": recipe.to_dict(), "bits": str(bits),
            "pretrained_cfg": _jsonable(getattr(model, "pretrained_cfg", {}) or {}),
            **({"run": st.run} if st is not None and st.run else {}), **(extra or {})}
    return finish_write(stage, meta, files)


def load_quantized(path: "str | Path", trust_pickle: bool = False) -> nn.Module:
    p = Path(path)
    meta_file, weights = p / "vitq.json", p / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise ModelError(f"{p} is not a vitq export (needs vitq.json and model.safetensors): pass the --out folder of vitq quantize")
    meta = read_meta(p)
    check(meta, p)  # a changed tensor file or configuration is refused before anything is built from it
    if meta.get("format") == PACKED_FORMAT:
        return load_packed(p, meta, trust_pickle)
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{meta_file} has format {meta.get('format')!r}, this vitq reads {EXPORT_FORMAT} and {PACKED_FORMAT}")
    source = ModelSource.from_dict(meta["source"])
    model = rebuild(_in_export(source, p), trust_pickle)
    recipe = Recipe.from_dict(meta["recipe"], str(meta_file))
    prepare(model, recipe, meta["bits"])
    load_into(model, load_state_file(weights), f"export {weights}")
    st = ensure_state(model)
    st.source = _in_export(source, p)
    st.run = run_record(meta)
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = meta["pretrained_cfg"]
    return model.eval()


def export(model: nn.Module, path: "str | Path", format: str = "onnx", *, weight_dtype: Optional[str] = None,
           emulate: str = "exact", verify_data: Any = None, max_top1_diff: float = DEFAULT_MAX_TOP1_DIFF,
           progress: bool = False, embeddings: bool = False) -> dict[str, Any]:
    """``vitq.export(qmodel, "out/", format="onnx")``: write a quantized model for a runtime, as ``vitq export``
    does, and return its report (also in ``out/export.json``). ``format``: ``onnx`` (a QDQ graph for onnxruntime,
    ``model.onnx``), ``openvino`` (OpenVINO IR, ``model.xml`` + ``model.bin``, on OpenVINO's INT8 kernels) or ``vitq``
    (packed integer weight codes). ``weight_dtype`` (onnx): ``auto`` (default: int8 where
    this CPU runs it exactly - VNNI, AMX, ARM -, else uint8), ``uint8`` (exact on every CPU) or ``int8``. ``verify_data``: evaluation batches (any form ``vitq.evaluate`` takes):
    the file is run in its runtime beside the simulated model and refused when their top-1 differ by more than
    ``max_top1_diff`` points (``embeddings=True``, an encoder: when an image's embedding cosine against the simulated
    one is below 0.999); the check's figures are the report's ``verify``."""
    rep = deploy_export(model, path, format, emulate=emulate, weight_dtype=weight_dtype)
    if verify_data is not None:
        rep["verify"] = verify(model, path, batches_of(verify_data), format, max_top1_diff=max_top1_diff,
                               progress=progress, embeddings=embeddings)
    return rep


def run_record(meta: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The run record of an export's ``vitq.json``: its ``run`` entry, or for folders saved before runs were
    recorded (2026-12-06) the data and resolved preprocessing of its ``result``."""
    run = meta.get("run")
    if isinstance(run, dict):
        return run
    res = meta.get("result")
    if isinstance(res, dict) and res.get("data"):
        pre = res.get("preprocessing") or {}
        return {"data": res["data"], "input_size": pre.get("input_size"), "crop_pct": pre.get("crop_pct"),
                "interpolation": pre.get("interpolation"), "calib_data": res.get("calib_data")}
    return None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
    return out


__all__ = ["EXPORT_FORMAT", "export", "load_quantized", "run_record", "save_quantized", "source_of"]

make_callable(__name__, "export")  # vitq.export(qmodel, path, format=...) is export(...)
