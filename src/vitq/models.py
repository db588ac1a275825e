"""Loading models: reference names, timm names + local checkpoint, or a pickled nn.Module.

Nothing is downloaded: a timm name builds the architecture, and its weights come from
``--checkpoint FILE`` (``.pth`` / ``.pt`` state dict loaded with ``weights_only=True``, or
``.safetensors``). A file holding a whole pickled ``nn.Module`` is loaded only with
``trust_pickle=True``, because unpickling runs code from the file.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import ModelError
from .reference import is_reference, list_reference_models, load_reference

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "model_ema", "state_dict_ema")


@dataclass(frozen=True)
class ModelSource:
    """How a model was obtained, so that an export can rebuild it."""

    kind: str  # "reference" | "timm" | "pickle"
    name: str
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "checkpoint": self.checkpoint, "num_classes": self.num_classes}


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


def load_state_file(path: "str | os.PathLike[str]") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint file {p} does not exist: check the path")
    if p.stat().st_size == 0:
        raise ModelError(f"checkpoint file {p} is empty: re-download or re-save it")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"checkpoint {p} is truncated or corrupt ({_short(e)}): re-download or re-save it") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelError(f"checkpoint {p} is truncated or corrupt ({_short(e)}): re-download or re-save it") from None
    except Exception as e:  # the weights_only unpickler refusing a non-tensor object
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ModelError(
                f"checkpoint {p} holds pickled Python objects, not only tensors: to load a whole pickled model "
                "pass it as MODEL with --trust-pickle (only if you trust the file)"
            ) from None
        raise ModelError(f"checkpoint {p} cannot be read ({_short(e)}): re-download or re-save it") from None
    return _unwrap_state(obj, p)


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def _unwrap_state(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for k in _WRAPPER_KEYS:
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if sd:
            if all(k.startswith("module.") for k in sd):
                sd = {k[len("module."):]: v for k, v in sd.items()}
            return sd
    raise ModelError(f"checkpoint {p} holds no state dict of tensors: save model.state_dict() to it")


def _infer_num_classes(sd: dict[str, torch.Tensor]) -> Optional[int]:
    for k in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if k in sd and sd[k].ndim == 2:
            return int(sd[k].shape[0])
    return None


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names the mismatching keys in one line."""
    from .nn import FakeQuant, QLayerNorm

    for name, m in model.named_modules():
        if isinstance(m, (FakeQuant, QLayerNorm)):
            m.adopt_shapes(sd, f"{name}." if name else "")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
                         + (f" and {len(shape) - 1} more" if len(shape) > 1 else ""))
        raise ModelError(f"{what} does not match the architecture: {'; '.join(parts)}: use the checkpoint made for this model")
    model.load_state_dict(sd)


def load_model(name: str, checkpoint: Optional[str] = None, trust_pickle: bool = False,
               random_weights: bool = False, num_classes: Optional[int] = None) -> tuple[nn.Module, ModelSource]:
    """Resolve ``name`` to an ``nn.Module`` in eval mode, and describe where it came from."""
    if is_reference(name):
        if checkpoint:
            raise ModelError(f"{name} is a reference model with its own weights: drop --checkpoint")
        return load_reference(name), ModelSource("reference", name)
    if _is_timm_name(name):
        import timm

        sd = None
        if checkpoint:
            sd = load_state_file(checkpoint)
            num_classes = num_classes or _infer_num_classes(sd)
        elif not random_weights:
            raise ModelError(
                f"timm model {name} needs its weights as --checkpoint FILE (.pth/.pt/.safetensors): "
                "nothing is downloaded (use --random-weights for cost measurements only)"
            )
        kw = {} if num_classes is None else {"num_classes": num_classes}
        try:
            model = timm.create_model(name, pretrained=False, **kw)
        except Exception as e:
            raise ModelError(f"timm cannot build {name} ({_short(e)})") from None
        if sd is not None:
            load_into(model, sd, f"checkpoint {checkpoint}")
        return model.eval(), ModelSource("timm", name, checkpoint, num_classes)
    p = Path(name)
    if p.is_file():
        if not trust_pickle:
            raise ModelError(
                f"{name} is a file, so it would be loaded as a pickled nn.Module, and unpickling runs code from "
                "the file: pass --trust-pickle if you trust it, or use a timm model name with --checkpoint"
            )
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelError(f"cannot unpickle {name} ({_short(e)}): the file is corrupt or needs missing code") from None
        if not isinstance(obj, nn.Module):
            raise ModelError(
                f"{name} holds a {type(obj).__name__}, not an nn.Module: for a state dict use a timm model name "
                "as MODEL and this file as --checkpoint"
            )
        return obj.eval(), ModelSource("pickle", str(p))
    raise ModelError(
        f"unknown model {name!r}: use a reference model ({', '.join(list_reference_models())}), "
        "a timm model name with --checkpoint FILE, or a pickled model file with --trust-pickle"
    )


def rebuild(source: ModelSource, trust_pickle: bool = False) -> nn.Module:
    """Re-create the float model described by ``source`` (used when loading an export)."""
    if source.kind == "reference":
        return load_reference(source.name)
    if source.kind == "timm":
        import timm

        kw = {} if source.num_classes is None else {"num_classes": source.num_classes}
        return timm.create_model(source.name, pretrained=False, **kw).eval()
    return load_model(source.name, trust_pickle=trust_pickle)[0]
