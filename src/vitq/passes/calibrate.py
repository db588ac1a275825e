"""Calibration pass: observe activations on the calibration set, set every site's parameters."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..nn import calibrate
from .registry import register_pass

log = logging.getLogger(__name__)


@register_pass("calibrate", max_elements=1 << 20)
def calibrate_pass(model: nn.Module, ctx: Any, max_elements: int = 1 << 20) -> nn.Module:
    """Range calibration: run the calibration images through the model with observers on."""
    with torch.no_grad(), calibrate(model, max_elements=max_elements, seed=ctx.seed):
        for x in ctx.calib_batches(desc="calibrate"):
            model(x)
    return model
