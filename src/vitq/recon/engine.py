"""The reconstruction engine (AdaRound / BRECQ / QDrop / I&S-ViT style), unit by unit.

The model is reconstructed along ``Adapter.chain(model)`` cut into units by a :class:`Slicing`.
For unit U (pieces a..b) with float function F_U and quantized function F̂_U:

    min  E_x  loss(F̂_U(x̃), F_U(x_fp))  +  λ Σ_{w∈U} (1 − |2h(V_w) − 1|^β)

* x̃ is the input from the already-reconstructed quantized prefix, or (QDrop, ``qdrop_p < 1``) the
  element-wise mix ``where(rand < p, x_quant, x_fp)``; inside U every activation FakeQuant keeps
  its quantized value with probability p, else passes the float value (only while U trains).
* x_fp / the target come from a float copy of the model taken before any weight changed.
* Trainables, each a switch: AdaRound rounding variables V (``weights="adaround"``, Adam lr
  ``lr_round``), LSQ activation step sizes (``acts="lsq"``: the FakeQuant ``scale`` buffers are
  trained, Adam lr ``lr_act``, cosine), FP weights (``weights="fp"``, I&S-ViT mode: weight and
  bias of the unit's quantized layers, Adam lr ``lr_weight``, cosine, straight-through rounding).
* ``act_quant`` / ``weight_quant`` false switch every activation / weight FakeQuant off for the
  pass (I&S-ViT's stage 1 is ``weights="fp", acts="none", weight_quant=false``: activations
  quantized, weights float and trained; METHODS.md §1b(iv)).
* At the end of a unit AdaRound is hard-rounded (h = 1[V ≥ 0]) and the quantized weight is
  written into the layer's ``weight`` (it lies on the grid, so the unchanged weight FakeQuant maps
  it to itself and a saved model needs no extra state); LSQ scales stay in the ``scale`` buffers.

Caches are propagated incrementally: after U is done its quantized output on the calibration set
becomes the next unit's x_quant, its float target the next x_fp. They live in memory or stream
from disk (:mod:`vitq.recon.cache`) depending on the estimated size and ``max_cache_gb``. With a
``run_dir`` the state is saved after every unit (model state dict + the next unit's inputs), so a
killed run started again with the same arguments continues from the last finished unit and ends
with the same result.

Defaults follow the published settings (BRECQ / QDrop / MRECG configs, METHODS.md §2c, §5):
1024 calibration images, 20 000 iterations per unit, batch 32, λ = 0.01, β 20 → 2 after a 20 %
warm-up, AdaRound Adam lr 1e-3, activation-step lr 4e-5 with cosine decay.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..adapters import Adapter, Piece, get_adapter
from ..checkpoints import file_sha256, load_into, read_record
from ..devices import model_device
from ..errors import CalibrationError, ConfigError, check_field_types
from ..nn import FakeQuant, QuantSlots
from ..options import Options
from ..state import ensure_state
from .adaround import AdaRoundWeight, beta_at, round_loss
from .cache import ChunkStore, batch_schedule, chunk_bounds
from .losses import get_loss
from .slicing import Slicing, blocks_per_unit, describe_units

log = logging.getLogger(__name__)

WEIGHT_MODES = ("adaround", "fp", "none")
ACT_MODES = ("lsq", "none")
STATE_FILE = "state.pt"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class ReconConfig(Options):
    """Options of one reconstruction run (also the ``reconstruct`` pass options)."""

    slicing: str = "block"
    iters: int = 20000
    batch_size: int = 32
    num_samples: int = 1024
    weights: str = "adaround"
    acts: str = "lsq"
    act_quant: bool = True
    weight_quant: bool = True
    qdrop_p: float = 1.0
    loss: str = "mse"
    loss_p: float = 2.0
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    lr_weight: float = 4e-5
    chunk_size: int = 256
    max_cache_gb: float = 4.0
    run_dir: Optional[str] = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check_field_types(self)  # types first, so a string from a recipe or --set is a clear error
        Slicing.parse(self.slicing)
        get_loss(self.loss)

        need(isinstance(self.iters, int) and self.iters >= 0, f"iters must be an integer >= 0, got {self.iters!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(isinstance(self.num_samples, int) and self.num_samples >= 1,
             f"num_samples must be >= 1, got {self.num_samples!r}")
        need(isinstance(self.chunk_size, int) and self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size!r}")
        need(self.weights in WEIGHT_MODES, f"weights={self.weights!r}: use one of {', '.join(WEIGHT_MODES)}")
        need(self.acts in ACT_MODES, f"acts={self.acts!r}: use one of {', '.join(ACT_MODES)}")
        need(0.0 < float(self.qdrop_p) <= 1.0, f"qdrop_p={self.qdrop_p} must be in (0, 1]: 1.0 means no drop, QDrop uses 0.5")
        need(not (self.acts == "lsq" and not self.act_quant),
             "acts=lsq trains activation step sizes but act_quant is false: set act_quant true or acts none")
        need(not (self.weights == "adaround" and not self.weight_quant),
             "weights=adaround learns weight rounding but weight_quant is false: set weight_quant true or weights fp/none")
        need(not (self.qdrop_p < 1.0 and not self.act_quant), "qdrop_p < 1 needs act_quant true (QDrop drops activation quantization)")
        need(0.0 <= float(self.warmup) < 1.0, f"warmup={self.warmup} must be in [0, 1)")
        need(float(self.loss_p) > 0, f"loss_p={self.loss_p} must be > 0")
        need(float(self.max_cache_gb) >= 0, f"max_cache_gb={self.max_cache_gb} must be >= 0 (0 streams everything from disk)")
        for k in ("round_weight", "lr_round", "lr_act", "lr_weight"):
            need(float(getattr(self, k)) >= 0, f"{k}={getattr(self, k)} must be >= 0")

    @classmethod
    def from_options(cls, **opts: Any) -> "ReconConfig":
        try:
            return cls.parse(opts)
        except ConfigError as e:
            raise ConfigError(f"reconstruction: {e}") from None

    def with_(self, **kw: Any) -> "ReconConfig":
        return ReconConfig(**{**asdict(self), **kw})

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result (``max_cache_gb`` and ``run_dir`` do not)."""
        d = asdict(self)
        d.pop("max_cache_gb")
        d.pop("run_dir")
        return d


