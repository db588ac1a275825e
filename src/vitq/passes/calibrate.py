"""Calibration pass: observe activations on the calibration set, set every site's parameters."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import calibrate, calibrate_weights
from .registry import register_pass

log = logging.getLogger(__name__)


@register_pass("calibrate", max_elements=1 << 20, weights_only=False)
def calibrate_pass(model: nn.Module, ctx: Any, max_elements: int = 1 << 20, weights_only: bool = False) -> nn.Module:
    """Range calibration: run the calibration images through the model with observers on.

    ``weights_only: true`` re-computes only the weight quantizers from the current weights (no
    images; activation sites keep their parameters), e.g. after a pass that trained the weights.
    """
    if not isinstance(weights_only, bool):
        raise ConfigError(f"calibrate weights_only must be true or false, got {weights_only!r}")
    if weights_only:
        with torch.no_grad():
            calibrate_weights(model)
        return model
    with torch.no_grad(), calibrate(model, max_elements=max_elements, seed=ctx.seed):
        for x in ctx.calib_batches(desc="calibrate"):
            model(x)
    return model
