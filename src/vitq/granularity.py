"""Granularity of quantization parameters: tiny frozen values (torchao style).

* :class:`PerTensor` - one scale for the whole tensor.
* :class:`PerChannel` - one scale per index of ``axis`` (weights: axis 0 = output channel;
  activations: axis -1 = hidden channel).
* :class:`PerToken` - one scale per row of the last dimension, computed at run time (dynamic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class PerTensor:
    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    axis: int = -1

    def __str__(self) -> str:
        return "channel" if self.axis == -1 else f"channel{self.axis}"


@dataclass(frozen=True)
class PerToken:
    def __str__(self) -> str:
        return "token"


Granularity = Union[PerTensor, PerChannel, PerToken]


def parse_granularity(value: "str | Granularity") -> Granularity:
    if isinstance(value, (PerTensor, PerChannel, PerToken)):
        return value
    v = str(value).strip().lower()
    if v in ("tensor", "per_tensor", "per-tensor", "layer"):
        return PerTensor()
    if v in ("channel", "per_channel", "per-channel"):
        return PerChannel(-1)
    if v.startswith("channel") and v[7:].lstrip("-").isdigit():
        return PerChannel(int(v[7:]))
    if v in ("token", "per_token", "per-token"):
        return PerToken()
    raise ConfigError(f"unknown granularity {value!r}: use 'tensor', 'channel', 'channel0' or 'token'")


def to_rows(x: Tensor, g: Granularity) -> Tensor:
    """Reshape ``x`` to 2-D ``(rows, groups)`` so that reducing over dim 0 gives one value per group.

    Per-tensor gives a single group; per-channel puts ``axis`` last.
    """
    if isinstance(g, PerChannel):
        return x.movedim(g.axis, -1).reshape(-1, x.shape[g.axis])
    return x.reshape(-1, 1)


def param_shape(x_shape: torch.Size, g: Granularity) -> tuple[int, ...]:
    """Shape that broadcasts one value per group against a tensor of ``x_shape``."""
    if isinstance(g, PerChannel):
        axis = g.axis % len(x_shape)
        return (x_shape[axis],) + (1,) * (len(x_shape) - axis - 1)
    return ()
