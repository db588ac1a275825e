"""``ptq4vit_search`` pass: PTQ4ViT's search of quantization parameters by layer-output error.

PTQ4ViT (Yuan et al., ECCV 2022; METHODS.md §5, [V-code] hahnyuan/PTQ4ViT configs/PTQ4ViT.py,
quant_layers/{linear,matmul}.py, utils/quant_calib.py). For every quantizable layer - a
:class:`~vitq.nn.QLinear`, :class:`~vitq.nn.QConv2d` or :class:`~vitq.nn.QMatMul`, found by type -
whose FakeQuants the ``calibrate`` pass has initialised:

1. *parallel* calibration: the layer's inputs ``X`` and output ``O`` are captured from the **float**
   model (every FakeQuant off), so no layer sees another layer's quantization error;
2. for the ``hessian`` metric, ``g = ∂L/∂O`` is captured in one backward pass (see ``grad`` below);
3. each FakeQuant of the layer is searched in turn - weight then input for Linear / Conv, ``A``
   then ``B`` for MatMul - for ``rounds`` alternating rounds, the others held at their current
   values. Candidates for a uniform quantizer are ``Δ = [α + i(β-α)/n]·Δ_init``, ``i = 0..n``
   (``Δ_init`` from the calibrate pass); a quantizer with its own ``candidates(lo, hi, spec)``
   (``twin_uniform``: split ``2^-i`` for post-Softmax, ``Δ_pos`` grid for post-GELU) supplies them,
   given this pass's ``α, β, n`` where it takes them (one grid for every site).
   Each candidate is scored by ``metric(layer(X), O, g)``: the layer's own forward, so the
   quantizer's ``fake_quant`` is the only formula used.

All layers are searched against the *initial* quantized state, then the results are written
together (parallel semantics: the order of layers does not matter).

``grad`` - where the KL gradient is taken. PTQ4ViT's released parallel calibration takes it with the
model in float, where ``KL(p_fp ‖ p_fp)`` has zero gradient: its weights are floating-point noise
(hahnyuan/PTQ4ViT#23). We do not copy that. ``quant`` (default): the gradient of
``KL(p_fp ‖ q)`` with the model quantized at its *initial* parameters (the calibrate pass's), the
paper's stated objective at a point where it is not degenerate. ``fisher``: the float model,
cross-entropy against labels sampled from ``p_fp`` (the Fisher diagonal = the Hessian of the KL at
``q = p_fp``). The ``ptq4vit`` recipe uses ``fisher``: on a model its initial parameters already
collapse (outlier channels at W4A4) the ``quant`` gradient steers the search wrong (outlier ViT W4A4
33.6 % against PTQ4ViT's code's 83.1; fisher 83.4; docs/methods/baselines.md). ``quant`` stays the pass's
default for the recipes measured with it (tsptq, tsptq-repq).

``channel_search`` - a per-channel quantizer's scales: ``joint`` (default) multiplies all of them by one
candidate ratio, chosen by the whole output's error; ``each`` chooses every output channel's (or head's)
ratio by that channel's own output error where channels are independent (:func:`group_axis`), as the
released code's ``ChannelwiseBatchingQuantConv2d`` does for the patch embedding. The ``ptq4vit`` recipe
uses ``each``.

Departures from the released code, all deliberate and listed in the ``ptq4vit`` recipe: qkv weights
get one scale (PTQ4ViT splits q / k / v rows into 3 groups), matmul inputs one scale per tensor
(PTQ4ViT: per head) - neither moves the code's own result by more than 0.45 at W3A3 when it is made
ours (bench/results/peers_ablation.md) - and the gradient point (above).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..batches import forward_logits
from ..errors import CalibrationError, ConfigError
from ..granularity import PerChannel, PerToken
from ..metrics import GRADIENT_METRICS, get_metric, kl_to_reference, output_grads, sampled_nll
from ..nn import FakeQuant, QConv2d, QLinear, QMatMul, disabled
from ..options import Options, is_int, need
from ..quantizers.base import Params, QuantSpec, get_quantizer
from ..roles import parse_role
from .registry import register_pass

log = logging.getLogger(__name__)

LAYER_TYPES = (QLinear, QConv2d, QMatMul)
#: which positional input of a layer's forward an activation slot quantizes
SLOT_ARG = {"input_quant": 0, "quant_a": 0, "quant_b": 1}
#: per layer type, the order in which its slots are searched (PTQ4ViT: W then A; A then B)
SLOT_ORDER = {QLinear: ("weight_quant", "input_quant"), QConv2d: ("weight_quant", "input_quant"),
              QMatMul: ("quant_a", "quant_b")}
GRAD_MODES = ("quant", "fisher")
CHANNEL_SEARCH = ("joint", "each")


def _searchable(fq: Any) -> bool:
    return (isinstance(fq, FakeQuant) and fq.enabled and bool(fq.initialized)
            and not isinstance(fq.spec.granularity, PerToken))


def search_layers(model: nn.Module, roles: Optional[Sequence[str]] = None,
                  quantizers: Optional[Sequence[str]] = None) -> list[tuple[Any, list[str]]]:
    """``(layer, slots to search)`` for every quantizable layer with a searchable FakeQuant (optionally
    only the FakeQuants of the given roles and / or quantizer names)."""
    keep = None if roles is None else {parse_role(r) for r in roles}
    names = None if quantizers is None else set(quantizers)
    out = []
    for m in model.modules():
        if not isinstance(m, LAYER_TYPES):
            continue
        base = next(t for t in LAYER_TYPES if isinstance(m, t))  # a subclass (a conv on tokens) orders as its base
        slots = [s for s in SLOT_ORDER[base] if _searchable(getattr(m, s, None))
                 and (keep is None or getattr(m, s).role in keep)
                 and (names is None or getattr(m, s).spec.quantizer in names)]
        if slots:
            out.append((m, slots))
    return out


def grid(alpha: float, beta: float, steps: int) -> list[float]:
    """PTQ4ViT's candidate ratios ``α + i(β-α)/n``, ``i = 0..n``."""
    return [alpha + i * (beta - alpha) / steps for i in range(steps + 1)]


