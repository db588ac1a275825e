"""Save and load quantized models: ``model.safetensors`` + ``vitq.json``.

The JSON records how to rebuild the float architecture (model source), the full recipe and
bits, so loading = rebuild -> prepare (same structure, empty quantizers) -> load every tensor,
including each FakeQuant's parameters. What you calibrated is exactly what you load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..bits import Bits
from ..checkpoints import load_into, load_state_file
from ..errors import ModelError
from ..models import ModelSource, rebuild
from ..pipeline import prepare
from ..recipes import Recipe
from ..state import ensure_state, state_of
from .integrity import check, read_meta, seal
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


def save_quantized(model: nn.Module, out_dir: "str | Path", source: ModelSource,
                   extra: Optional[dict[str, Any]] = None) -> Path:
    st = state_of(model)
    recipe: Any = None if st is None else st.recipe  # a Recipe (RecipeLike in the state, which sits below recipes)
    bits: Optional[Bits] = None if st is None else st.bits
    if recipe is None or bits is None:
        raise ModelError("only a model quantized by vitq (run_recipe / quantize) can be saved with save_quantized")
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    files = ["model.safetensors"]
    if source.kind == "pickle":  # the export holds its own copy of the architecture: no path to the user's file
        src = Path(source.name)
        if not src.is_file():
            raise ModelError(f"the pickled model {source.name} this model was loaded from is gone, so the export could "
                             "not rebuild its architecture: save from the run that loaded it")
        if src.resolve() != (out / PICKLE_FILE).resolve():
            shutil.copyfile(src, out / PICKLE_FILE)
        source = replace(source, name=PICKLE_FILE, checkpoint=PICKLE_IN_EXPORT)
        files.append(PICKLE_FILE)
    meta = {"format": EXPORT_FORMAT, "source": source.to_dict(), "recipe": recipe.to_dict(), "bits": str(bits),
            "pretrained_cfg": _jsonable(getattr(model, "pretrained_cfg", {}) or {}), **(extra or {})}
    (out / "vitq.json").write_text(json.dumps(seal(meta, out, files), indent=2) + "\n")
    return out


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
    ensure_state(model).source = _in_export(source, p)
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = meta["pretrained_cfg"]
    return model.eval()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
    return out


__all__ = ["save_quantized", "load_quantized", "EXPORT_FORMAT"]
