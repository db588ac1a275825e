"""Model-family adapters (the only code that knows module names). Importing registers them."""

from . import timm_swin, timm_vit  # noqa: F401  (registration)
from .base import (
    ADAPTERS,
    Adapter,
    LNPair,
    Piece,
    ResidualStream,
    StreamReader,
    StreamWriter,
    get_adapter,
    register_adapter,
    run_chain,
    supported_models,
)

__all__ = ["ADAPTERS", "Adapter", "LNPair", "Piece", "ResidualStream", "StreamReader", "StreamWriter", "get_adapter",
           "register_adapter", "run_chain", "supported_models"]
