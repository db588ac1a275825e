"""Observers: calibration statistics -> quantizer value range -> parameters.

* ``minmax``     - exact running min / max.
* ``percentile`` - the ``p`` and ``1 - p`` quantiles of the observed values.
* ``mse``        - search of a clipping ratio on a grid, minimising ``||fake_quant(x) - x||^2``
                   per granularity group (OMSE). The search calls the quantizer's ``fake_quant``.
* ``pct_mse``    - RepQ-ViT's range search: the ``(1-p, p)`` quantiles for ``p`` in
                   ``PCT_GRID`` = {0.999, 0.9999, 0.99999}, the one with the least squared error of
                   ``fake_quant`` per group (zkkli/RepQ-ViT quant/quantizer.py, METHODS.md Notation).

Observed values are kept as a bounded random sample of rows (``max_elements``), seeded, so the
memory of a site does not grow with the calibration set; min / max are tracked exactly.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .distributed import SamplePlan, batch_offsets, survivors
from .errors import CalibrationError
from .granularity import PerChannel, param_shape, to_rows
from .quantizers.base import Params, QuantSpec, fake_quant, get_quantizer, init_params

#: clipping ratios searched by the ``mse`` observer (1.0 = min-max range)
MSE_GRID = tuple(round(1.0 - 0.01 * i, 2) for i in range(80))
#: percentiles tried by the ``pct_mse`` observer (RepQ-ViT's activation and weight grid)
PCT_GRID = (0.999, 0.9999, 0.99999)
DEFAULT_MAX_ELEMENTS = 1 << 20


class Observer:
    """Collects statistics of one site during calibration and turns them into parameters."""

    def __init__(self, spec: QuantSpec, site: str = "", max_elements: int = DEFAULT_MAX_ELEMENTS,
                 seed: int = 0, plan: Optional[SamplePlan] = None) -> None:
        self.spec = spec
        self.site = site
        self.max_elements = max_elements
        self.gen = torch.Generator().manual_seed(seed)
        self.plan = plan  # distributed calibration: the global batches (vitq.distributed)
        self.reset()

    def reset(self) -> None:
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None
        self.sample: Optional[Tensor] = None
        self.shape: Optional[torch.Size] = None
        self.count = 0
        self._keep: Optional[Tensor] = None  # distributed: the row indices one process keeps
        self._offsets: list[int] = []
        self._rows_per_image = 0
        self._parts: list[tuple[Tensor, Tensor]] = []
        self._seen: set[int] = set()

    @property
    def keeps_sample(self) -> bool:
        return self.spec.observer in ("percentile", "mse", "pct_mse") or _sample_hook(self.spec) is not None

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise CalibrationError(
                f"{bad} values reached quantization site {self.site or '?'} during calibration: "
                "check the input images and the model in float first (vitq eval)"
            )
        g = self.spec.granularity
        if self.shape is not None and isinstance(g, PerChannel) and x.shape[g.axis] != self.shape[g.axis]:
            raise CalibrationError(f"site {self.site}: channel count changed during calibration")
        self.shape = x.shape
        rows = to_rows(x, g)
        lo, hi = rows.amin(0), rows.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += rows.shape[0]
        if self.keeps_sample and self.plan is not None:
            self._observe_planned(rows)
        elif self.keeps_sample:
            self.sample = rows if self.sample is None else torch.cat([self.sample, rows])
            max_rows = max(1, self.max_elements // rows.shape[1])
            if self.sample.shape[0] > max_rows:
                keep = torch.randperm(self.sample.shape[0], generator=self.gen)[:max_rows]
                self.sample = self.sample[keep.sort().values]

    def _observe_planned(self, rows: Tensor) -> None:
        """Keep the rows of this batch that one process would keep in the end (``vitq.distributed``)."""
        assert self.plan is not None
        b = self.plan.current
        if b in self._seen:
            raise CalibrationError(f"site {self.site or '?'} ran twice on one calibration batch: distributed "
                                   "calibration needs one observation per site and batch; run this model in one process")
        self._seen.add(b)
        n_img = self.plan.batch_images[b]
        if rows.shape[0] % n_img:
            raise CalibrationError(f"site {self.site or '?'}: {rows.shape[0]} values for {n_img} images do not divide "
                                   "evenly; run this model's calibration in one process")
        rpi = rows.shape[0] // n_img
        if self._keep is None:
            self._rows_per_image = rpi
            self._keep = survivors(self.plan, rpi, max(1, self.max_elements // rows.shape[1]), self.gen)
            self._offsets = batch_offsets(self.plan, rpi)
        elif rpi != self._rows_per_image:
            raise CalibrationError(f"site {self.site or '?'}: the values per image changed between calibration batches; "
                                   "run this model's calibration in one process")
        start = self._offsets[b]
        ids = self._keep[(self._keep >= start) & (self._keep < start + rows.shape[0])]
        self._parts.append((ids, rows[ids - start].clone()))

    def _merge(self) -> None:
        """Every rank's min / max, counts and kept rows (ordered by row index, as one process keeps them)."""
        from .distributed import all_gather_objects

        mine = (self.lo, self.hi, self.count, self.shape, self._parts if self.keeps_sample else [])
        parts = [p for p in all_gather_objects(mine) if p[0] is not None]
        if not parts:
            return
        self.lo = torch.stack([p[0] for p in parts]).amin(0)
        self.hi = torch.stack([p[1] for p in parts]).amax(0)
        self.count = sum(p[2] for p in parts)
        self.shape = parts[0][3]
        if self.keeps_sample:
            pieces = [piece for p in parts for piece in p[4]]
            ids = torch.cat([i for i, _ in pieces])
            rows = torch.cat([r for _, r in pieces])
            self.sample = rows[ids.argsort()]

    def compute(self) -> Params:
        if self.plan is not None:
            self._merge()
        if self.lo is None or self.hi is None or self.shape is None:
            raise CalibrationError(
                f"quantization site {self.site or '?'} saw no data during calibration: "
                "the calibration set is empty or the model never ran this layer"
            )
        spec = self.spec
        shape = param_shape(self.shape, spec.granularity)
        lo, hi = self.lo, self.hi
        if spec.observer == "percentile":
            assert self.sample is not None
            lo, hi = quantile_range(self.sample, spec.percentile)
        hook = _sample_hook(spec)
        if hook is not None:  # quantizers that search their own parameters on the raw sample
            assert self.sample is not None
            params = hook(self.sample, lo, hi, spec)
        else:
            params = init_params(lo, hi, spec)
        if spec.observer == "mse" and hook is None:
            assert self.sample is not None
            params = mse_search(self.sample, lo, hi, spec)
        if spec.observer == "pct_mse" and hook is None:
            assert self.sample is not None
            params = percentile_search(self.sample, spec)
        return {k: v.reshape(shape) for k, v in params.items()}


