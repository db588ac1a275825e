"""What a batch and a model output look like, whatever the library: family-neutral helpers used
everywhere a model is called.

* A batch is a tensor of images, an ``(images, labels, ...)`` tuple or list, or a mapping with
  ``pixel_values`` (and ``labels``), as Hugging Face data collators make.
* A model output is a tensor of logits, an object with a ``logits`` tensor (transformers'
  ``ModelOutput``), or a tuple whose first item is the logits.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor, nn

from .errors import DataError, ModelError


def batch_images(b: Any) -> Tensor:
    """The images of a batch."""
    if isinstance(b, Tensor):
        return b
    if isinstance(b, Mapping):
        if "pixel_values" not in b:
            raise DataError(f"a batch mapping needs a 'pixel_values' tensor; it has keys {sorted(map(str, b))}")
        x = b["pixel_values"]
    elif isinstance(b, (tuple, list)) and b:
        x = b[0]
    else:
        raise DataError(f"a batch must be a tensor of images, an (images, labels) pair or a dict with "
                        f"pixel_values, got {type(b).__name__}")
    if not isinstance(x, Tensor):
        raise DataError(f"batch images must be a torch tensor (N,C,H,W), got {type(x).__name__}")
    return x


def batch_labels(b: Any) -> Optional[Any]:
    """The labels of a batch, or None when it has none."""
    if isinstance(b, Mapping):
        return b.get("labels", b.get("label"))
    if isinstance(b, (tuple, list)) and len(b) > 1:
        return b[1]
    return None


def as_embedding(out: Any) -> Tensor:
    """An encoder's embedding of a model output: a (N, D) tensor as it is (a (N, T, D) one: its first token); a
    transformers output's ``image_embeds`` or ``pooler_output``; else the first token of ``last_hidden_state``."""
    if isinstance(out, Tensor):
        return out[:, 0] if out.ndim == 3 else out
    for name in ("image_embeds", "pooler_output"):
        v = getattr(out, name, None)
        if isinstance(v, Tensor):
            return v
    h = getattr(out, "last_hidden_state", None)
    if isinstance(h, Tensor):
        return h[:, 0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return as_embedding(out[0])
    raise ModelError(f"the model returned a {type(out).__name__}: no embedding (a tensor, pooler_output or "
                     "last_hidden_state)")


def as_logits(out: Any) -> Tensor:
    """The output tensor methods compare float and quantized models by: the logits of a classifier (a tensor, an
    output's ``logits``), or an encoder's embedding (:func:`as_embedding`)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    try:
        return as_embedding(out)
    except ModelError:
        raise ModelError(f"the model returned a {type(out).__name__}, not logits (a tensor, or an output with .logits) "
                         "nor an embedding (pooler_output, last_hidden_state)") from None


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` as a logits tensor."""
    return as_logits(model(x))


__all__ = ["as_embedding", "as_logits", "batch_images", "batch_labels", "forward_logits"]