def _with_grid(spec: QuantSpec, alpha: float, beta: float, steps: int) -> QuantSpec:
    """``spec`` with the pass's grid as its own search options, where the quantizer has them
    (twin_uniform gelu: ``search_alpha/beta/steps``), so one grid governs every site."""
    opts = {**dict(spec.options), "search_alpha": alpha, "search_beta": beta, "search_steps": steps}
    try:
        return spec.with_(options=tuple(sorted(opts.items())))
    except ConfigError:
        return spec


def candidates(fq: FakeQuant, x: Tensor, ratios: Sequence[float], alpha: float = 0.01, beta: float = 1.2,
               steps: int = 100) -> list[Params]:
    """Candidate parameters of ``fq`` for the tensor ``x`` it quantizes (shapes as its buffers)."""
    cur = {k: v.detach().clone() for k, v in fq.params.items()}
    own = getattr(fq.quantizer, "candidates", None)
    if own is not None:
        lo, hi = x.detach().min().reshape(1).float(), x.detach().max().reshape(1).float()
        out = []
        for p in own(lo.cpu(), hi.cpu(), _with_grid(fq.spec, alpha, beta, steps)):
            out.append({k: (v.reshape(cur[k].shape) if v.numel() == cur[k].numel() else v).to(cur[k].device)
                        for k, v in p.items()})
        return out
    if "scale" not in cur:
        return []
    return [{**cur, "scale": cur["scale"] * r} for r in ratios]


@torch.no_grad()
def _capture(model: nn.Module, x: Tensor, layers: Sequence[nn.Module]) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    """Inputs and output of every layer on ``x`` (one forward, as the model runs now)."""
    got: list[Optional[tuple[tuple[Tensor, ...], Tensor]]] = [None] * len(layers)

    def hook(i: int):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            got[i] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), out.detach())
        return fn

    hs = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    if any(g is None for g in got):
        raise CalibrationError("ptq4vit_search: a quantizable layer did not run on the calibration images")
    return got  # type: ignore[return-value]


