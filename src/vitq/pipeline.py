"""Run a recipe: wrap (adapter) -> insert quantizers (role rules) -> passes, in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .adapters import Adapter, get_adapter
from .batches import batch_images
from .bits import Bits
from .devices import DeviceLike, model_device
from .devices import resolve as resolve_device
from .errors import CalibrationError, DataError
from .passes import get_pass
from .passes.quantize import insert_quantizers, manifest
from .recipes import PassConfig, Recipe, for_target, load_recipe
from .state import QuantState, ensure_state, state_of

log = logging.getLogger(__name__)

CalibData = Union[Tensor, Dataset, DataLoader, Iterable[Any]]


@dataclass
class Context:
    """One run of a recipe: what passes may use (calibration data, bits, seed, device, progress
    bars, the adapter) and the run's scratch (``fp_model``: the float copy reconstruction targets
    come from, taken by the first reconstruction pass; ``recon_passes``: reconstruction passes run
    so far, which numbers their resume folders)."""

    calib: CalibData
    bits: Bits
    seed: int = 0
    batch_size: int = 32
    device: Optional[torch.device] = None
    progress: bool = False
    adapter: Optional[Adapter] = None
    fp_model: Optional[nn.Module] = None
    recon_passes: int = 0

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
    """Image batches of calibration data: a tensor N,C,H,W, a Dataset, a DataLoader, or any iterable
    of image tensors, ``(images, labels)`` pairs or ``{"pixel_values": ...}`` dicts."""
    if isinstance(data, Tensor):
        if data.ndim != 4:
            raise DataError(f"calibration tensor must be N,C,H,W, got shape {tuple(data.shape)}")
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size)
    for b in data:  # type: ignore[union-attr]
        x = batch_images(b)
        yield x.unsqueeze(0) if x.ndim == 3 else x  # an iterable of single images


def wrap(model: nn.Module) -> nn.Module:
    """Swap in our quantizable modules (in place) and give the model its quantization state. The
    result equals the float model."""
    adapter = get_adapter(model)
    if not adapter.is_wrapped(model):
        adapter.wrap(model)
    ensure_state(model)
    return model


def prepare(model: nn.Module, recipe: "Recipe | str", bits: "Bits | str") -> nn.Module:
    """Wrap and insert the recipe's (uncalibrated) quantizers: the structure a checkpoint loads into."""
    recipe, bits = load_recipe(recipe), Bits.parse(bits)
    training = model.training
    wrap(model)
    insert_quantizers(model, recipe, bits)
    model.train(training)  # swapped-in modules are made in training mode: give them the model's mode
    st = ensure_state(model)
    st.recipe, st.bits = recipe, bits
    return model


def run_passes(model: nn.Module, passes: Sequence[PassConfig], ctx: Context) -> nn.Module:
    """Run recipe steps on a prepared model, each with its validated options object."""
    for pc in passes:
        log.info("pass %s %s", pc.name, dict(pc.options) or "")
        get_pass(pc.name).fn(model, ctx, pc.opts)
    return model


def run_recipe(model: nn.Module, recipe: "Recipe | str", ctx: Context) -> nn.Module:
    """Quantize ``model`` in place with ``recipe``: prepare, then every pass in order."""
    recipe = load_recipe(recipe)
    model.eval()
    ctx.adapter = ctx.adapter or get_adapter(model)
    prepare(model, recipe, ctx.bits)
    if ctx.device is not None:
        ctx.device = resolve_device(ctx.device)
        model.to(ctx.device)  # the inserted quantizers too
    return run_passes(model, recipe.passes, ctx)


def quantize(model: nn.Module, recipe: "Recipe | str" = "minmax", bits: "Bits | str" = "W8A8",
             calib_data: Optional[CalibData] = None, seed: int = 0, batch_size: int = 32,
             progress: bool = False, target: Optional[str] = None, device: DeviceLike = None) -> nn.Module:
    """One-call API: ``qmodel = vitq.quantize(model, "minmax", "W4A4", calib_images)`` (in place).

    ``calib_data``: a tensor N,C,H,W, a Dataset, a DataLoader or any iterable of image tensors,
    ``(images, labels)`` pairs or ``{"pixel_values": ...}`` dicts. ``target="onnx"``: quantize for an
    integer runtime (:func:`vitq.recipes.for_target`: sites it has no integer kernel for get the nearest
    form it has, before calibration, so the simulated accuracy is the deployed one). ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a :class:`torch.device` (the model is moved there; default: where
    its parameters are)."""
    recipe = load_recipe(recipe)
    if target is not None:
        recipe, changes = for_target(recipe, bits, target)
        for line in changes:
            log.info("target %s: %s", target, line)
    needs_data = len(recipe.passes) > 0
    if calib_data is None and needs_data:
        raise CalibrationError(f"recipe {recipe.name} needs calibration data: pass calib_data (images N,C,H,W or a DataLoader)")
    dev = resolve_device(device) if device is not None else model_device(model)
    ctx = Context(calib=calib_data if calib_data is not None else torch.empty(0, 1, 1, 1), bits=Bits.parse(bits),
                  seed=seed, batch_size=batch_size, progress=progress, device=dev)
    return run_recipe(model, recipe, ctx)


__all__ = ["Context", "QuantState", "manifest", "prepare", "quantize", "run_passes", "run_recipe", "state_of", "wrap"]
