"""AOCQ framework level, stage 1: refine every unit's activation scales s0 -> s4, weights in float.

The seed's Figure 1 caption is the only primary statement: "In the first stage, the quantization
scale s_0 of activation is iteratively refined to s_4 through successive optimization steps. After
that, the rounding direction of the weights is optimized in the second stage." How each step
refines the scale is not known; this is our reconstruction [R] (METHODS.md §4b, the coordinate
variant):

    for every unit U of the chain (default slicing: one transformer block; embed / head alone):
        x̃ = output of the already refined quantized prefix (activations quantized, weights float)
        y = F_U(x_fp)                                                  (float target)
        for t = 1..steps (4):   δ_t = span · shrink^(t-1) octaves
            for every activation quantizer q of U, in chain order (coordinate sweep):
                s_q <- argmin_{f ∈ {2^(δ_t k / points)}, k = -points..points}  (points = 2: 5 candidates)  L(F̂_U(x̃; s_q · f), y)
        s4 frozen; x̃ <- F̂_U(x̃)

``L`` is a registered reconstruction loss (default ``token_norm``, AOCQ's loss level). The current
scale is always a candidate (k = 0) and a change is kept only if it lowers ``L`` on the search
sample, so every step is monotone: ``L(s4) <= ... <= L(s0)``. Only a quantizer's ``scale``
parameter moves (the zero point stays, so the representable range stretches or shrinks about 0);
sites without a ``scale`` (or dynamic per-token ones) keep their calibrated parameters. Stage 2 is
the shared engine's ``reconstruct`` pass (AdaRound, ``acts: none``), not code here.

The alternative reading - four short gradient (LSQ) epochs - is the engine's ``acts: lsq`` with
``weight_quant: false``; it does not guarantee monotonicity, which is why the search is the default.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..adapters import Piece, get_adapter
from ..errors import CalibrationError, ConfigError, check_field_types
from ..nn import FakeQuant, fake_quants
from ..options import Options
from ..recon.engine import act_sites, collect_images, float_copy, model_device, run_pieces, unit_modules
from ..recon.losses import get_loss
from ..recon.slicing import Slicing, describe_units
from ..state import ensure_state
from .registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleSearchConfig(Options):
    """Options of ``aocq_act_scales`` (all [R], see the module docstring)."""

    steps: int = 4
    points: int = 2
    span: float = 1.0
    shrink: float = 0.5
    num_samples: int = 256
    batch_size: int = 64
    slicing: str = "block"
    loss: str = "token_norm"
    loss_p: float = 2.0
    weights_float: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"aocq_act_scales: {msg}")

        check_field_types(self, "aocq_act_scales")
        for k in ("steps", "points", "num_samples", "batch_size"):
            v = getattr(self, k)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= (0 if k == "steps" else 1),
                 f"{k}={v!r} must be an integer >= {0 if k == 'steps' else 1}")
        need(float(self.span) > 0, f"span={self.span} must be > 0 (octaves)")
        need(0 < float(self.shrink) <= 1, f"shrink={self.shrink} must be in (0, 1]")
        need(float(self.loss_p) > 0, f"loss_p={self.loss_p} must be > 0")
        Slicing.parse(self.slicing)
        if get_loss(self.loss).needs_grad:
            raise ConfigError(f"aocq_act_scales: loss {self.loss!r} needs output gradients: use mse or token_norm")


# -- pure pieces ----------------------------------------------------------------------------------
def step_factors(step: int, points: int, span: float, shrink: float) -> list[float]:
    """Multipliers tried at step ``step`` (0-based): ``2^(δ k / points)``, ``δ = span · shrink^step``,
    ``k = ±1 .. ±points`` (the current scale, k = 0, is the incumbent)."""
    d = float(span) * float(shrink) ** step
    return [2.0 ** (d * k / points) for k in range(-points, points + 1) if k != 0]


def searchable(fq: FakeQuant) -> bool:
    return (fq.kind == "act" and fq.enabled and not fq.spec.dynamic and bool(fq.initialized)
            and "scale" in fq.quantizer.param_names)


@torch.no_grad()
def coordinate_search(sites: Sequence[FakeQuant], loss_fn: Callable[[int], float], steps: int, points: int,
                      span: float, shrink: float, changed: Optional[Callable[[int], None]] = None) -> list[float]:
    """Refine every site's ``scale`` in place; returns ``[L(s0), L(s1), ..., L(s_steps)]``, non-increasing.

    ``loss_fn(i)`` is the unit loss with the current scales, called while site ``i`` is being varied
    (so it may reuse anything computed before site ``i``); ``changed(i)`` is told when site ``i``
    keeps a new scale.
    """
    cur = loss_fn(0) if sites else float("nan")
    losses = [cur]
    for t in range(steps):
        factors = step_factors(t, points, span, shrink)
        for i, fq in enumerate(sites):
            s0 = fq.scale.clone()
            best_f = 1.0
            for f in factors:
                fq.scale.copy_(s0 * f)
                v = loss_fn(i)
                if v < cur:
                    cur, best_f = v, f
            fq.scale.copy_(s0 * best_f)
            if best_f != 1.0 and changed is not None:
                changed(i)
        losses.append(cur)
    return losses


class _UnitEval:
    """The loss of one unit on the search sample, with the inputs of its pieces cached: varying a
    site of piece j re-runs pieces j.. only."""

    def __init__(self, pieces: Sequence[Piece], x: Tensor, y: Tensor, loss: Any, p: float, bs: int,
                 dev: torch.device) -> None:
        self.pieces, self.y, self.loss, self.p, self.bs, self.dev = pieces, y, loss, p, bs, dev
        self.inputs: list[Tensor] = [x]

    def _ensure(self, j: int) -> None:
        while len(self.inputs) <= j:
            k = len(self.inputs) - 1
            self.inputs.append(_batched(self.pieces[k:k + 1], self.inputs[k], self.bs, self.dev))

    def invalidate_after(self, j: int) -> None:
        """Piece ``j`` changed: the cached inputs of pieces ``j+1..`` are stale."""
        del self.inputs[j + 1:]

    def output(self) -> Tensor:
        self._ensure(len(self.pieces))
        return self.inputs[-1]

    def loss_from(self, j: int) -> float:
        self._ensure(j)
        x, tot = self.inputs[j], 0.0
        for i in range(0, x.shape[0], self.bs):
            out = run_pieces(self.pieces[j:], x[i:i + self.bs].to(self.dev))
            tot += float(self.loss.fn(out, self.y[i:i + self.bs].to(self.dev), None, self.p)) * out.shape[0]
        return tot / x.shape[0]


def _loss_of_site(ev: _UnitEval, piece_of: list[int], i: int) -> float:
    """The unit's loss re-run from the piece that holds site ``i`` (coordinate_search's objective)."""
    return ev.loss_from(piece_of[i])


def _invalidate_site(ev: _UnitEval, piece_of: list[int], i: int) -> None:
    ev.invalidate_after(piece_of[i])


# -- the pass -------------------------------------------------------------------------------------
def _batched(pieces: Sequence[Piece], x: Tensor, bs: int, dev: torch.device) -> Tensor:
    return torch.cat([run_pieces(pieces, x[i:i + bs].to(dev)).cpu() for i in range(0, x.shape[0], bs)])


@torch.no_grad()
def search_act_scales(model: nn.Module, cfg: ScaleSearchConfig, ctx: Any, images: Optional[Tensor] = None,
                      fp_model: Optional[nn.Module] = None) -> dict[str, Any]:
    """Stage 1 on a prepared, calibrated model (in place); returns the report (loss per step per unit)."""
    acts = fake_quants(model, "act")
    if any(not bool(fq.initialized) and fq.enabled and not fq.spec.dynamic for fq in acts):
        raise CalibrationError("aocq_act_scales needs calibrated activation quantizers: put it after the calibrate pass")
    t0 = time.perf_counter()
    fp = fp_model if fp_model is not None else float_copy(model, ctx)
    if images is None:
        images = collect_images(ctx, cfg.num_samples, desc="aocq_act_scales")
    adapter = getattr(ctx, "adapter", None) or get_adapter(model)
    chain, fp_chain = adapter.chain(model), adapter.chain(fp)
    units = Slicing.parse(cfg.slicing).units(chain)
    names = describe_units(chain, units)
    loss = get_loss(cfg.loss)
    dev = model_device(model)
    bs = cfg.batch_size
    saved_w = [(fq, fq.enabled) for fq in fake_quants(model, "weight")]
    report: dict[str, Any] = {"pass": "aocq_act_scales", "config": asdict(cfg), "units": [],
                              "num_samples": int(images.shape[0])}
    try:
        if cfg.weights_float:
            for fq, _ in saved_w:
                fq.enabled = False
        xq, xf = images, images
        for (a, b), uname in zip(units, names):
            pieces, fpp = chain[a:b], fp_chain[a:b]
            y = _batched(fpp, xf, bs, dev)
            sites: list[FakeQuant] = []
            piece_of: list[int] = []
            for j, pc in enumerate(pieces):  # sites in chain order, each with the piece that holds it
                for fq in act_sites(unit_modules([pc])):
                    if searchable(fq) and all(fq is not s for s in sites):
                        sites.append(fq)
                        piece_of.append(j)
            ev = _UnitEval(pieces, xq, y, loss, float(cfg.loss_p), bs, dev)
            tu = time.perf_counter()
            s_before = [float(fq.scale.float().mean()) for fq in sites]
            if sites:
                losses = coordinate_search(
                    sites, functools.partial(_loss_of_site, ev, piece_of), cfg.steps, cfg.points, cfg.span,
                    cfg.shrink, changed=functools.partial(_invalidate_site, ev, piece_of))
            else:
                losses = [ev.loss_from(0)]
            rep = {"unit": uname, "sites": len(sites), "losses": losses,
                   "scale_ratio": {fq.site: round(float(fq.scale.float().mean()) / max(s, 1e-30), 4)
                                   for fq, s in zip(sites, s_before)},
                   "seconds": round(time.perf_counter() - tu, 3)}
            report["units"].append(rep)
            log.info("aocq_act_scales %s: %d sites, loss %.5g -> %.5g (%.1fs)", uname, len(sites), losses[0],
                     losses[-1], rep["seconds"])
            xq = ev.output()
            xf = y
    finally:
        for fq, e in saved_w:
            fq.enabled = e
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


@register_pass("aocq_act_scales", ScaleSearchConfig)
def aocq_act_scales_pass(model: nn.Module, ctx: Any, opts: ScaleSearchConfig = ScaleSearchConfig()) -> nn.Module:
    """AOCQ stage 1: activation scales s0 -> s4 by a shrinking coordinate search, weights in float."""
    report = search_act_scales(model, opts, ctx)
    ensure_state(model).act_scales = report
    return model