RECON_DEFAULTS: dict[str, Any] = ReconConfig.defaults()


# -- helpers ---------------------------------------------------------------------------------------
def float_copy(model: nn.Module, ctx: Any = None) -> nn.Module:
    """The float model whose outputs are the reconstruction targets: one copy per context
    (``ctx.fp_model``), taken by the first reconstruction pass (before any weight changed), every
    FakeQuant switched off."""
    if getattr(ctx, "fp_model", None) is not None:
        return ctx.fp_model
    fp = copy.deepcopy(model)
    for m in fp.modules():
        if isinstance(m, FakeQuant):
            m.enabled = False
    for p in fp.parameters():
        p.requires_grad_(False)
    fp.eval()
    if ctx is not None and hasattr(ctx, "fp_model"):
        ctx.fp_model = fp
    return fp


def collect_images(ctx: Any, n: int, desc: str = "reconstruct") -> Tensor:
    """The first ``n`` calibration images, on the CPU."""
    got, have = [], 0
    for x in ctx.calib_batches(desc=f"{desc}: read calibration"):
        x = x[: n - have].detach().to("cpu")
        got.append(x)
        have += x.shape[0]
        if have >= n:
            break
    if not got:
        raise CalibrationError("reconstruction needs calibration images: pass at least one")
    images = torch.cat(got)
    if images.shape[0] < n:
        log.info("reconstruction uses %d calibration images (num_samples=%d asked for more)", images.shape[0], n)
    return images


def run_pieces(pieces: Sequence[Piece], x: Tensor) -> Tensor:
    for p in pieces:
        x = p.fn(x)
    return x


