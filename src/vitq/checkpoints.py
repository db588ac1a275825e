"""Reading weights: state dicts from ``.safetensors`` or torch files, loaded with errors that name
what does not match. Family-neutral: adapters and libraries use it to load checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (export seals, reconstruction checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_record(path: "str | os.PathLike[str]", fix: str) -> dict[str, Any]:
    """A JSON object written by vitq (a run record); anything else is one ConfigError naming the file."""
    from .errors import ConfigError

    try:
        obj = json.loads(Path(path).read_text())
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        raise ConfigError(f"{path} is unreadable (truncated or edited): {fix}") from None
    return obj


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "model_ema", "state_dict_ema")


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
            raise ModelError(f"checkpoint {p} is truncated or corrupt ({short_error(e)}): re-download or re-save it") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelError(f"checkpoint {p} is truncated or corrupt ({short_error(e)}): re-download or re-save it") from None
    except Exception as e:  # the weights_only unpickler refusing a non-tensor object
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ModelError(
                f"checkpoint {p} holds pickled Python objects, not only tensors: to load a whole pickled model "
                "pass it as MODEL with --trust-pickle (only if you trust the file)"
            ) from None
        raise ModelError(f"checkpoint {p} cannot be read ({short_error(e)}): re-download or re-save it") from None
    return _unwrap_state(obj, p)


def short_error(e: BaseException) -> str:
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


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names the mismatching keys in one line."""
    # modules whose stored tensors a fresh build lacks or shapes otherwise make room first: FakeQuant (calibrated
    # parameters), QLayerNorm (Add_alpha's scale), QLinear / QConv2d (a fold's bias)
    for name, m in model.named_modules():
        adopt = getattr(m, "adopt_shapes", None)
        if callable(adopt):
            adopt(sd, f"{name}." if name else "")
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
