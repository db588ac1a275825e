"""``oas`` pass: Outlier-aware Slicing (Ma et al., ICML 2024) - pick the reconstruction granularity,
then reconstruct with it.

The paper's Algorithm 1 ("Granularity and Optimization") is not available (METHODS.md §2e, §8).
Everything below the candidate list is OUR reconstruction [R], kept as options:

1. **Candidates** (``candidates: auto``): uniform slicings per architecture - ``half``, ``block``,
   ``blocks:k`` for every k dividing the (stage) depth, ``stage`` (multi-stage models) and ``model``.
   A list of slicing strings replaces them (``cuts:`` / ``groups:`` allowed: MRECG-style lists).
2. **Proxy** (``select: proxy``, no training): the float activation entering each
   piece is measured on ``outlier_images`` calibration images; ratio_t = max_c‖X_{:,c}‖∞ /
   median_c‖X_{:,c}‖∞ (:mod:`vitq.recon.outliers`). A slicing costs
   J(S) = Σ_{cuts t of S} log(ratio_t / τ): a cut at an outlier-heavy boundary (ratio > τ) costs,
   a cut at a clean boundary pays, so the proxy trades "fewer outlier boundaries" (coarser units,
   the paper's argument for ViT/DeiT) against "smaller units are easier to optimise" (finer units,
   its finding for Swin). Why not the plain Σ ratio_t of METHODS.md §2b: every term is ≥ 1, so it
   always picks the coarsest candidate. τ (``tau: auto``) = 2^(A−1): the ratio above which a
   b-bit per-tensor grid spanning the outlier channel leaves the median channel ≤ 2 levels per
   side, i.e. the boundary error is outlier-dominated. Ties go to the finer slicing.
3. **Validation** (``select: validate``, the default): each candidate (or the ``top_k`` best by the
   proxy) is reconstructed on a copy with ``val_iters`` iterations per unit on all but the last
   ``val_images`` calibration images (a quarter of them when there are too few), and scored by
   KL(softmax(FP logits) ‖ softmax(quantized logits)) on those held-out images.
4. **Guard** (``prefer``, ``switch_p``; validation only; default ``prefer: block``): the validation
   keeps the preferred slicing (``block``, the published BRECQ / QDrop unit) unless a candidate's
   held-out KL is lower by a paired test over the held-out images (per-image KL differences, z-test,
   p < ``switch_p``); the lowest-KL candidate among those that pass wins. ``prefer: null`` is the
   plain smallest-KL rule. Why: after a short run the candidates' KLs differ by up to a third but
   the per-image differences are dominated by a few images, and the leader is often not the slicing
   that wins at the final budget (bench/results/oas_guard.md, docs/methods/reconstruction.md §5), so
   a switch away from the default needs evidence. Until 2026-11-28 the default was the proxy.

The choice is recorded in the run report (``state_of(model).reconstruction[-1]["oas"]``) and logged.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import field, fields, make_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import Piece, get_adapter
from ..batches import forward_logits
from ..errors import ConfigError
from ..evaluate import z_test_p
from ..options import Options, is_int, is_number, need
from ..recon.engine import RECON_DEFAULTS, ReconConfig, collect_images, float_copy, reconstruct
from ..recon.outliers import boundary_outlier_ratios, proxy_score
from ..recon.slicing import Slicing, blocks_per_unit
from ..state import ensure_state
from .reconstruct import pass_run_dir
from .registry import register_pass

log = logging.getLogger(__name__)

SELECT_MODES = ("proxy", "validate")
#: the selection's own options and their defaults (the reconstruction options come from ReconConfig)
SELECT_FIELDS: tuple[tuple[str, Any, Any], ...] = (
    ("candidates", Any, field(default="auto", metadata={"any_type": True})),
    ("select", str, field(default="validate")),
    ("tau", Any, field(default="auto", metadata={"any_type": True})),
    ("val_iters", int, field(default=200)),
    ("val_images", int, field(default=128)),
    ("top_k", int, field(default=0)),
    ("outlier_images", int, field(default=256)),
    ("prefer", Any, field(default="block", metadata={"any_type": True})),
    ("switch_p", float, field(default=0.05)),
)


def _validate_oas(self: Any) -> None:
    self.recon_config()  # the reconstruction options: ReconConfig checks them
    need(self.select in SELECT_MODES, f"oas select={self.select!r}: use one of {', '.join(SELECT_MODES)}")
    _check_guard(self.prefer, self.switch_p)
    c = self.candidates
    need(c in ("auto", None) or isinstance(c, str) or (isinstance(c, (list, tuple)) and len(c) > 0),
         f"oas candidates={c!r}: use 'auto' or a list such as [block, 'blocks:2']")
    for name in [] if c in ("auto", None) else [c] if isinstance(c, str) else c:
        Slicing.parse(str(name))
    need(self.tau in ("auto", None) or (is_number(self.tau) and float(self.tau) > 0),
         f"oas tau={self.tau!r} must be > 0 (or 'auto' = 2^(A-1))")
    for k in ("val_iters", "val_images", "outlier_images"):
        need(is_int(getattr(self, k)) and getattr(self, k) >= 1, f"oas {k}={getattr(self, k)!r} must be an integer >= 1")
    need(is_int(self.top_k) and self.top_k >= 0, f"oas top_k={self.top_k!r} must be an integer >= 0 (0: all)")


def _recon_config(self: Any) -> ReconConfig:
    """The reconstruction settings of an ``oas`` pass (block units until a slicing is chosen)."""
    return ReconConfig(slicing="block", **{k: getattr(self, k) for k in RECON_DEFAULTS if k != "slicing"})


def _selection(self: Any) -> dict[str, Any]:
    return {name: getattr(self, name) for name, _, _ in SELECT_FIELDS}


#: the ``oas`` pass's options: every ReconConfig option but ``slicing`` (QDrop's p = 0.5 by default,
#: as the published OAS setting), then the selection's own; one frozen dataclass made from both
OASOptions: Any = make_dataclass(
    "OASOptions",
    [(f.name, f.type, field(default=0.5 if f.name == "qdrop_p" else f.default, metadata=f.metadata))
     for f in fields(ReconConfig) if f.name != "slicing"] + list(SELECT_FIELDS),
    bases=(Options,), frozen=True,
    namespace={"validate": _validate_oas, "recon_config": _recon_config, "selection": _selection,
               "__doc__": "Options of the ``oas`` pass: reconstruction (ReconConfig, no slicing) + selection.",
               "__module__": __name__},
)
OAS_DEFAULTS: dict[str, Any] = OASOptions.defaults()


def auto_candidates(chain: Sequence[Piece]) -> list[str]:
    """Uniform slicings for this chain: half, block, blocks:k (k dividing a stage depth), stage, model."""
    stages: dict[int, set[int]] = {}
    for p in chain:
        if p.block >= 0:
            stages.setdefault(p.stage, set()).add(p.block)
    depths = [len(b) for b in stages.values()]
    if not depths:
        raise ConfigError("OAS needs a model with transformer blocks in its chain")
    multi = len(stages) > 1 or any(s >= 0 for s in stages)
    ks = sorted({k for d in depths for k in range(2, d) if d % k == 0})
    out = ["half", "block"] + [f"blocks:{k}" for k in ks]
    out += ["stage", "model"] if multi else ["model"]
    return out


def _dedupe(chain: Sequence[Piece], names: Sequence[str]) -> list[tuple[Slicing, list[tuple[int, int]]]]:
    seen, out = set(), []
    for n in names:
        s = Slicing.parse(n)
        units = s.units(chain)
        key = tuple(units)
        if key not in seen:
            seen.add(key)
            out.append((s, units))
    return out


@torch.no_grad()
def logits_kl_per_image(fp_model: nn.Module, model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """KL(softmax(FP logits) ‖ softmax(quantized logits)) of every image, shape (N,), float64."""
    dev = next(iter(model.parameters())).device
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(dev)
        p = F.softmax(forward_logits(fp_model, x), dim=-1)
        q = F.log_softmax(forward_logits(model, x), dim=-1)
        out.append(F.kl_div(q, p, reduction="none").sum(-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def logits_kl(fp_model: nn.Module, model: nn.Module, images: Tensor, batch_size: int = 64) -> float:
    """Mean KL(softmax(FP logits) ‖ softmax(quantized logits)) over ``images``."""
    kl = logits_kl_per_image(fp_model, model, images, batch_size)
    return float(kl.mean()) if kl.numel() else 0.0


def guarded_pick(kls: dict[str, Tensor], prefer: str | None = None, switch_p: float = 0.05) -> tuple[str, dict[str, float]]:
    """The validation winner among candidates with per-image held-out KLs ``kls`` (name -> (N,)).

    Without ``prefer``: the smallest mean KL (first listed on a tie). With ``prefer`` (a key of
    ``kls``): that candidate, unless others have a lower mean KL by a paired two-sided z-test on the
    per-image differences with p < ``switch_p``; then the lowest mean KL among those. Returns
    ``(winner, {candidate: p against prefer})`` (empty without ``prefer``). Our rule [R]."""
    if not kls:
        raise ConfigError("oas validation has no candidates to pick from")
    means = {k: float(v.double().mean()) for k, v in kls.items()}
    if prefer is None:
        return min(means, key=lambda k: means[k]), {}
    if prefer not in kls:
        raise ConfigError(f"oas prefer={prefer!r} is not among the validated candidates ({', '.join(kls)})")
    ps: dict[str, float] = {}
    for k, v in kls.items():
        if k == prefer:
            continue
        d = v.double() - kls[prefer].double()
        ps[k] = z_test_p(float(d.mean()), float(d.std(unbiased=True)) if d.numel() > 1 else 0.0, d.numel())
    return guard_winner(means, ps, prefer, switch_p), ps


def guard_winner(means: dict[str, float], ps: dict[str, float], prefer: str, switch_p: float) -> str:
    """The guard's decision from mean KLs and p-values against ``prefer``: the lowest mean among the
    candidates below ``prefer``'s with p < ``switch_p``, else ``prefer`` (see :func:`guarded_pick`)."""
    better = [k for k in ps if means[k] < means[prefer] and ps[k] < switch_p]
    return min(better, key=lambda k: means[k]) if better else prefer


