"""Where a run computes: ``--device cpu|cuda|cuda:N|auto`` and ``device=`` in the Python API.

Calibration, reconstruction and evaluation run where the model's parameters are (every pass creates
its tensors on the device of the tensors it works on; nothing calls ``.cuda()``); :func:`resolve`
turns the user's words into a :class:`torch.device`, with a one-line error when that device is not
there. Exports always trace a CPU copy (the files are device-neutral; onnxruntime runs on the CPU).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .errors import ConfigError

DeviceLike = Union[str, torch.device, None]
CHOICES = ("cpu", "cuda", "cuda:N", "auto")


def resolve(device: DeviceLike) -> torch.device:
    """``None`` / ``"cpu"`` -> CPU; ``"auto"`` -> the first CUDA GPU when one is visible, else CPU;
    ``"cuda"`` / ``"cuda:N"`` -> that GPU, or a one-line :class:`ConfigError` when it is not there."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: use one of {', '.join(CHOICES)}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported: use one of {', '.join(CHOICES)}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): "
                          "use --device cpu, or auto to take a GPU only where there is one")
    n = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise ConfigError(f"--device {spec}: this machine has {n} CUDA GPU(s) (cuda:0 .. cuda:{n - 1}): pick one of them")
    return torch.device("cuda", index)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors, or a
    runtime that is not a module (an onnxruntime session wrapper)."""
    if not isinstance(model, nn.Module):
        return torch.device("cpu")
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def available() -> list[str]:
    """The devices of this machine, for tests and benches: ``cpu`` and every visible GPU."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]


def describe(device: Optional[torch.device]) -> str:
    dev = device or torch.device("cpu")
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


__all__ = ["CHOICES", "DeviceLike", "available", "describe", "model_device", "resolve"]
