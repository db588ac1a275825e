"""Adapter registry. Adapters are the only code that knows a model family's module names.

An adapter, for the model families it matches (by module *type*):

* ``wrap(model)`` swaps attention for our :class:`~vitq.nn.QAttention` family and Linear / Conv
  layers for their Q versions, tagging every slot with a :class:`~vitq.roles.Role`. The wrapped
  model holds no quantizer yet and computes exactly what the float model computes.
* ``ln_consumers(model)`` lists LayerNorm -> consuming Linear pairs (reparameterization targets).
* ``chain(model)`` lists the model as a sequence of pieces (reconstruction units).

A feature the adapter cannot handle raises :class:`~vitq.errors.ModelError`; nothing is silently
left in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from torch import Tensor, nn

from ..errors import ModelError
from ..nn import QConv2d, QLinear
from ..roles import Role


@dataclass(frozen=True)
class Piece:
    """One link of a model's chain: ``fn(x) -> y``. A reconstruction unit is a contiguous slice.

    ``kind`` is one of ``embed``, ``attn`` (attention half-block with its residual), ``mlp``
    (MLP half-block with its residual), ``merge`` (Swin patch merging), ``head``. ``block`` and
    ``stage`` index the transformer block / Swin stage the piece belongs to (-1: none).
    ``modules`` are the modules whose parameters the piece owns.
    """

    name: str
    kind: str
    fn: Callable[[Tensor], Tensor]
    modules: tuple[nn.Module, ...]
    block: int = -1
    stage: int = -1


@dataclass(frozen=True)
class LNPair:
    """A LayerNorm and the Linear layers that read its output directly."""

    ln_name: str
    consumer_names: tuple[str, ...]
    role: Role


@dataclass(frozen=True)
class StreamWriter:
    """Something that writes a residual stream, channels on its output axis.

    ``kind``: ``rows`` - a Linear / Conv2d whose output channels are added into (or are) the
    stream (weight rows, bias); ``affine`` - a LayerNorm whose output *is* the stream (weight,
    bias); ``param`` - a parameter concatenated or added into the stream (class / distillation /
    register token, position embedding), channels on its last axis.
    """

    name: str
    kind: str


@dataclass(frozen=True)
class StreamReader:
    """A module that reads a residual stream: ``ln`` - a LayerNorm on its input; ``cols`` - a
    Linear reading it directly. Its input holds the stream's channels ``tile`` times, channel
    index fastest (Swin patch merging concatenates 2x2 neighbours: 4)."""

    name: str
    kind: str
    tile: int = 1


@dataclass(frozen=True)
class ResidualStream:
    """One stretch of the residual stream of constant width: every module that writes it and every
    module that reads it (Add_alpha rescales a stream's channels between the two)."""

    name: str
    width: int
    writers: tuple[StreamWriter, ...]
    readers: tuple[StreamReader, ...]


class Adapter:
    name = "base"
    description = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise ModelError for any feature this adapter does not support."""

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def ln_consumers(self, model: nn.Module) -> list[LNPair]:
        raise NotImplementedError

    def chain(self, model: nn.Module) -> list[Piece]:
        """The wrapped model as a chain of pieces: ``model(x) == run_chain(chain, x)``."""
        raise NotImplementedError

    def residual_streams(self, model: nn.Module) -> list[ResidualStream]:
        """The residual streams: for each, the modules writing it (embedding, the last Linear of
        every residual branch, Swin patch-merging reduction) and the ones reading it."""
        raise ModelError(f"adapter {self.name} does not describe residual streams: Add_alpha is not supported for it")


def run_chain(pieces: "list[Piece]", x: Tensor) -> Tensor:
    for p in pieces:
        x = p.fn(x)
    return x


ADAPTERS: list[type[Adapter]] = []
A = TypeVar("A", bound=type[Adapter])


def register_adapter(cls: A) -> A:
    ADAPTERS.append(cls)
    return cls


def supported_models() -> list[str]:
    return [a.description for a in ADAPTERS]


def get_adapter(model: nn.Module) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise ModelError(
        f"unsupported model type {type(model).__module__}.{type(model).__name__}: "
        f"vitq supports {'; '.join(supported_models())}"
    )


# -- helpers shared by adapters ---------------------------------------------------------------
def swap_linear(parent: nn.Module, attr: str, role: Role) -> QLinear:
    lin = getattr(parent, attr)
    if isinstance(lin, QLinear):
        return lin
    if type(lin) is not nn.Linear:
        raise ModelError(f"expected nn.Linear at {attr}, found {type(lin).__name__}: not supported")
    q = QLinear.from_float(lin, role)
    setattr(parent, attr, q)
    return q


def swap_layernorm(parent: nn.Module, attr: str) -> None:
    from ..nn import QLayerNorm

    ln = getattr(parent, attr, None)
    if isinstance(ln, nn.LayerNorm) and not isinstance(ln, QLayerNorm):
        setattr(parent, attr, QLayerNorm.from_float(ln))


def swap_conv(parent: nn.Module, attr: str, role: Role) -> QConv2d:
    conv = getattr(parent, attr)
    if isinstance(conv, QConv2d):
        return conv
    if type(conv) is not nn.Conv2d:
        raise ModelError(f"expected nn.Conv2d at {attr}, found {type(conv).__name__}: not supported")
    q = QConv2d.from_float(conv, role)
    setattr(parent, attr, q)
    return q


def require_type(module: Optional[nn.Module], types: tuple[type, ...], what: str, where: str) -> None:
    t = type(module)
    exact = t in types or (getattr(t, "_vitq_q", False) and any(b in types for b in t.__mro__[1:]))
    if module is None or not exact:
        found = "nothing" if module is None else type(module).__name__
        raise ModelError(
            f"unsupported {what} at {where}: found {found}, vitq supports {', '.join(t.__name__ for t in types)}"
        )


def check_nothing_left(model: nn.Module) -> None:
    """After wrapping, any plain Linear / Conv2d left would silently stay float: refuse."""
    left = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if left:
        raise ModelError(
            f"the adapter does not know layer(s) {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}:"
            " this model variant is not supported yet"
        )


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


Hook = Callable[[nn.Module], None]