def _sample_hook(spec: QuantSpec) -> Optional[Callable[..., Params]]:
    """A quantizer's optional ``init_from_sample(rows, lo, hi, spec) -> Params`` (rows: (N, groups))."""
    return getattr(get_quantizer(spec.quantizer), "init_from_sample", None)


def quantile_range(rows: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Per-column ``(1-p, p)`` quantiles of a 2-D sample."""
    if p >= 1.0:
        return rows.amin(0), rows.amax(0)
    n = rows.shape[0]
    k_hi = min(n, max(1, int(round(p * n))))
    k_lo = max(1, min(n, int(round((1 - p) * n)) + 1))
    hi = rows.kthvalue(k_hi, dim=0).values
    lo = rows.kthvalue(k_lo, dim=0).values
    return torch.minimum(lo, hi), hi


def best_per_group(rows: Tensor, candidates: Iterable[Params], spec: QuantSpec) -> Params:
    """Of several parameter candidates, per granularity group the one with the least mean squared
    quantization error of ``rows`` (every candidate is scored through fake_quant)."""
    best_err: Optional[Tensor] = None
    best: Optional[Params] = None
    for p in candidates:
        err = (fake_quant(rows, p, spec) - rows).pow(2).mean(0)
        if best is None or best_err is None:
            best, best_err = p, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = {k: torch.where(better, p[k], best[k]) for k in p}
    assert best is not None
    return best


def mse_search(rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec,
               grid: tuple[float, ...] = MSE_GRID) -> Params:
    """Clip ratio per group that minimises the mean squared quantization error (calls fake_quant)."""
    return best_per_group(rows, (init_params(lo * r, hi * r, spec) for r in grid), spec)


def percentile_search(rows: Tensor, spec: QuantSpec, grid: tuple[float, ...] = PCT_GRID) -> Params:
    """Per group, the percentile range of ``grid`` with the least squared error (calls fake_quant)."""
    return best_per_group(rows, (init_params(*quantile_range(rows, pct), spec) for pct in grid), spec)


def weight_params(w: Tensor, spec: QuantSpec, site: str = "") -> Params:
    """Parameters of a weight quantizer, computed from the weight itself."""
    obs = Observer(spec, site, max_elements=max(DEFAULT_MAX_ELEMENTS, w.numel()))
    obs.observe(w)
    return obs.compute()
