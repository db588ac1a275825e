"""Explicit stages: ``with calibrate(model): ...`` and ``with disabled(model): ...``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, cast

from torch import Tensor, nn

from .fake_quant import FakeQuant


def fake_quants(model: nn.Module, kind: Optional[str] = None) -> list[FakeQuant]:
    return [m for m in model.modules() if isinstance(m, FakeQuant) and (kind is None or m.kind == kind)]


@contextmanager
def calibrate(model: nn.Module, max_elements: Optional[int] = None, seed: int = 0,
              plan: Any = None, sequential: bool = False) -> Iterator[nn.Module]:
    """Inside the block activation sites observe (and pass through) what flows; on exit they
    compute their parameters. Weight sites are calibrated from the weights on entry. ``plan``: the
    global batches of a distributed calibration (:class:`vitq.distributed.SamplePlan`).

    ``sequential``: each activation site sets its parameters from the first input it sees and
    quantizes from then on, so a site downstream is calibrated on the quantized model's activations
    (RepQ-ViT's order: one forward with the upstream sites already quantized). Meant for one forward."""
    calibrate_weights(model)
    acts = [fq for fq in fake_quants(model, "act") if fq.enabled]
    # one seed for every site: sites that read one tensor (q / k / v after one LayerNorm, SwiGLU's two inputs) keep
    # the same rows when their samples are bounded, so they compute the same parameters and a fold can share them
    for fq in acts:
        fq.start_calibration(max_elements, seed=seed, plan=plan, once=sequential)
    try:
        yield model
    except BaseException:
        for fq in acts:
            fq.calibrating = fq.calibrate_once = False
            fq.observer = None
        raise
    for fq in acts:
        fq.finish_calibration()


def calibrate_weights(model: nn.Module) -> None:
    """(Re)compute every weight site's parameters from its layer's current weight."""
    for m in model.modules():
        wq = getattr(m, "weight_quant", None)
        if isinstance(wq, FakeQuant) and wq.enabled:
            wq.calibrate_weight(cast(Tensor, m.weight))


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every FakeQuant is the identity: the model computes in float."""
    fqs = fake_quants(model)
    saved = [fq.enabled for fq in fqs]
    for fq in fqs:
        fq.enabled = False
    try:
        yield model
    finally:
        for fq, s in zip(fqs, saved):
            fq.enabled = s