def unit_modules(pieces: Sequence[Piece]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for p in pieces:
        for top in p.modules:
            for m in top.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


def act_sites(mods: Sequence[nn.Module]) -> list[FakeQuant]:
    return [m for m in mods if isinstance(m, FakeQuant) and m.kind == "act" and m.enabled]


def weight_slots(mods: Sequence[nn.Module], only: Optional[set[int]] = None) -> list[tuple[Any, str, FakeQuant]]:
    """``(layer, slot, FakeQuant)`` for every enabled weight quantizer of a unit (or, with ``only``,
    every one whose ``id`` is in it, enabled or not)."""
    out = []
    for m in mods:
        if isinstance(m, QuantSlots):
            for slot, _role, kind in m.slots():
                fq = getattr(m, slot, None)
                if kind == "weight" and isinstance(fq, FakeQuant) and (fq.enabled if only is None else id(fq) in only):
                    out.append((m, slot, fq))
    return out


def lsq_sites(mods: Sequence[nn.Module]) -> list[FakeQuant]:
    out: list[FakeQuant] = []
    skipped: list[FakeQuant] = []
    for fq in act_sites(mods):
        if fq.spec.dynamic or not bool(fq.initialized):
            continue
        (out if fq.spec.quantizer == "uniform" else skipped).append(fq)
    if skipped:
        log.info("LSQ trains uniform step sizes only; left as calibrated: %s", ", ".join(f.site for f in skipped))
    return out


@dataclass
class BatchShare:
    """Data-parallel reconstruction: this rank's rows ``[lo, hi)`` of an iteration's ``full``-image batch.
    Random QDrop masks are drawn for the whole batch (on every rank, from the same generator) and
    sliced, so every rank's draws are a single process's."""

    lo: int = 0
    hi: int = 0
    full: int = 0

    def draw(self, shape: torch.Size, gen: torch.Generator, device: torch.device) -> Tensor:
        span = self.hi - self.lo
        if span <= 0 or shape[0] % span:
            raise CalibrationError(f"reconstruction: a tensor of {shape[0]} rows for {span} images cannot be split "
                                   "across ranks; run this model's reconstruction in one process")
        k = shape[0] // span  # rows per image (Swin: windows per image)
        return torch.rand((self.full * k, *shape[1:]), generator=gen, device=device)[self.lo * k:self.hi * k]


def qdrop_mix(quant: Tensor, fp: Tensor, p: float, gen: torch.Generator, share: Optional[BatchShare] = None) -> Tensor:
    """QDrop's element-wise mix: ``quant`` where a uniform draw is below ``p``, else ``fp``.

    The values and gradients are exactly those of ``torch.where(torch.rand(...) < p, quant, fp)`` (the
    same draws from ``gen``), computed with float ops only: the keep mask is ``ceil(p - r)``, which is
    1 exactly when r < p (for r in [0, 1) and p in (0, 1]), and ``torch.lerp`` with a 0/1 weight returns
    one of its two ends exactly (for finite inputs; an infinite one would give NaN). On the CPU
    ``torch.where`` with a bool mask (and its backward) is 20-50x slower than a multiply at these sizes
    (bench/results/recon_speed.md)."""
    if share is None:
        r = torch.rand(quant.shape, generator=gen, device=quant.device)  # float32 draws, as before, whatever the dtype
    else:
        r = share.draw(quant.shape, gen, quant.device)
    keep = torch.ceil(r.neg_().add_(p)).to(quant.dtype)  # r < p <=> p - r > 0 <=> ceil(p - r) == 1, as p - r in (-1, 1]
    return torch.lerp(fp, quant, keep)


@contextmanager
def qdrop(sites: Sequence[FakeQuant], p: float, gen: torch.Generator,
          share: Optional[BatchShare] = None) -> Iterator[None]:
    """QDrop inside a unit: every activation FakeQuant keeps its quantized value element-wise with
    probability ``p``, else passes the float input. On only inside the block."""
    if not sites:
        yield
        return

    def hook(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return qdrop_mix(out, inp[0], p, gen, share)

    handles = [fq.register_forward_hook(hook) for fq in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _all_reduce_grads(params: Sequence[Tensor], loss: Tensor) -> Tensor:
    """Sum every rank's gradients (each already weighted by its share of the batch) and loss, in one
    collective; returns the batch loss."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype if grads else loss.dtype)])
    distributed.all_reduce_(flat, "sum")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return flat[-1]


def _seed(base: int, unit: int, salt: int) -> int:
    return (int(base) * 1_000_003 + unit * 7919 + salt) % (2 ** 62)


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of a reconstruction checkpoint's content: its counters, fingerprint, report, the digests of
    its cached inputs and every model tensor's dtype, shape and bytes (not the file, which holds it)."""
    h = hashlib.sha256(json.dumps({k: state[k] for k in ("done", "chunks", "fingerprint", "report", "inputs")},
                                  sort_keys=True).encode())
    for name in sorted(state["model"]):
        t = state["model"][name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_state(state_p: Path, run_dir: Path, key: str) -> dict[str, Any]:
    """The checkpoint of ``run_dir``, checked against its content digest and its inputs' digests; a
    truncated, damaged or edited state is a one-line refusal naming the file."""
    fix = f"delete {run_dir} to start over, or pass another --resume-dir"
    try:
        state = torch.load(state_p, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and state.get("digest") == state_digest(state)
    except Exception as e:  # noqa: BLE001  (a damaged zip / pickle raises many kinds; all mean the same here)
        raise ConfigError(f"{state_p} is unreadable ({type(e).__name__}: truncated or damaged): {fix}") from None
    if not ok:
        raise ConfigError(f"{state_p} does not match its content digest (changed or damaged since it was written): {fix}")
    if state["fingerprint"] != key:
        raise ConfigError(f"{state_p} belongs to a different run (other options, model or data): {fix}")
    for name, digest in state["inputs"].items():
        f = run_dir / "inputs" / name
        if not f.is_file() or file_sha256(f) != digest:
            raise ConfigError(f"{f} is {'missing' if not f.is_file() else 'changed or damaged'}: {fix}")
    return state


def _fingerprint(cfg: ReconConfig, chain: Sequence[Piece], units: Sequence[tuple[int, int]], images: Tensor,
                 model: nn.Module, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.fingerprint(), sort_keys=True, default=str).encode())
    h.update(json.dumps([p.name for p in chain]).encode())
    h.update(json.dumps([list(u) for u in units]).encode())
    h.update(str(seed).encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(float(images.float().sum().item()).hex().encode())
    h.update(float(images.float().pow(2).sum().item()).hex().encode())
    for k, v in model.state_dict().items():  # the calibrated starting point
        if v.is_floating_point() and v.numel():
            h.update(k.encode())
            h.update(v.float().sum().item().hex().encode())
    return h.hexdigest()[:16]


# -- size estimate ---------------------------------------------------------------------------------
@torch.no_grad()
def boundary_shapes(chain: Sequence[Piece], sample: Tensor) -> list[tuple[int, ...]]:
    """Per-sample shape of the input of every piece, plus the chain output (len(chain) + 1)."""
    x = sample[:1]
    shapes = [tuple(x.shape[1:])]
    for p in chain:
        x = p.fn(x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def estimate_cache_bytes(shapes: Sequence[tuple[int, ...]], units: Sequence[tuple[int, int]], n: int,
                         with_grad: bool, itemsize: int = 4) -> int:
    """Bytes of the caches held while the largest unit runs: quantized and float inputs, the
    float target (and the Fisher weights), for ``n`` samples."""
    best = 0
    for a, b in units:
        x_in = math.prod(shapes[a])
        y_out = math.prod(shapes[b])
        n_in = 1 if a == 0 else 2  # the first unit's quantized and float inputs are the same images
        best = max(best, n_in * x_in + (2 if with_grad else 1) * y_out)
    return best * n * itemsize


# -- the engine ------------------------------------------------------------------------------------
class Reconstructor:
    """One reconstruction run over a model. ``run()`` returns a JSON-able report."""

    def __init__(self, model: nn.Module, cfg: ReconConfig, images: Tensor, fp_model: nn.Module,
                 adapter: Optional[Adapter] = None, seed: int = 0, progress: bool = False,
                 name: str = "reconstruct") -> None:
        self.model, self.cfg, self.fp = model, cfg, fp_model
        self.adapter = adapter or get_adapter(model)
        self.seed, self.progress, self.name = seed, progress, name
        self.images = images
        self.chain = self.adapter.chain(model)
        self.fp_chain = self.adapter.chain(fp_model)
        if [p.name for p in self.chain] != [p.name for p in self.fp_chain]:
            raise ConfigError("the float copy and the quantized model have different chains: reconstruct a copy "
                              "made by vitq.recon.float_copy of the same prepared model")
        self.slicing = Slicing.parse(cfg.slicing)
        self.units = self.slicing.units(self.chain)
        self.unit_names = describe_units(self.chain, self.units)
        self.loss = get_loss(cfg.loss)
        self.device = model_device(model)

    # -- plumbing -------------------------------------------------------------------------------
    def _store(self) -> tuple[ChunkStore, Optional[Path], int]:
        shapes = boundary_shapes(self.fp_chain, self.images.to(self.device))
        est = estimate_cache_bytes(shapes, self.units, self.images.shape[0], self.loss.needs_grad)
        self.estimate_bytes = est
        budget = float(self.cfg.max_cache_gb) * 1e9
        if est <= budget:
            log.info("%s: cache estimate %.3f GB fits max_cache_gb=%g: in memory", self.name, est / 1e9,
                     self.cfg.max_cache_gb)
            return ChunkStore(None), None, est
        if self.cfg.run_dir:
            d = Path(self.cfg.run_dir) / "cache"
            tmp = None
        else:
            tmp = Path(tempfile.mkdtemp(prefix="vitq-recon-"))
            d = tmp
        log.info("%s: cache estimate %.3f GB exceeds max_cache_gb=%g: streaming chunks from %s", self.name,
                 est / 1e9, self.cfg.max_cache_gb, d)
        return ChunkStore(d), tmp, est

    def _chunks(self, t: Tensor) -> list[Tensor]:
        return [t[a:b] for a, b in chunk_bounds(t.shape[0], self.cfg.chunk_size)]

    def _to(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        store, tmp, est = self._store()
        n_chunks = len(chunk_bounds(self.images.shape[0], cfg.chunk_size))
        run_dir = Path(cfg.run_dir) if cfg.run_dir else None
        report: dict[str, Any] = {
            "pass": self.name, "slicing": str(self.slicing), "units": len(self.units),
            "blocks_per_unit": round(blocks_per_unit(self.chain, self.units), 3),
            "unit_names": self.unit_names, "config": asdict(cfg), "num_samples": int(self.images.shape[0]),
            "cache_estimate_gb": round(est / 1e9, 4), "cache_on_disk": store.on_disk, "unit_reports": [],
        }
        saved_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        saved_act = [(fq, fq.enabled) for fq in self.model.modules() if isinstance(fq, FakeQuant) and fq.kind == "act"]
        saved_w = [(fq, fq.enabled) for fq in self.model.modules() if isinstance(fq, FakeQuant) and fq.kind == "weight"]
        self._weight_sites = {id(fq) for fq, e in saved_w if e}  # the layers weights="fp" trains
        try:
            for p, _ in saved_grad:
                p.requires_grad_(False)
            if not cfg.act_quant:
                for fq, _ in saved_act:
                    fq.enabled = False
            if not cfg.weight_quant:
                for fq, _ in saved_w:
                    fq.enabled = False
            start = 0
            fp_key = _fingerprint(cfg, self.chain, self.units, self.images, self.model, self.seed) if run_dir else ""
            if run_dir is not None:
                start = self._resume(run_dir, fp_key, store, report)
            if start == 0:
                for i, c in enumerate(self._chunks(self.images)):
                    store.put("xq", i, c)
                    store.put("xf", i, c)
            if start < len(self.units):
                log.info("%s: %d units (%s), %d iterations each, %d samples", self.name, len(self.units),
                         self.slicing, cfg.iters, self.images.shape[0])
            for u in range(start, len(self.units)):
                rep = self._unit(u, store)
                report["unit_reports"].append(rep)
                if run_dir is not None:
                    self._checkpoint(run_dir, fp_key, u, store, n_chunks, report)
        finally:
            for p, g in saved_grad:
                p.requires_grad_(g)
            for fq, e in (*saved_act, *saved_w):
                fq.enabled = e
            store.close()
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - t_start, 3)
        return report

    # -- resumability ---------------------------------------------------------------------------
    def _resume(self, run_dir: Path, key: str, store: ChunkStore, report: dict[str, Any]) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_p, state_p = run_dir / RUN_FILE, run_dir / STATE_FILE
        if meta_p.is_file():
            meta = read_record(meta_p, f"delete {run_dir} to start over, or pass another --resume-dir")
            if meta.get("fingerprint") != key:
                raise ConfigError(f"run directory {run_dir} holds a different run (other options, model or data): "
                                  "pass another --resume-dir or delete that folder")
        elif distributed.is_main():  # one writer under torchrun
            meta_p.write_text(json.dumps({"fingerprint": key, "pass": self.name, "slicing": str(self.slicing),
                                          "units": self.unit_names, "config": asdict(self.cfg)}, indent=2) + "\n")
        if not state_p.is_file():
            return 0
        state = _read_state(state_p, run_dir, key)
        done = int(state["done"])
        load_into(self.model, state["model"], f"reconstruction state {state_p}")
        report["unit_reports"] = json.loads(state["report"])["unit_reports"]
        report["resumed_from_unit"] = done
        if done < len(self.units):
            n = int(state["chunks"])
            store.load_stream("xq", run_dir / "inputs", f"xq-{done:04d}", n)
            store.load_stream("xf", run_dir / "inputs", f"xf-{done:04d}", n)
            log.info("%s: resuming from %s after %d finished unit(s)", self.name, run_dir, done)
        else:
            log.info("%s: %s holds a finished run: loaded its result", self.name, run_dir)
        return done

    def _checkpoint(self, run_dir: Path, key: str, u: int, store: ChunkStore, n_chunks: int,
                    report: dict[str, Any]) -> None:
        if not distributed.is_main():  # one writer under torchrun; every rank holds the same state
            return
        done = u + 1
        inputs = run_dir / "inputs"
        if done < len(self.units):
            store.save_stream("xq", inputs, f"xq-{done:04d}")
            store.save_stream("xf", inputs, f"xf-{done:04d}")
        state: dict[str, Any] = {
            "done": done, "chunks": n_chunks, "fingerprint": key,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "report": json.dumps({"unit_reports": report["unit_reports"]}),
            "inputs": {f.name: file_sha256(f) for f in sorted(inputs.glob(f"x?-{done:04d}-*.pt"))}
            if done < len(self.units) else {}}
        state["digest"] = state_digest(state)
        tmp = run_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, run_dir / STATE_FILE)  # atomic: a kill leaves the previous state or this one
        for f in inputs.glob(f"x?-{u:04d}-*.pt") if inputs.exists() else []:
            f.unlink(missing_ok=True)

    # -- one unit -------------------------------------------------------------------------------
    def _unit(self, u: int, store: ChunkStore) -> dict[str, Any]:
        cfg = self.cfg
        a, b = self.units[u]
        pieces, fp_pieces = self.chain[a:b], self.fp_chain[a:b]
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, xf in enumerate(store.chunks("xf")):
                store.put("y", i, run_pieces(fp_pieces, self._to(xf)))
        if self.loss.needs_grad:
            for i, xq in enumerate(store.chunks("xq")):
                store.put("g", i, self._output_grads(b, pieces, self._to(xq), self._to(store.get("y", i))))
        before = self._full_loss(pieces, store)
        mods = unit_modules(pieces)
        trained = self._train(u, pieces, mods, store) if cfg.iters > 0 else {"adaround": 0, "lsq": 0, "fp_weights": 0}
        # propagate: this unit's quantized output is the next unit's input, its target the next float input
        after, n = 0.0, 0
        with torch.no_grad():
            for i, xq in enumerate(store.chunks("xq")):
                out = run_pieces(pieces, self._to(xq))
                y = self._to(store.get("y", i))
                g = self._to(store.get("g", i)) if self.loss.needs_grad else None
                after += float(self.loss.fn(out, y, g, float(cfg.loss_p))) * out.shape[0]
                n += out.shape[0]
                store.put("xq", i, out)
        store.rename("y", "xf")
        store.drop("g")
        rep = {"unit": self.unit_names[u], "pieces": [a, b], "iters": cfg.iters, **trained,
               "loss_before": before, "loss_after": after / max(n, 1),
               "seconds": round(time.perf_counter() - t0, 3)}
        log.info("%s unit %d/%d %s: loss %.5g -> %.5g (%.1fs)", self.name, u + 1, len(self.units),
                 rep["unit"], before, rep["loss_after"], rep["seconds"])
        return rep

    @torch.no_grad()
    def _full_loss(self, pieces: Sequence[Piece], store: ChunkStore) -> float:
        tot, n = 0.0, 0
        for i, xq in enumerate(store.chunks("xq")):
            out = run_pieces(pieces, self._to(xq))
            g = self._to(store.get("g", i)) if self.loss.needs_grad else None
            tot += float(self.loss.fn(out, self._to(store.get("y", i)), g, float(self.cfg.loss_p))) * out.shape[0]
            n += out.shape[0]
        return tot / max(n, 1)

    def _output_grads(self, end: int, pieces: Sequence[Piece], xq: Tensor, y: Tensor) -> Tensor:
        """BRECQ's Fisher weights ``|∂KL/∂out| + 1``: KL(softmax(FP logits) ‖ log-softmax(logits))
        where the logits come from the quantized prefix + unit followed by the float suffix;
        per mini-batch of ``batch_size`` with ``batchmean`` as in the released code."""
        suffix = self.fp_chain[end:]
        grads = []
        for s in range(0, xq.shape[0], self.cfg.batch_size):
            with torch.no_grad():
                out = run_pieces(pieces, xq[s:s + self.cfg.batch_size])
                target = F.softmax(run_pieces(suffix, y[s:s + self.cfg.batch_size]), dim=-1)
            out = out.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = run_pieces(suffix, out)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean")
                (g,) = torch.autograd.grad(kl, out)
            grads.append(g.abs() + 1.0)
        return torch.cat(grads)

    def _train(self, u: int, pieces: Sequence[Piece], mods: Sequence[nn.Module], store: ChunkStore) -> dict[str, Any]:
        cfg = self.cfg
        ada: list[tuple[nn.Module, str, FakeQuant, AdaRoundWeight]] = []
        if cfg.weights == "adaround":
            for layer, slot, fq in weight_slots(mods):
                mode = AdaRoundWeight(fq, layer.weight).to(self.device)
                setattr(layer, slot, mode)
                ada.append((layer, slot, fq, mode))
        fp_params: list[nn.Parameter] = []
        if cfg.weights == "fp":
            for layer, _slot, _fq in weight_slots(mods, only=self._weight_sites):
                fp_params += [p for p in (layer.weight, getattr(layer, "bias", None)) if isinstance(p, nn.Parameter)]
        scales = [fq.scale for fq in lsq_sites(mods)] if cfg.acts == "lsq" else []
        counts: dict[str, Any] = {"adaround": len(ada), "lsq": len(scales), "fp_weights": len(fp_params)}
        if not ada and not fp_params and not scales:
            return counts
        for t in (*scales, *fp_params):
            t.requires_grad_(True)
        opts: list[torch.optim.Optimizer] = []
        scheds: list[Any] = []
        if ada:
            opts.append(torch.optim.Adam([m.v for *_, m in ada], lr=cfg.lr_round))
        for group, lr in ((scales, cfg.lr_act), (fp_params, cfg.lr_weight)):
            if group:
                opt = torch.optim.Adam(group, lr=lr)
                opts.append(opt)
                scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0))
        gen = torch.Generator().manual_seed(_seed(self.seed, u, 1))
        dev_gen = torch.Generator(device=self.device).manual_seed(_seed(self.seed, u, 2))
        lens = [b - a for a, b in chunk_bounds(self.images.shape[0], cfg.chunk_size)]
        warm_iters = cfg.warmup * cfg.iters
        losses: list[float] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iters, desc=f"{self.name} {u + 1}/{len(self.units)} {self.unit_names[u]}",
                       unit="it", leave=False)
        cur_c, cur = -1, None
        t_train = time.perf_counter()
        share = BatchShare() if distributed.active() else None
        trained = [*(m.v for *_, m in ada), *scales, *fp_params]
        try:
            drop = qdrop(act_sites(mods), float(cfg.qdrop_p), dev_gen, share) if cfg.qdrop_p < 1.0 else nullcontext()
            with torch.enable_grad(), drop:
                for it, (c, idx) in enumerate(batch_schedule(lens, cfg.iters, cfg.batch_size, gen)):
                    if c != cur_c:
                        cur_c = c
                        cur = tuple(self._to(store.get(s, c)) if store.has(s) else None
                                    for s in ("xq", "xf", "y", "g"))
                    assert cur is not None and cur[0] is not None and cur[2] is not None
                    xq, xf, y, g = cur
                    assert xq is not None and y is not None
                    weight = 1.0
                    if share is not None:  # data parallel: this rank's rows of the batch, its share of the mean
                        part = distributed.shard_range(len(idx))
                        if len(part) == 0:
                            raise ConfigError(f"a reconstruction batch of {len(idx)} images cannot be split over "
                                              f"{distributed.world()} ranks: use batch_size >= the number of ranks")
                        share.lo, share.hi, share.full = part.start, part.stop, len(idx)
                        weight = len(part) / len(idx)
                        idx = idx[part.start:part.stop]
                    dev_idx = idx.to(self.device)
                    x = xq[dev_idx]
                    if cfg.qdrop_p < 1.0:
                        assert xf is not None
                        x = qdrop_mix(x, xf[dev_idx], float(cfg.qdrop_p), dev_gen, share)
                    out = run_pieces(pieces, x)
                    rec = self.loss.fn(out, y[dev_idx], None if g is None else g[dev_idx], float(cfg.loss_p))
                    total = rec * weight if share is not None else rec
                    if ada and it >= warm_iters and cfg.round_weight > 0 and distributed.is_main():
                        beta = beta_at(it, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
                        total = total + cfg.round_weight * sum(round_loss(m.v, beta) for *_, m in ada)
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    total.backward()
                    if share is not None:
                        rec = _all_reduce_grads(trained, rec.detach() * weight)
                    for o in opts:
                        o.step()
                    for s in scheds:
                        s.step()
                    if scales:
                        with torch.no_grad():
                            for t in scales:
                                t.clamp_(min=1e-8)
                    losses.append(float(rec.detach()))
                    if bar is not None:
                        bar.update(1)
                        if it % 50 == 0 or it == cfg.iters - 1:
                            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        finally:
            if bar is not None:
                bar.close()
            with torch.no_grad():
                for layer, slot, fq, mode in ada:  # hard rounding, folded into the weight
                    w = cast(Tensor, layer.weight)
                    w.copy_(mode.hard_weight(w))
                    setattr(layer, slot, fq)
            for t in (*scales, *fp_params):
                t.requires_grad_(False)
                t.grad = None
        counts["train_seconds"] = round(time.perf_counter() - t_train, 4)
        k = max(1, min(50, len(losses) // 10 or 1))
        counts["train_loss_first"] = sum(losses[:k]) / k if losses else None
        counts["train_loss_last"] = sum(losses[-k:]) / k if losses else None
        return counts


def reconstruct(model: nn.Module, cfg: ReconConfig, ctx: Any, images: Optional[Tensor] = None,
                fp_model: Optional[nn.Module] = None, name: str = "reconstruct") -> dict[str, Any]:
    """Reconstruct ``model`` (prepared and calibrated) in place; returns the run report and appends
    it to the model's :class:`~vitq.state.QuantState` (``reconstruction``)."""
    fp = fp_model if fp_model is not None else float_copy(model, ctx)
    if images is None:
        images = collect_images(ctx, cfg.num_samples, desc=name)
    r = Reconstructor(model, cfg, images, fp, adapter=getattr(ctx, "adapter", None), seed=int(getattr(ctx, "seed", 0)),
                      progress=bool(getattr(ctx, "progress", False)), name=name)
    report = r.run()
    ensure_state(model).reconstruction.append(report)
    return report
