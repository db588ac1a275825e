"""Run a recipe: wrap (adapter) -> insert quantizers (role rules) -> passes, in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .adapters import Adapter, get_adapter
from .bits import Bits
from .errors import CalibrationError, DataError
from .passes.quantize import insert_quantizers, manifest
from .passes.registry import get_pass
from .recipes import Recipe, load_recipe

log = logging.getLogger(__name__)

CalibData = Union[Tensor, Dataset, DataLoader, Iterable[Tensor]]


@dataclass
class Context:
    """What passes may use: calibration data, bits, seed, device, progress bars."""

    calib: CalibData
    bits: Bits
    seed: int = 0
    batch_size: int = 32
    device: Optional[torch.device] = None
    progress: bool = False
    adapter: Optional[Adapter] = None
    extras: dict[str, Any] = field(default_factory=dict)

    def calib_batches(self, desc: str = "calibrate") -> Iterator[Tensor]:
        batches = list(_iter_batches(self.calib, self.batch_size))
        if not batches:
            raise CalibrationError("the calibration set is empty: pass at least one calibration image")
        it: Iterable[Tensor] = batches
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc=desc, unit="batch", leave=False)
        for x in it:
            yield x if self.device is None else x.to(self.device)


def _iter_batches(data: CalibData, batch_size: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        if data.ndim != 4:
            raise DataError(f"calibration tensor must be N,C,H,W, got shape {tuple(data.shape)}")
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size)
    for b in data:  # type: ignore[union-attr]
        yield b[0] if isinstance(b, (tuple, list)) else b


def wrap(model: nn.Module) -> nn.Module:
    """Swap in our quantizable modules (in place). The result equals the float model."""
    get_adapter(model).wrap(model)
    model.vitq_wrapped = True
    return model


def prepare(model: nn.Module, recipe: "Recipe | str", bits: "Bits | str") -> nn.Module:
    """Wrap and insert the recipe's (uncalibrated) quantizers: the structure a checkpoint loads into."""
    recipe, bits = load_recipe(recipe), Bits.parse(bits)
    if not getattr(model, "vitq_wrapped", False):
        wrap(model)
    insert_quantizers(model, recipe, bits)
    model.vitq_recipe = recipe
    model.vitq_bits = bits
    return model


def run_recipe(model: nn.Module, recipe: "Recipe | str", ctx: Context) -> nn.Module:
    """Quantize ``model`` in place with ``recipe``: prepare, then every pass in order."""
    recipe = load_recipe(recipe)
    model.eval()
    ctx.adapter = ctx.adapter or get_adapter(model)
    prepare(model, recipe, ctx.bits)
    for pc in recipe.passes:
        info = get_pass(pc.name)
        log.info("pass %s %s", pc.name, dict(pc.options) or "")
        info.fn(model, ctx, **dict(pc.options))
    return model


def quantize(model: nn.Module, recipe: "Recipe | str" = "minmax", bits: "Bits | str" = "W8A8",
             calib_data: Optional[CalibData] = None, seed: int = 0, batch_size: int = 32,
             progress: bool = False) -> nn.Module:
    """One-call API: ``qmodel = vitq.quantize(model, "minmax", "W4A4", calib_images)`` (in place)."""
    recipe = load_recipe(recipe)
    needs_data = len(recipe.passes) > 0
    if calib_data is None and needs_data:
        raise CalibrationError(f"recipe {recipe.name} needs calibration data: pass calib_data (images N,C,H,W or a DataLoader)")
    ctx = Context(calib=calib_data if calib_data is not None else torch.empty(0, 1, 1, 1), bits=Bits.parse(bits),
                  seed=seed, batch_size=batch_size, progress=progress)
    return run_recipe(model, recipe, ctx)


__all__ = ["Context", "manifest", "prepare", "quantize", "run_recipe", "wrap"]
