"""The quantization state of a model: the one typed place where what vitq did to a model lives,
for later stages (the export, the CLI's report, a second reconstruction pass) to read.

``vitq.wrap`` gives a model its :class:`QuantState` (``state_of(model)``); ``prepare`` records the
recipe and bits; passes append their records. Nothing else is kept as ad-hoc attributes on the
model, and per-run scratch (the float copy reconstruction targets come from, the count of
reconstruction passes) lives on the run's :class:`~vitq.pipeline.Context`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from torch import nn

from .adapters import ModelSource, get_adapter
from .bits import Bits

STATE_ATTR = "vitq_state"


class RecipeLike(Protocol):
    """What the state needs of a recipe (:class:`vitq.recipes.Recipe`, which sits above the passes
    that write records here, so this module does not import it)."""

    @property
    def name(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class QuantState:
    """``adapter``: the adapter that wrapped the model; ``source``: where its float model came from
    (set by the CLI and by loading an export; the packed export rebuilds the architecture from it);
    ``recipe`` / ``bits``: what ``prepare`` inserted; ``reparam``: one record per reparameterization pass; ``balance`` (AOCQ Add_alpha /
    LN_alpha), ``act_scales`` (AOCQ stage 1), ``oas`` (the slicing search): the last such pass's
    report; ``reconstruction``: one report per reconstruction run, in order; ``run``: the run that made
    it (the data and preprocessing it was calibrated and evaluated on, the calibration sample, the seed:
    ``vitq.run.inputs.record_of``), saved with it, so that commands on a run folder use its data."""

    adapter: str
    source: Optional[ModelSource] = None
    recipe: Optional[RecipeLike] = None
    bits: Optional[Bits] = None
    reparam: list[dict[str, Any]] = field(default_factory=list)
    balance: Optional[dict[str, Any]] = None
    act_scales: Optional[dict[str, Any]] = None
    oas: Optional[dict[str, Any]] = None
    reconstruction: list[dict[str, Any]] = field(default_factory=list)
    run: Optional[dict[str, Any]] = None


def state_of(model: nn.Module) -> Optional[QuantState]:
    """The model's quantization state, or None for a model vitq has not wrapped."""
    st = model.__dict__.get(STATE_ATTR)
    return st if isinstance(st, QuantState) else None


def ensure_state(model: nn.Module) -> QuantState:
    """The model's quantization state, created (with its adapter's name) if it has none."""
    st = state_of(model)
    if st is None:
        st = QuantState(adapter=get_adapter(model).name)
        model.__dict__[STATE_ATTR] = st
    return st


__all__ = ["QuantState", "ensure_state", "state_of"]