def unit_max(grad: Tensor, where: str) -> Tensor:
    """``grad / max|grad|``. The per-layer search compares candidates under one ``grad``, so a positive
    factor does not change its choice; without it, the straight-through gradients of a model that
    collapses at low bits (1e21 measured on a fully-quantized W4A4 Swin) square to inf in float32
    and every candidate ties at a non-finite error."""
    if not bool(torch.isfinite(grad).all()):
        raise CalibrationError(f"ptq4vit_search: the KL gradient at {where} is not finite (the quantized model is "
                               "numerically broken at these bits); use grad: fisher or metric: mse")
    top = grad.abs().amax()
    return grad / top if float(top) > 0 else grad


@torch.no_grad()
def search_layer(layer: Any, slots: Sequence[str], args: tuple[Tensor, ...], out_fp: Tensor,
                 grad: Optional[Tensor], metric_name: str, rounds: int, alpha: float = 0.01, beta: float = 1.2,
                 steps: int = 100, channel_search: str = "joint") -> dict[str, Params]:
    """Alternating search of ``slots`` of one layer; returns the best parameters per slot.

    ``channel_search``: ``joint`` scales every group of a per-channel quantizer by one candidate ratio,
    chosen by the error of the whole output; ``each`` chooses every group's ratio by the error of its own
    outputs where the groups are independent (:func:`group_axis`; PTQ4ViT's code: per output channel of
    the patch-embedding weight, per head of the matmul operands). The layer's FakeQuants are left at the
    returned values.
    """
    metric = get_metric(metric_name)
    if grad is not None:
        grad = unit_max(grad, getattr(layer, slots[0]).site if slots else type(layer).__name__)
    fqs = {s: getattr(layer, s) for s in slots}
    ratios = grid(alpha, beta, steps)
    axes = {s: group_axis(layer, s, fq, args, out_fp, metric_name) if channel_search == "each" else None
            for s, fq in fqs.items()}
    cands = {s: candidates(fq, layer.weight if s == "weight_quant" else args[SLOT_ARG[s]], ratios, alpha, beta, steps)
             for s, fq in fqs.items()}
    for _ in range(rounds):
        for s, fq in fqs.items():
            if not cands[s]:
                continue
            # the other activation slots are fixed while this one is searched: quantize their inputs once
            frozen = [o for o in fqs if o != s and o in SLOT_ARG]
            a = list(args)
            for o in frozen:
                a[SLOT_ARG[o]] = fqs[o](a[SLOT_ARG[o]])
                fqs[o].enabled = False
            try:
                axis = axes[s]
                best = (_best_joint(layer, fq, cands[s], a, out_fp, grad, metric) if axis is None else
                        _best_each(layer, fq, cands[s], a, out_fp, grad, metric, axis))
            finally:
                for o in frozen:
                    fqs[o].enabled = True
            if best is None:
                raise CalibrationError(f"ptq4vit_search: every candidate of {fq.site} gave a non-finite error")
            fq.set_params(best)
    return {s: {k: v.clone() for k, v in fq.params.items()} for s, fq in fqs.items()}


def _best_joint(layer: Any, fq: FakeQuant, cands: Sequence[Params], args: Sequence[Tensor], out_fp: Tensor,
                grad: Optional[Tensor], metric: Any) -> Optional[Params]:
    """The candidate with the least error of the whole layer output."""
    best: Optional[Params] = None
    best_err = math.inf
    for cand in cands:
        fq.set_params(cand)
        err = float(metric(layer(*args), out_fp, grad))
        if err < best_err:  # ties keep the earlier (smaller) candidate
            best, best_err = cand, err
    return best


