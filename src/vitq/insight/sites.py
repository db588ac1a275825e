"""Per-site measurements of a quantized model: what each quantization site costs.

* :func:`site_errors` - each site's quantization error: *local* (the site's quantizer applied to the
  float tensor that reaches it: SQNR and cosine of ``fq(x)`` against ``x``) and *accumulated* (the
  tensor the fully quantized model produces at the site against the float model's tensor there:
  everything upstream included).
* :func:`site_sensitivity` - the top-1 and test log-loss change when *only* that site is quantized
  (every other site float), measured against the float model on the same images, with the paired
  McNemar p-value of the top-1 change.
* :func:`site_samples` / :func:`levels` - the value distributions of chosen sites and the values the
  site's quantizer can output, for the report's plots.

The float model is the quantized model with quantization disabled (``vitq.nn.disabled``), which is
the float function exactly (reparameterizations are exact), so no second copy is needed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batches import batch_images, batch_labels, forward_logits
from ..devices import model_device
from ..errors import ConfigError
from ..evaluate import Predictions, compare_paired, predict
from ..granularity import PerTensor
from ..nn import FakeQuant, disabled, fake_quants

Batch = tuple[Tensor, Tensor]


def quantized_sites(model: nn.Module) -> list[FakeQuant]:
    """Every quantization site of ``model`` that computes something (calibrated, or dynamic)."""
    sites = [fq for fq in fake_quants(model) if fq.enabled and (fq.ready or fq.spec.dynamic)]
    if not sites:
        raise ConfigError("the model has no calibrated quantization site: quantize it first (vitq.quantize / "
                          "vitq quantize ... --out DIR), a recipe that quantizes something")
    return sites


@contextmanager
def only(model: nn.Module, keep: Sequence[FakeQuant]) -> Iterator[nn.Module]:
    """Inside the block only the sites in ``keep`` quantize; every other site is the identity."""
    fqs = fake_quants(model)
    saved = [fq.enabled for fq in fqs]
    ids = {id(k) for k in keep}
    for fq, s in zip(fqs, saved):
        fq.enabled = s and id(fq) in ids
    try:
        yield model
    finally:
        for fq, s in zip(fqs, saved):
            fq.enabled = s


def _apply(fq: FakeQuant, x: Tensor) -> Tensor:
    """The site's quantizer on ``x`` whatever its current enabled flag (no hooks run)."""
    was = fq.enabled
    fq.enabled = True
    try:
        return FakeQuant.forward(fq, x)
    finally:
        fq.enabled = was


