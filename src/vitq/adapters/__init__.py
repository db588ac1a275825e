"""Model-family adapters and model libraries: the only code that knows model families (module
names and classes). Importing registers them: timm (ViT / DeiT, Swin) and Hugging Face
transformers (ViT, DeiT, Swin; the library itself is an optional extra, ``pip install vitq[hf]``)."""

from . import hf, timm  # noqa: F401  (registration)
from .base import (
    ADAPTERS,
    LIBRARIES,
    Adapter,
    LNPair,
    ModelLibrary,
    ModelSource,
    Piece,
    ResidualStream,
    StreamReader,
    StreamWriter,
    get_adapter,
    get_library,
    library_for,
    register_adapter,
    register_library,
    run_chain,
    supported_models,
)

__all__ = ["ADAPTERS", "LIBRARIES", "Adapter", "LNPair", "ModelLibrary", "ModelSource", "Piece", "ResidualStream",
           "StreamReader", "StreamWriter", "get_adapter", "get_library", "library_for", "register_adapter",
           "register_library", "run_chain", "supported_models"]
