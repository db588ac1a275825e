"""Calibration pass: observe activations on the calibration set, set every site's parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..nn import calibrate, calibrate_weights
from ..observers import DEFAULT_MAX_ELEMENTS
from ..options import Options, is_int, need
from .registry import register_pass

log = logging.getLogger(__name__)

UPSTREAM = ("float", "quantized")


@dataclass(frozen=True)
class CalibrateOptions(Options):
    """``max_elements``: values each site's observer keeps (a seeded random sample; min / max stay
    exact); ``weights_only``: re-compute only the weight quantizers from the current weights;
    ``upstream``: what each activation site is calibrated on - ``float`` (default): the activations
    of the model with every activation site float, over any number of batches; ``quantized``: one
    forward of all the calibration images with the sites upstream already quantized (RepQ-ViT's order;
    memory grows with the calibration set)."""

    max_elements: int = DEFAULT_MAX_ELEMENTS
    weights_only: bool = False
    upstream: str = "float"

    def validate(self) -> None:
        need(is_int(self.max_elements) and self.max_elements >= 1,
             f"calibrate max_elements={self.max_elements!r} must be an integer >= 1 (values kept per site; "
             f"default {DEFAULT_MAX_ELEMENTS})")
        need(self.upstream in UPSTREAM,
             f"calibrate upstream={self.upstream!r}: choose one of {', '.join(UPSTREAM)} (float: every site on "
             f"the float activations; quantized: one forward with the upstream sites already quantized)")


@register_pass("calibrate", CalibrateOptions)
def calibrate_pass(model: nn.Module, ctx: Any, opts: CalibrateOptions = CalibrateOptions()) -> nn.Module:
    """Range calibration: run the calibration images through the model with observers on.

    ``weights_only: true`` re-computes only the weight quantizers from the current weights (no
    images; activation sites keep their parameters), e.g. after a pass that trained the weights.
    """
    if opts.weights_only:
        with torch.no_grad():
            calibrate_weights(model)
        return model
    if opts.upstream == "quantized":
        need(not distributed.active(), "calibrate upstream=quantized runs one forward of the whole calibration set "
             "and cannot be split over processes: use upstream=float under torchrun")
        batches = list(ctx.calib_batches(desc="calibrate"))
        with torch.no_grad(), calibrate(model, max_elements=opts.max_elements, seed=ctx.seed, sequential=True):
            model(torch.cat(batches) if len(batches) > 1 else batches[0])
        return model
    if distributed.active():
        return _calibrate_distributed(model, ctx, opts)
    with torch.no_grad(), calibrate(model, max_elements=opts.max_elements, seed=ctx.seed):
        for x in ctx.calib_batches(desc="calibrate"):
            model(x)
    return model


def _calibrate_distributed(model: nn.Module, ctx: Any, opts: CalibrateOptions) -> nn.Module:
    """Whole batches dealt to the ranks; the observers merge into what one process computes
    (:mod:`vitq.distributed`)."""
    batches = list(ctx.calib_batches(desc="calibrate"))
    distributed.check_same_everywhere([tuple(x.shape) for x in batches], "the calibration batches")
    plan = distributed.SamplePlan([int(x.shape[0]) for x in batches])
    plan.owned = set(distributed.owned_batches(len(batches)))
    with torch.no_grad(), calibrate(model, max_elements=opts.max_elements, seed=ctx.seed, plan=plan):
        for b in sorted(plan.owned):
            plan.current = b
            model(batches[b])
    return model
