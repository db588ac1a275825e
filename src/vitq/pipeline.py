"""Run a recipe: wrap (adapter) -> insert quantizers (role rules) -> passes, in order."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .adapters import Adapter, get_adapter
from .batches import batch_images
from .bits import Bits
from .defaults import DEFAULT_BITS, DEFAULT_RECIPE, FAST_RECIPE
from .devices import DeviceLike, model_device
from .devices import resolve as resolve_device
from .errors import CalibrationError, ConfigError, DataError, ModelError
from .nn import calibrate, fake_quants
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


def calibration_tensor(data: CalibData) -> Tensor:
    """A calibration set (tensor, Dataset, DataLoader or iterable of batches) as one N,C,H,W tensor."""
    if isinstance(data, Tensor):
        return data
    xs = list(_iter_batches(data, 64))
    if not xs:
        raise ConfigError("a calibration set is empty: give each seed at least one calibration image")
    return torch.cat(xs)


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
    bits = Bits.parse(bits)
    recipe = load_recipe(recipe).at(bits)  # the rules of this width (``when``): the recipe the state records
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


def check_images(model: nn.Module, x: Tensor, what: str = "calibration") -> None:
    """Refuse, in one line, image batches the model cannot take: not a float tensor N,C,H,W in the
    weights' dtype, or another channel count / size than the model's (unless it accepts any size)."""
    adapter = get_adapter(model)
    if x.ndim != 4:
        raise DataError(f"{what} images must be N,C,H,W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{what} images are {str(x.dtype).removeprefix('torch.')}: vitq takes preprocessed float images "
                        "(normalised as the model expects): use vitq.data.Preprocess or the model's transform")
    w = next((p for p in model.parameters() if p.is_floating_point()), None)
    if w is not None and x.dtype != w.dtype:
        raise DataError(f"{what} images are {str(x.dtype).removeprefix('torch.')}, the model's weights "
                        f"{str(w.dtype).removeprefix('torch.')}: convert the images (x.to({str(w.dtype)}))")
    c, h, wd = adapter.data_config(model).input_size
    if x.shape[1] != c:
        raise DataError(f"{what} images have {x.shape[1]} channel(s), the model takes {c}: preprocess them as the "
                        "model expects (vitq.models.transforms(model) for image files)")
    if tuple(x.shape[2:]) != (h, wd) and not adapter.accepts_input_size(model, (int(x.shape[2]), int(x.shape[3]))):
        raise DataError(f"{what} images are {x.shape[2]}x{x.shape[3]}, the model takes {h}x{wd}: resize them "
                        "(vitq.data.Preprocess, or the model's own transform)")


def _first_batch(ctx: Context) -> Optional[Tensor]:
    """The first calibration batch (a one-pass iterator is kept as a list so the passes still see it all)."""
    data = ctx.calib
    if not isinstance(data, (Tensor, Dataset, DataLoader)) and iter(data) is data:  # type: ignore[arg-type]
        ctx.calib = data = list(data)  # type: ignore[arg-type]
    if isinstance(data, Tensor) and data.numel() == 0:
        return None
    return next(_iter_batches(data, ctx.batch_size), None)


def is_quantized(model: nn.Module) -> bool:
    """Quantized by vitq: prepared with a recipe and at least one quantizer calibrated (a model only prepared,
    its quantizers empty, is the structure a recipe or a checkpoint fills, and may be run again)."""
    st = state_of(model)
    return st is not None and st.recipe is not None and any(fq.ready for fq in fake_quants(model))


def refuse_quantized(model: nn.Module, what: str = "the model") -> None:
    """A model vitq already quantized is not quantized again (its quantizers would be replaced, and the float
    model it is judged against would be the quantized one): one line naming the fix."""
    st = state_of(model)
    if st is not None and st.recipe is not None and is_quantized(model):
        raise ModelError(f"{what} is already quantized (recipe {st.recipe.name}, {st.bits}): quantize the float model "
                         "(load it again, or copy.deepcopy it before quantizing)")


def run_recipe(model: nn.Module, recipe: "Recipe | str", ctx: Context) -> nn.Module:
    """Quantize the float ``model`` in place with ``recipe``: prepare, then every pass in order."""
    refuse_quantized(model)
    recipe = load_recipe(recipe).at(ctx.bits)
    model.eval()
    ctx.adapter = ctx.adapter or get_adapter(model)
    if not ctx.adapter.is_wrapped(model):
        ctx.adapter.check(model)  # what the adapter refuses is said before the images are checked against the model
    if recipe.passes:
        first = _first_batch(ctx)
        if first is not None:
            check_images(model, first)
    prepare(model, recipe, ctx.bits)
    if ctx.device is not None:
        ctx.device = resolve_device(ctx.device)
        model.to(ctx.device)  # the inserted quantizers too
    return run_passes(model, recipe.passes, ctx)


def quantize(model: nn.Module, recipe: "Recipe | str" = DEFAULT_RECIPE, bits: "Bits | str" = DEFAULT_BITS,
             calib_data: Optional[CalibData] = None, seed: int = 0, batch_size: int = 32,
             progress: bool = False, target: Optional[str] = None, device: DeviceLike = None) -> nn.Module:
    """One-call API: ``qmodel = vitq.quantize(model, "minmax", "W4A4", calib_images)`` (in place).

    The default recipe is the CLI's (``best``: calibration only at 6-8-bit activations, seconds; below that it
    reconstructs, minutes to hours on a CPU - a log line says so). A model vitq already quantized is refused
    (one line): quantize the float model.

    ``calib_data``: a tensor N,C,H,W, a Dataset, a DataLoader or any iterable of image tensors,
    ``(images, labels)`` pairs or ``{"pixel_values": ...}`` dicts. ``target="onnx"``: quantize for an
    integer runtime (:func:`vitq.recipes.for_target`: sites it has no integer kernel for get the nearest
    form it has, before calibration, so the simulated accuracy is the deployed one). ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a :class:`torch.device` (the model is moved there; default: where
    its parameters are)."""
    if not isinstance(model, nn.Module):
        hint = " (load it first: model, _ = vitq.load_model(name))" if isinstance(model, str) else ""
        raise ModelError(f"vitq.quantize takes an nn.Module, got {type(model).__name__}{hint}")
    if not isinstance(recipe, (str, Recipe)):
        raise ConfigError(f"recipe must be a recipe name, a YAML path or a Recipe, got {type(recipe).__name__} "
                          f"{recipe!r}: see vitq.list_recipes()")
    for name, v in (("seed", seed), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calib_data, str):
        raise DataError(f"calib_data is the string {calib_data!r}: pass image tensors (N,C,H,W), a DataLoader or "
                        "(images, labels) pairs; for a folder of images use vitq.data.calibration_images(DIR, "
                        "vitq.models.transforms(model))")
    refuse_quantized(model)
    default = recipe == DEFAULT_RECIPE
    recipe = load_recipe(recipe).at(bits)
    if default and any("iters" in get_pass(pc.name).options for pc in recipe.passes):
        log.warning("recipe %s (the default) at %s reconstructs: minutes on a GPU, tens of minutes to hours on a CPU; "
                    "recipe=%r takes seconds", recipe.name, Bits.parse(bits), FAST_RECIPE)
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


@contextmanager
def calibrating(model: nn.Module, recipe: "Recipe | str" = "minmax", bits: "Bits | str" = DEFAULT_BITS,
                seed: int = 0) -> Iterator[nn.Module]:
    """Quantize the float ``model`` in place from batches your own loop runs through it (as optimum-quanto's
    ``Calibration()``)::

        with vitq.calibrating(model, "percentile", "W8A8") as qmodel:
            for batch in my_loader:
                qmodel(batch)
        # qmodel is quantized here, as vitq.quantize(model, "percentile", "W8A8", calib_data=my_loader) makes it

    Inside the block the quantizers observe what flows and the outputs stay float; on exit every site gets its
    parameters. For recipes that only calibrate ranges (``minmax``, ``percentile``, ``omse``, ``fq``, ...);
    recipes with search or reconstruction passes need the images up front: :func:`quantize`."""
    refuse_quantized(model)
    r = load_recipe(recipe).at(bits)
    other = [pc.name for pc in r.passes if pc.name != "calibrate"]
    if other or len(r.passes) != 1:
        raise ConfigError(f"recipe {r.name} runs {', '.join(other) or 'no calibration'} beside the range calibration, "
                          "which needs the calibration images up front: use vitq.quantize(model, recipe, bits, "
                          "calib_data=...), or a calibration-only recipe (minmax, percentile, omse)")
    opts = r.passes[0].opts
    if opts.to_dict().get("upstream") != "float" or opts.to_dict().get("weights_only"):
        raise ConfigError(f"recipe {r.name} calibrates in one forward of all images (upstream: quantized): use "
                          "vitq.quantize(model, recipe, bits, calib_data=...)")
    model.eval()
    prepare(model, r, bits)
    with torch.no_grad(), calibrate(model, max_elements=int(opts.to_dict()["max_elements"]), seed=seed):
        yield model


__all__ = ["Context", "calibrating", "calibration_tensor", "is_quantized", "refuse_quantized", "QuantState", "manifest", "prepare", "quantize", "run_passes", "run_recipe", "state_of", "wrap"]