@contextmanager
def _hooks(sites: Sequence[FakeQuant], fn: Callable[[FakeQuant, Tensor, Tensor], None]) -> Iterator[None]:
    handles = [fq.register_forward_hook(lambda m, a, out: fn(m, a[0], out)) for fq in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Acc:
    """Running sums for SQNR / cosine of b against a (float64)."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    ee: float = 0.0
    n: int = 0

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
        if a.shape != b.shape:  # a site called with differently shaped tensors in the two runs: not comparable
            return
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        self.ab += float(a @ b)
        self.ee += float(((a - b) ** 2).sum())
        self.n += a.numel()

    def sqnr(self) -> Optional[float]:
        if self.n == 0:
            return None
        return math.inf if self.ee == 0 else 10.0 * math.log10(max(self.aa, 1e-300) / self.ee)

    def cosine(self) -> Optional[float]:
        if self.n == 0 or self.aa == 0 or self.bb == 0:
            return None
        return self.ab / math.sqrt(self.aa * self.bb)


def site_errors(model: nn.Module, images: Iterable[Tensor]) -> list[dict[str, Any]]:
    """Per site: ``sqnr_db`` / ``cosine`` of the site's quantizer on the float tensor that reaches it
    (local), and ``acc_sqnr_db`` / ``acc_cosine`` of the fully quantized model's tensor at the site
    (the quantizer's output) against the float model's (accumulated), over ``images`` (batches)."""
    sites = quantized_sites(model)
    local = {id(s): _Acc() for s in sites}
    acc = {id(s): _Acc() for s in sites}
    device = model_device(model)
    model.eval()
    ref: dict[int, Tensor] = {}  # the float tensor at each site, for the current batch

    def on_float(fq: FakeQuant, inp: Tensor, out: Tensor) -> None:
        if fq.kind == "weight" and local[id(fq)].n:  # a weight is the same every batch
            return
        ref[id(fq)] = inp.detach()
        local[id(fq)].add(inp, _apply(fq, inp))

    def on_quant(fq: FakeQuant, inp: Tensor, out: Tensor) -> None:
        r = ref.get(id(fq))
        if r is not None:
            acc[id(fq)].add(r, out)

    with torch.no_grad():
        for x in images:
            x = batch_images(x).to(device)
            ref.clear()
            with disabled(model), _hooks(sites, on_float):
                forward_logits(model, x)
            with _hooks(sites, on_quant):
                for layer in model.modules():  # the weight cache would skip the weight sites' forwards
                    layer.__dict__.pop("_wq_cache", None)
                forward_logits(model, x)
    out = []
    for s in sites:
        la, aa = local[id(s)], acc[id(s)]
        out.append({"site": s.site, "role": str(s.role), "kind": s.kind, "quantizer": s.spec.quantizer,
                    "bits": s.spec.bits, "sqnr_db": _round(la.sqnr()), "cosine": _round(la.cosine(), 6),
                    "acc_sqnr_db": _round(aa.sqnr()), "acc_cosine": _round(aa.cosine(), 6)})
    return out


def _round(v: Optional[float], nd: int = 3) -> Optional[float]:
    return None if v is None or math.isinf(v) else round(v, nd)


def _top1(p: Predictions) -> float:
    return 100.0 * float((p.top1 == p.labels).float().mean()) if len(p.labels) else 0.0


def site_sensitivity(model: nn.Module, batches: Sequence[Batch], progress: bool = False,
                     sites: Optional[Sequence[FakeQuant]] = None) -> dict[str, Any]:
    """Quantize one site at a time (all others float) and measure the top-1 / test log-loss change
    against the float model on ``batches`` of ``(images, labels)``. Returns ``{"fp": {top1, nll},
    "sites": [{site, role, kind, top1, d_top1, d_nll, agree, p_value}, ...]}``; ``d_*`` = site-only
    minus float (a positive ``d_nll`` costs log-loss)."""
    sites = list(sites) if sites is not None else quantized_sites(model)
    with disabled(model), torch.no_grad():
        fp = predict(model, batches)
    rows = []
    it: Iterable[FakeQuant] = sites
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(sites, desc="sensitivity", unit="site", leave=False)
    for fq in it:
        with only(model, [fq]), torch.no_grad():
            p = predict(model, batches)
        cmp = compare_paired(fp, p)
        rows.append({"site": fq.site, "role": str(fq.role), "kind": fq.kind, "quantizer": fq.spec.quantizer,
                     "bits": fq.spec.bits, "top1": round(_top1(p), 3), "d_top1": round(cmp.diff, 3),
                     "d_nll": None if cmp.nll_diff is None else round(cmp.nll_diff, 6),
                     "agree": round(cmp.agree, 3), "p_value": round(cmp.p_value, 6)})
    return {"fp": {"top1": round(_top1(fp), 3), "nll": None if fp.nll is None else round(float(fp.nll.double().mean()), 6),
                   "images": len(fp.labels)}, "sites": rows}


def embedding_sensitivity(model: nn.Module, batches: Sequence[Batch], progress: bool = False,
                          sites: Optional[Sequence[FakeQuant]] = None) -> dict[str, Any]:
    """An encoder's :func:`site_sensitivity`: quantize one site at a time (all others float) and measure how far the
    embeddings move from the float model's on ``batches``, image by image (:func:`vitq.features.agreement`: cosine
    mean and 5th percentile, SQNR). Returns ``{"fp": {images}, "sites": [{site, role, kind, quantizer, bits,
    emb_cosine_mean, emb_cosine_p5, emb_sqnr_db, d_top1: None, d_nll: None, p_value: None}, ...]}``."""
    from ..features import agreement, embed

    sites = list(sites) if sites is not None else quantized_sites(model)
    images = [(batch_images(b), None) for b in batches]
    with disabled(model), torch.no_grad():
        ref, _ = embed(model, images)
    rows = []
    it: Iterable[FakeQuant] = sites
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(sites, desc="sensitivity", unit="site", leave=False)
    for fq in it:
        with only(model, [fq]), torch.no_grad():
            got, _ = embed(model, images)
        rows.append({"site": fq.site, "role": str(fq.role), "kind": fq.kind, "quantizer": fq.spec.quantizer,
                     "bits": fq.spec.bits, **agreement(ref, got), "d_top1": None, "d_nll": None, "p_value": None})
    return {"fp": {"images": len(ref)}, "sites": rows}


def most_sensitive(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sensitivity rows, costliest first: by log-loss increase, or by top-1 loss without log-losses; an encoder's
    (:func:`embedding_sensitivity`) by the embeddings' SQNR, lowest first."""
    if rows and "emb_sqnr_db" in rows[0]:
        return sorted(rows, key=lambda r: (r["emb_sqnr_db"], r["emb_cosine_mean"]))
    return sorted(rows, key=lambda r: r["d_nll"] if r["d_nll"] is not None else -r["d_top1"], reverse=True)


def site_samples(model: nn.Module, sites: Sequence[str], images: Iterable[Tensor], max_values: int = 200_000,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """The float tensors reaching the named sites (quantization disabled) over ``images``: a seeded
    random sample of at most ``max_values`` values, the exact min / max, and per-channel (last axis)
    min / max. Sites are found by name, so the same names work on a model before and after a
    reparameterization (two copies prepared with one recipe)."""
    by_name = {fq.site: fq for fq in fake_quants(model)}
    missing = [s for s in sites if s not in by_name]
    if missing:
        raise ConfigError(f"no quantization site named {missing[0]}: use a name from the manifest")
    chosen = [by_name[s] for s in sites]
    vals: dict[str, list[Tensor]] = {s: [] for s in sites}
    lo: dict[str, Tensor] = {}
    hi: dict[str, Tensor] = {}

    def on(fq: FakeQuant, inp: Tensor, out: Tensor) -> None:
        x = inp.detach().float()
        vals[fq.site].append(x.reshape(-1).cpu())
        c = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
        cmin, cmax = c.amin(0).cpu(), c.amax(0).cpu()
        lo[fq.site] = cmin if fq.site not in lo else torch.minimum(lo[fq.site], cmin)
        hi[fq.site] = cmax if fq.site not in hi else torch.maximum(hi[fq.site], cmax)

    device = model_device(model)
    model.eval()
    with disabled(model), _hooks(chosen, on), torch.no_grad():
        for x in images:
            forward_logits(model, batch_images(x).to(device))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites:
        v = torch.cat(vals[s]) if vals[s] else torch.zeros(0)
        sample = v if len(v) <= max_values else v[torch.randperm(len(v), generator=g)[:max_values]]
        out[s] = {"sample": sample, "min": float(v.min()) if len(v) else 0.0, "max": float(v.max()) if len(v) else 0.0,
                  "channel_min": lo.get(s), "channel_max": hi.get(s)}
    return out


def levels(fq: FakeQuant, lo: float, hi: float, points: int = 100_001) -> Optional[Tensor]:
    """The distinct values a per-tensor activation site's quantizer outputs for inputs in [lo, hi]
    (its grid, as a sorted tensor); None for per-channel / per-token / dynamic sites, which have one
    grid per channel or token."""
    if fq.kind != "act" or not isinstance(fq.spec.granularity, PerTensor) or fq.spec.dynamic or not fq.ready:
        return None
    pad = 0.05 * max(hi - lo, 1e-12)
    x = torch.linspace(lo - pad, hi + pad, points, device=fq.initialized.device)
    try:
        with torch.no_grad():
            y = _apply(fq, x.reshape(1, 1, -1))  # a 3-d tensor, as the model's activations are
    except Exception:  # noqa: BLE001 - a quantizer that needs a shape this grid does not have: no levels drawn
        return None
    return torch.unique(y.reshape(-1).cpu())


def first_batches(loader: Iterable[Any], images: int) -> list[Batch]:
    """The first ``images`` images of ``loader`` as a list of ``(images, labels)`` batches (decoded once)."""
    out: list[Batch] = []
    n = 0
    for b in loader:
        x, y = batch_images(b), batch_labels(b)
        take = min(len(x), images - n)
        out.append((x[:take], torch.as_tensor(y)[:take]))
        n += take
        if n >= images:
            break
    return out
