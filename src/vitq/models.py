"""Loading models: a reference name, a library's model (a timm name + ``--checkpoint``, a Hugging
Face ``hf:DIR`` folder), or a pickled ``nn.Module``; and what a model expects as input.

Nothing is downloaded. Which MODEL strings exist and how they load is each library's business
(:class:`vitq.adapters.ModelLibrary`); this module only dispatches. A file holding a whole pickled
``nn.Module`` is loaded only with ``trust_pickle=True``, because unpickling runs code from the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .adapters import LIBRARIES, ModelSource, get_adapter, get_library, library_for
from .checkpoints import load_into, load_state_file, short_error
from .data import Preprocess, PreprocessConfig, Transforms
from .errors import DataError, ModelError
from .reference import is_reference, list_reference_models, load_reference
from .state import ensure_state

log = logging.getLogger(__name__)


def load_model(name: str, checkpoint: Optional[str] = None, trust_pickle: bool = False,
               random_weights: bool = False, num_classes: Optional[int] = None) -> tuple[nn.Module, ModelSource]:
    """Resolve ``name`` to an ``nn.Module`` in eval mode, and describe where it came from."""
    if is_reference(name):
        if checkpoint:
            raise ModelError(f"{name} is a reference model with its own weights: drop --checkpoint")
        if num_classes is not None:
            raise ModelError(f"{name} is a reference model with its own 10-class head: drop --num-classes (it sizes "
                             "the classifier of a timm model name)")
        src = ModelSource("reference", name)
        return _remember(load_reference(name), src), src
    lib = library_for(name)
    if lib is not None:
        model, source = lib.load(name, checkpoint=checkpoint, random_weights=random_weights, num_classes=num_classes)
        return _remember(model.eval(), source), source
    p = Path(name)
    _not_loadable_export(p)
    if p.is_file() and num_classes is not None:
        raise ModelError(f"--num-classes sizes the classifier of a timm model name; {name} is a file with its own head: "
                         "drop --num-classes")
    if p.is_file():
        if not trust_pickle:
            raise ModelError(
                f"{name} is a file, so it would be loaded as a pickled nn.Module, and unpickling runs code from "
                "the file: pass --trust-pickle if you trust it, or use a timm model name with --checkpoint"
            )
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelError(f"cannot unpickle {name} ({short_error(e)}): the file is corrupt or needs missing code") from None
        if not isinstance(obj, nn.Module):
            raise ModelError(
                f"{name} holds a {type(obj).__name__}, not an nn.Module: for a state dict use a timm model name "
                "as MODEL and this file as --checkpoint"
            )
        src = ModelSource("pickle", str(p))
        return _remember(obj.eval(), src), src
    usages = "; ".join(lib.usage for lib in LIBRARIES.values())
    raise ModelError(
        f"unknown model {name!r}: use a reference model ({', '.join(list_reference_models())}), {usages}, "
        "or a pickled model file with --trust-pickle"
    )


def _not_loadable_export(p: Path) -> None:
    """The right one line for what vitq wrote but does not load as MODEL: an ONNX file or folder (run by its runtime,
    not by vitq's PyTorch commands) and an export that was interrupted (its files, no ``vitq.json``)."""
    onnx = p if p.is_file() and p.suffix.lower() == ".onnx" else p / "model.onnx" if p.is_dir() else None
    if onnx is not None and onnx.is_file():
        raise ModelError(f"{p} is an ONNX export: vitq's commands take the vitq run folder it was exported from; run "
                         f"{onnx.name} in onnxruntime (vitq.export.OnnxModel), or check it with vitq export RUN --format "
                         "onnx --verify")
    if p.is_dir() and not (p / "vitq.json").is_file() and any(
            (p / f).exists() for f in ("model.safetensors", "model.pt", "packed.safetensors", "export.json")):
        raise ModelError(f"{p} is an incomplete vitq export (its files without vitq.json, which is written last: the "
                         "export was interrupted or the folder copied in part): export the model again")


def source_from_model(model: nn.Module) -> Optional[ModelSource]:
    """A source that rebuilds ``model``, asked of each library (:meth:`ModelLibrary.source_of`), or None."""
    for lib in LIBRARIES.values():
        found = lib.source_of(model)
        if found is not None:
            return found
    return None


def _remember(model: nn.Module, source: ModelSource) -> nn.Module:
    """Record where ``model`` came from in its quantization state, so that a save needs no source argument
    (models vitq has no adapter for are refused later, where they are used)."""
    try:
        ensure_state(model).source = source
    except ModelError:
        pass
    return model


def rebuild(source: ModelSource, trust_pickle: bool = False, weights: bool = True) -> nn.Module:
    """Re-create the float architecture described by ``source`` (used when loading an export; the
    export's tensors replace every weight, so ``weights=False`` skips reading a reference model's own)."""
    if source.kind == "reference":
        return load_reference(source.name, weights=weights)
    if source.kind == "pickle":
        return load_model(source.name, trust_pickle=trust_pickle)[0]
    return get_library(source.kind).build(source)


def data_config(model: nn.Module) -> PreprocessConfig:
    """How ``model``'s inputs are made from images, as its adapter says (an unsupported model type is
    a one-line ModelError here, before any forward)."""
    return get_adapter(model).data_config(model)


def transforms(model: nn.Module, input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
               interpolation: Optional[str] = None) -> Transforms:
    """``model``'s preprocessing (:class:`~vitq.data.Transforms`): image files through its library's own
    evaluation transform (timm's ``create_transform``, a Hugging Face image processor), image tensors
    through :class:`~vitq.data.Preprocess`; optionally with timm-validate-style overrides."""
    adapter = get_adapter(model)
    cfg = adapter.data_config(model).with_overrides(input_size, crop_pct, interpolation)
    hw = (cfg.input_size[1], cfg.input_size[2])
    if not adapter.accepts_input_size(model, hw):
        _, h, w = adapter.data_config(model).input_size
        raise DataError(f"--input-size {hw[0]}x{hw[1]}: the model is built for {h}x{w} inputs; build it for that size "
                        "(a timm model with dynamic_img_size) or keep its own")
    image, name = adapter.image_transform(model, cfg)
    return Transforms(cfg, image, Preprocess(cfg), name)


__all__ = ["ModelSource", "data_config", "source_from_model", "transforms", "load_into", "load_model", "load_state_file", "rebuild"]
