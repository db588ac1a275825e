"""Adapter and library registries. Adapters are the only code that knows model families: their
module names *and* their classes.

An adapter, for the model families it matches (by module *type*):

* ``wrap(model)`` makes every attention module a :class:`~vitq.nn.QAttentionCore`, the residual
  additions :class:`~vitq.nn.QAdd`, LayerNorms :class:`~vitq.nn.QLayerNorm` and Linear / Conv
  layers their Q versions, tagging every slot with a :class:`~vitq.roles.Role`. The wrapped model
  holds no quantizer yet and computes exactly what the float model computes.
* ``ln_consumers(model)`` lists LayerNorm -> consuming Linear pairs (reparameterization targets).
* ``chain(model)`` lists the model as a sequence of pieces (reconstruction units).
* ``residual_streams(model)`` lists the residual streams (AOCQ's Add_alpha).
* ``data_config(model)`` says how the model's inputs are preprocessed.
* ``build(source)`` (through its :class:`ModelLibrary`) re-creates the architecture from a
  :class:`ModelSource`.

A :class:`ModelLibrary` (timm, Hugging Face) turns a ``MODEL`` string into a float model and its
source, and rebuilds an architecture from a source. A feature an adapter cannot handle raises
:class:`~vitq.errors.ModelError`; nothing is silently left in float.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, TypeVar

from torch import Tensor, nn

from ..data.preprocess import PreprocessConfig, torchvision_image_transform
from ..errors import ModelError
from ..nn import QConv2d, QLayerNorm, QLinear
from ..roles import Role


@dataclass(frozen=True)
class ModelSource:
    """How a float model was obtained, so that an export can rebuild its architecture.

    ``kind``: ``reference``, ``pickle`` or a library's name (``timm``, ``hf``); ``name``: what the
    user passed as MODEL (a reference or timm name, a folder, a file); ``build_config``: whatever the
    library needs to rebuild the architecture without the original files (the Hugging Face config
    and image-processor settings), JSON-serialisable.
    """

    kind: str
    name: str
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    build_config: Optional[dict[str, Any]] = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name, "checkpoint": self.checkpoint,
                             "num_classes": self.num_classes}
        if self.build_config is not None:
            d["build_config"] = self.build_config
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSource":
        return cls(str(d["kind"]), str(d["name"]), d.get("checkpoint"), d.get("num_classes"), d.get("build_config"))


class ModelLibrary:
    """Where models of one library come from: which MODEL strings it claims, how it loads them
    (local files only: nothing is downloaded) and how it rebuilds an architecture for an export."""

    name = "base"
    #: how the library's MODEL strings look, for error messages
    usage = ""

    def claims(self, model: str) -> bool:
        raise NotImplementedError

    def load(self, model: str, checkpoint: Optional[str] = None, random_weights: bool = False,
             num_classes: Optional[int] = None) -> tuple[nn.Module, ModelSource]:
        raise NotImplementedError

    def build(self, source: ModelSource) -> nn.Module:
        """The float architecture ``source`` describes, in eval mode (its weights come from an export)."""
        raise NotImplementedError

    def source_of(self, model: nn.Module) -> Optional[ModelSource]:
        """A source that rebuilds ``model``'s architecture, for a model this library made but vitq did not
        load (``vitq.save_quantized`` without a source), or None when the library cannot tell."""
        return None


LIBRARIES: dict[str, ModelLibrary] = {}


def register_library(lib: ModelLibrary) -> ModelLibrary:
    LIBRARIES[lib.name] = lib
    return lib


def library_for(model: str) -> Optional[ModelLibrary]:
    """The library that claims the MODEL string, or None."""
    for lib in LIBRARIES.values():
        if lib.claims(model):
            return lib
    return None


def get_library(name: str) -> ModelLibrary:
    if name not in LIBRARIES:
        raise ModelError(f"model source kind {name!r} is unknown to this vitq: known are {', '.join(sorted(LIBRARIES))}")
    return LIBRARIES[name]


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
    #: the :class:`ModelLibrary` (by name) that builds this family's models
    library: ClassVar[str] = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def build(cls, source: ModelSource) -> nn.Module:
        """Re-create the float architecture described by ``source`` (see :class:`ModelLibrary`)."""
        return get_library(cls.library).build(source)

    def data_config(self, model: nn.Module) -> PreprocessConfig:
        """How the model's inputs are made from images: size, channels, normalisation, resize."""
        raise NotImplementedError

    def image_transform(self, model: nn.Module, cfg: PreprocessConfig) -> tuple[Callable[[Any], Tensor], str]:
        """The model library's own evaluation transform for decoded images (PIL -> input tensor) with
        ``cfg`` (:meth:`data_config`, possibly with the user's overrides), and its name for the record.
        Default: vitq's torchvision restatement of timm's evaluation transform."""
        return torchvision_image_transform(cfg), "torchvision (vitq.data.Preprocess)"

    def accepts_input_size(self, model: nn.Module, hw: tuple[int, int]) -> bool:
        """Whether ``model`` runs on ``hw`` inputs (default: only the size :meth:`data_config` says)."""
        return tuple(hw) == tuple(self.data_config(model).input_size[1:])

    def is_wrapped(self, model: nn.Module) -> bool:
        """Whether :meth:`wrap` has already run on ``model``."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise ModelError for any feature this adapter does not support."""

    def num_outputs(self, model: nn.Module) -> Optional[int]:
        """How many classes the model's head scores (labels must be below it), or None when it has none."""
        return None

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def float_parts(self, model: nn.Module) -> list[tuple[str, str]]:
        """Sub-modules with weights that stay float by design, as ``(module name, why)``: what reads constants (a
        position-bias MLP), what is too small to matter (talking heads' head mixes), a CNN stem. The run record and
        the CLI name them, so that nothing float goes unsaid. Default: none."""
        return []

    def check_wrapped(self, model: nn.Module) -> None:
        """The end of :meth:`wrap`: every plain Linear / Conv2d left must be one of :meth:`float_parts` (one list for
        the check and the run record), else the model variant is refused (:func:`check_nothing_left`)."""
        check_nothing_left(model, tuple(n for n, _ in self.float_parts(model)))

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