def _best_each(layer: Any, fq: FakeQuant, cands: Sequence[Params], args: Sequence[Tensor], out_fp: Tensor,
               grad: Optional[Tensor], metric: Any, axis: int) -> Optional[Params]:
    """Per group (output channel / head), the candidate with the least error of that group's outputs.

    Valid because the groups' outputs are independent: group ``j``'s output depends on group ``j``'s
    parameters only, so one forward at candidate ``i`` scores every group's ``i``."""
    n = out_fp.shape[axis]
    best = {k: v.clone() for k, v in cands[0].items()}
    best_err = torch.full((n,), math.inf, device=out_fp.device)
    for cand in cands:
        fq.set_params(cand)
        err = metric(layer(*args), out_fp, grad, axis=axis).float()
        better = err < best_err  # ties keep the earlier (smaller) candidate; NaN never wins
        for k, v in cand.items():
            best[k] = torch.where(better.view(-1, *([1] * (v.dim() - 1))), v, best[k])
        best_err = torch.where(better, err, best_err)
    if not bool(torch.isfinite(best_err).all()):
        return None
    return best


def group_axis(layer: Any, slot: str, fq: FakeQuant, args: Sequence[Tensor], out: Tensor,
               metric_name: str) -> Optional[int]:
    """The dim of the layer output whose index ``j`` depends on the ``j``-th parameter group of ``slot``
    only, or None where the groups' effects mix (per-tensor, or the input channels of a Linear):

    * a QLinear / QConv2d weight per output channel (``channel0``): the output's channel dim;
    * a QMatMul operand per index of a leading dim (``channel1`` of ``(B, heads, N, d)``: per head): that dim.

    Only for quantizers searched by scale ratio (uniform), whose parameter groups lead each buffer's shape."""
    g = fq.spec.granularity
    scale = fq.params.get("scale")
    if not isinstance(g, PerChannel) or scale is None or scale.numel() <= 1:
        return None
    if getattr(fq.quantizer, "candidates", None) is not None:
        return None
    if slot == "weight_quant":
        if g.axis % layer.weight.dim() != 0:
            return None
        axis = out.dim() - 1 if isinstance(layer, QLinear) or getattr(layer, "tokens_out", False) else 1
    elif isinstance(layer, QMatMul):
        x = args[SLOT_ARG[slot]]
        axis = g.axis % x.dim()
        if axis >= x.dim() - 2 or out.dim() != x.dim() or x.shape[axis] != out.shape[axis]:
            return None
    else:
        return None
    if any(v.dim() == 0 or v.shape[0] != out.shape[axis] for v in fq.params.values()):
        return None
    if metric_name == "cosine" and axis == out.dim() - 1:
        return None  # the cosine compares whole rows of the last dim: it has no value per channel there
    return axis


def _names(v: Any) -> Optional[list[str]]:
    """``roles`` / ``quantizers``: null, one name (``roles: QKV_IN`` in YAML) or a list of names."""
    if v is None:
        return None
    return [v] if isinstance(v, str) else list(v)


@dataclass(frozen=True)
class PTQ4ViTOptions(Options):
    """``metric``: the layer-output error (``hessian``, ``mse``, ``cosine``); ``alpha``, ``beta``,
    ``steps``: the candidate grid ``α + i(β-α)/n``; ``rounds``: alternating weight / activation
    rounds; ``grad``: where the KL gradient is taken (``quant`` | ``fisher``); ``channel_search``: one
    ratio for every channel of a per-channel quantizer (``joint``) or each output channel's / head's
    ratio on its own (``each``, PTQ4ViT's code; :func:`search_layer`); ``max_images``;
    ``roles`` / ``quantizers``: search only the sites of these roles / quantizer names (null: all)."""

    metric: str = "hessian"
    alpha: float = 0.01
    beta: float = 1.2
    steps: int = 100
    rounds: int = 3
    grad: str = "quant"
    channel_search: str = "joint"
    max_images: int = 32
    roles: Any = field(default=None, metadata={"any_type": True})
    quantizers: Any = field(default=None, metadata={"any_type": True})

    def validate(self) -> None:
        get_metric(self.metric)
        need(self.grad in GRAD_MODES, f"ptq4vit_search grad {self.grad!r} is unknown: use one of {', '.join(GRAD_MODES)}")
        need(self.channel_search in CHANNEL_SEARCH, f"ptq4vit_search channel_search {self.channel_search!r} is "
             f"unknown: use one of {', '.join(CHANNEL_SEARCH)}")
        need(0 < float(self.alpha) <= float(self.beta),
             f"ptq4vit_search needs 0 < alpha <= beta, got alpha={self.alpha} beta={self.beta}")
        need(all(is_int(v) and v >= 1 for v in (self.steps, self.rounds, self.max_images)),
             "ptq4vit_search steps, rounds and max_images must be integers >= 1")
        for key in ("roles", "quantizers"):
            v = getattr(self, key)
            need(v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v)),
                 f"ptq4vit_search {key}={v!r} must be null, a name or a list of names")
        for name in _names(self.quantizers) or ():
            get_quantizer(name)  # unknown name: one-line ConfigError
        for r in _names(self.roles) or ():
            parse_role(r)