def _check_guard(prefer: Any, switch_p: Any) -> None:
    if prefer is not None:
        try:
            Slicing.parse(str(prefer))
        except ConfigError as e:
            raise ConfigError(f"oas prefer={prefer!r}: {e}") from None
    try:
        ok = 0.0 < float(switch_p) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"oas switch_p={switch_p!r} must be a p-value threshold in (0, 1], e.g. 0.05")


def select_slicing(model: nn.Module, ctx: Any, cfg: ReconConfig, images: Tensor, fp: nn.Module,
                   candidates: Any = "auto", select: str = "validate", tau: Any = "auto", val_iters: int = 200,
                   val_images: int = 128, top_k: int = 0, outlier_images: int = 256, prefer: str | None = "block",
                   switch_p: float = 0.05) -> dict[str, Any]:
    """Score the candidate slicings and pick one; returns the JSON-able record."""
    if select not in SELECT_MODES:
        raise ConfigError(f"oas select={select!r}: use one of {', '.join(SELECT_MODES)}")
    _check_guard(prefer, switch_p)
    adapter = getattr(ctx, "adapter", None) or get_adapter(model)
    fp_chain = adapter.chain(fp)
    names = auto_candidates(fp_chain) if candidates in ("auto", None) else (
        [candidates] if isinstance(candidates, str) else list(candidates))
    if not names:
        raise ConfigError("oas candidates is empty: use 'auto' or a list such as [block, 'blocks:2']")
    guard = select == "validate" and prefer is not None
    if guard:  # the preferred slicing is always validated (as itself, or as the candidate with its units)
        names = list(names) + [str(prefer)]
    cands = _dedupe(fp_chain, names)
    a_bits = int(getattr(getattr(ctx, "bits", None), "a", 4))
    t = 2.0 ** (a_bits - 1) if tau in ("auto", None) else float(tau)
    if t <= 0:
        raise ConfigError(f"oas tau={tau} must be > 0 (or 'auto' = 2^(A-1))")
    dev = next(iter(model.parameters())).device
    ratios = boundary_outlier_ratios(fp_chain, images[: int(outlier_images)].to(dev))
    rows: list[dict[str, Any]] = []
    for s, units in cands:
        cuts = [a for a, _ in units if a > 0]
        rows.append({"slicing": str(s), "units": len(units), "blocks_per_unit": round(blocks_per_unit(fp_chain, units), 3),
                     "proxy": round(proxy_score(cuts, ratios, t), 4)})
    # ties (and near-ties) go to the finer slicing: candidates are listed fine -> coarse
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["proxy"], rows[i]["blocks_per_unit"]))
    record: dict[str, Any] = {
        "method": "oas [R]", "select": select, "tau": t, "candidates": rows,
        "boundary_ratios": {fp_chain[i].name: round(r, 3) for i, r in enumerate(ratios) if i > 0},
    }
    if select == "proxy":
        chosen = rows[order[0]]["slicing"]
    else:
        v, n = int(val_images), images.shape[0]
        if v <= 0:
            raise ConfigError(f"oas val_images={val_images} must be >= 1 (held-out calibration images)")
        if n < 2:
            raise ConfigError(f"oas select=validate needs at least 2 calibration images, got {n}: "
                              "pass more images or use select=proxy")
        if v >= n:  # a small calibration set: hold out a quarter rather than stop
            log.warning("oas: val_images=%d leaves no training images among %d calibration images; "
                        "holding out %d (a quarter)", v, n, max(1, n // 4))
            v = max(1, n // 4)
        train, held = images[:-v], images[-v:]
        pick = order[: int(top_k)] if int(top_k) > 0 else list(range(len(rows)))
        pref = None
        if guard:
            pref_units = Slicing.parse(str(prefer)).units(fp_chain)
            pref = next(rows[i]["slicing"] for i, (_, u) in enumerate(cands) if u == pref_units)
            pick += [i for i, r in enumerate(rows) if r["slicing"] == pref and i not in pick]
        # validate fine -> coarse: guarded_pick breaks a tie of mean KLs toward the first listed (finer) slicing
        pick.sort(key=lambda i: rows[i]["blocks_per_unit"])
        kls: dict[str, Tensor] = {}
        for i in pick:
            m = copy.deepcopy(model)
            short = cfg.with_(slicing=rows[i]["slicing"], iters=int(val_iters), run_dir=None)
            reconstruct(m, short, ctx, images=train, fp_model=fp, name=f"oas-validate {rows[i]['slicing']}")
            kls[rows[i]["slicing"]] = logits_kl_per_image(fp, m, held)
            rows[i]["val_kl"] = float(kls[rows[i]["slicing"]].mean())
            log.info("oas: %s proxy %.3f val KL %.5g", rows[i]["slicing"], rows[i]["proxy"], rows[i]["val_kl"])
            del m
        chosen, ps = guarded_pick(kls, pref, float(switch_p))
        for r in rows:
            if r["slicing"] in ps:
                r["val_p_vs_prefer"] = round(ps[r["slicing"]], 6)
        record["val_iters"], record["val_images"] = int(val_iters), v
        record["smallest_kl"] = guarded_pick(kls)[0]
        if guard:
            record["prefer"], record["switch_p"] = pref, float(switch_p)
    record["chosen"] = chosen
    log.info("oas: chose slicing %s among %s", chosen, ", ".join(r["slicing"] for r in rows))
    return record


@register_pass("oas", OASOptions)
def oas_pass(model: nn.Module, ctx: Any, opts: Any = None) -> nn.Module:
    """Outlier-aware Slicing [R]: pick the unit granularity (guarded short validation or proxy), then reconstruct."""
    opts = OASOptions() if opts is None else opts
    cfg = opts.recon_config()
    run_dir = pass_run_dir(ctx, cfg.run_dir, "oas")
    fp = float_copy(model, ctx)
    images = collect_images(ctx, cfg.num_samples, desc="oas")
    sel_opts = opts.selection()
    record = None
    sel_file = Path(run_dir) / "oas.json" if run_dir else None
    if sel_file is not None and sel_file.is_file():
        saved = json.loads(sel_file.read_text())
        if saved.get("options") != json.loads(json.dumps(sel_opts)):
            raise ConfigError(f"run directory {run_dir} holds an OAS search with other options: "
                              "pass another --resume-dir or delete that folder")
        record = saved["record"]
        log.info("oas: reusing the slicing chosen in %s: %s", sel_file, record["chosen"])
    if record is None:
        record = select_slicing(model, ctx, cfg, images, fp, **sel_opts)
        if sel_file is not None:
            sel_file.parent.mkdir(parents=True, exist_ok=True)
            sel_file.write_text(json.dumps({"options": sel_opts, "record": record}, indent=2) + "\n")
    final = cfg.with_(slicing=record["chosen"], run_dir=str(Path(run_dir) / "recon") if run_dir else None)
    report = reconstruct(model, final, ctx, images=images, fp_model=fp, name="oas")
    report["oas"] = record
    ensure_state(model).oas = record
    return model


__all__ = ["OASOptions", "auto_candidates", "guard_winner", "guarded_pick", "logits_kl", "logits_kl_per_image", "oas_pass", "select_slicing"]