#: why an attention-pooling head's query projection stays float (timm's SigLIP attn_pool.q, Hugging Face's head.q)
ATTN_POOL_Q_WHY = ("the attention-pooling head's query projection: it reads the learned latent (a constant), so its output "
                   "is the same for every image; float is exact and costs one small matmul the runtimes fold to a constant")


def float_modules(model: nn.Module, names: tuple[str, ...], why: str) -> list[tuple[str, str]]:
    """``(name, why)`` of each outermost sub-module called one of ``names`` (the last part of its name): an adapter's
    :meth:`Adapter.float_parts` for the modules it keeps float by name."""
    found: list[tuple[str, str]] = []
    for n, m in model.named_modules():
        if n.split(".")[-1] in names and any(True for _ in m.parameters()) and \
                not any(n.startswith(f + ".") for f, _ in found):
            found.append((n, why))
    return found


def check_nothing_left(model: nn.Module, keep_float: tuple[str, ...] = ()) -> None:
    """After wrapping, any plain Linear / Conv2d left would silently stay float: refuse. ``keep_float``: full names
    of the sub-modules whose layers stay float by design, the adapter's :meth:`Adapter.float_parts` (a constant of
    the model, such as Swin V2's position-bias MLP, which reads fixed coordinates rather than the image): what the
    run record names as float is exactly what this check lets through. Adapters call it through
    :meth:`Adapter.check_wrapped`."""

    def kept(name: str) -> bool:  # the module itself or anything inside it
        return any(name == f or name.startswith(f + ".") for f in keep_float)

    left = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and not kept(n)]
    if left:
        raise ModelError(
            f"the adapter does not know layer(s) {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}:"
            " this model variant is not supported yet"
        )


def mix_in(obj: nn.Module, mixin: type) -> nn.Module:
    """Change ``obj``'s class in place to ``class Q<Base>(mixin, Base)``: every attribute, buffer and
    parameter name stays as the library made it (state dicts unchanged); the mixin adds behaviour
    (a split forward, quantizable sub-modules it creates itself). Idempotent."""
    base = type(obj)
    if not getattr(base, "_vitq_q", False):
        obj.__class__ = mixed_class(base, mixin)
    return obj


_QCLASSES: dict[tuple[type, type], type] = {}


def mixed_class(base: type, mixin: type) -> type:
    """``class Q<Base>(mixin, base)``, made once per pair and published in the mixin's module so that
    pickled and deep-copied models find it by name."""
    key = (base, mixin)
    if key not in _QCLASSES:
        cls = type(f"Q{base.__name__}", (mixin, base), {"_vitq_q": True, "__module__": mixin.__module__})
        _QCLASSES[key] = cls
        setattr(sys.modules[mixin.__module__], cls.__name__, cls)
    return _QCLASSES[key]


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


Hook = Callable[[nn.Module], None]