@register_pass("ptq4vit_search", PTQ4ViTOptions)
def ptq4vit_search_pass(model: nn.Module, ctx: Any, opts: PTQ4ViTOptions = PTQ4ViTOptions()) -> nn.Module:
    """PTQ4ViT: per-layer search of quantizer scales by (Hessian-guided) layer-output error."""
    metric, alpha, beta, steps, rounds = opts.metric, opts.alpha, opts.beta, opts.steps, opts.rounds
    grad, max_images = opts.grad, opts.max_images
    roles, quantizers = _names(opts.roles), _names(opts.quantizers)
    layers = search_layers(model, roles, quantizers)
    if not layers:
        log.warning("ptq4vit_search: no calibrated quantization site to search; nothing to do")
        return model
    x = _calib_images(ctx, int(max_images))
    mods = [m for m, _ in layers]
    with disabled(model):
        captured = _capture(model, x, mods)  # parallel: float inputs and outputs
        ref = forward_logits(model, x).detach()
    grads: list[Optional[Tensor]] = [None] * len(mods)
    if metric in GRADIENT_METRICS:
        grads = list(_gradients(model, x, mods, ref, grad, ctx.seed))
    initial = [{s: {k: v.clone() for k, v in getattr(m, s).params.items()} for s in slots} for m, slots in layers]
    results = []
    for (m, slots), (args, out), g in zip(layers, captured, grads, strict=True):
        results.append(search_layer(m, slots, args, out, g, metric, int(rounds), float(alpha), float(beta),
                                    int(steps), opts.channel_search))
        for s in slots:  # parallel semantics: later layers are searched against the initial state
            getattr(m, s).set_params(initial[len(results) - 1][s])
    for (m, slots), best in zip(layers, results, strict=True):
        for s in slots:
            getattr(m, s).set_params(best[s])
    log.info("ptq4vit_search: %d layers, metric %s, %d grid points, %d rounds, %d images",
             len(layers), metric, int(steps) + 1, rounds, x.shape[0])
    return model


def _calib_images(ctx: Any, max_images: int) -> Tensor:
    xs, n = [], 0
    for b in ctx.calib_batches(desc="ptq4vit_search"):
        xs.append(b[: max_images - n])
        n += xs[-1].shape[0]
        if n >= max_images:
            break
    if n == 0:
        raise CalibrationError("ptq4vit_search saw no calibration images: pass at least one")
    return torch.cat(xs)


def _gradients(model: nn.Module, x: Tensor, mods: Sequence[nn.Module], ref_logits: Tensor, mode: str,
               seed: int) -> list[Tensor]:
    p_fp = ref_logits.softmax(-1)
    if mode == "quant":
        return output_grads(model, x, mods, lambda logits: kl_to_reference(logits, p_fp))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.multinomial(p_fp.float().cpu(), 1, generator=gen).squeeze(1).to(ref_logits.device)
    with disabled(model):
        return output_grads(model, x, mods, lambda logits: sampled_nll(logits, labels))


__all__ = ["CHANNEL_SEARCH", "GRAD_MODES", "candidates", "grid", "group_axis", "ptq4vit_search_pass", "search_layer", "search_layers", "unit_max"]
