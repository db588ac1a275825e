"""Quantizer properties: codes in range, idempotent, dequantize(quantize(x)) == fake_quant(x),
grid values round-trip, error falls as bits grow."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import ConfigError
from vitq.observers import Observer, mse_search, weight_params
from vitq.quantizers import QuantSpec, dequantize, fake_quant, get_quantizer, init_params, quantize
from vitq.quantizers.base import clamp

SPECS = [
    QuantSpec("uniform", b, sym, g)
    for b in (2, 3, 4, 8) for sym in (False, True) for g in ("tensor", "channel")
] + [QuantSpec(q, b) for q in ("log2", "log_sqrt2") for b in (2, 3, 4, 8)] + [
    QuantSpec("log2", 4, options={"extra_zero": True}), QuantSpec("log2", 4, options={"round_domain": "linear"})]


def _data(seed: int, spec: QuantSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g) * torch.rand(1, 6, generator=g) * 5
    if spec.quantizer != "uniform":
        x = torch.softmax(x, -1)  # post-softmax-like values in [0, 1]
    return x


def _params(x: torch.Tensor, spec: QuantSpec):
    obs = Observer(spec, "test")
    obs.observe(x)
    return obs.compute()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), idx=st.integers(0, len(SPECS) - 1))
def test_codes_in_range_and_consistent(seed: int, idx: int) -> None:
    spec = SPECS[idx]
    x = _data(seed, spec)
    p = _params(x, spec)
    codes = quantize(x, p, spec)
    lo, hi = get_quantizer(spec.quantizer).code_range(spec)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    fq = fake_quant(x, p, spec)
    assert torch.equal(dequantize(codes, p, spec), fq)
    # idempotent: values on the grid stay where they are
    assert torch.allclose(fake_quant(fq, p, spec), fq, atol=1e-6, rtol=0)
    # grid values round-trip to the same codes
    assert torch.equal(quantize(fq, p, spec), codes)


@pytest.mark.parametrize("spec", [QuantSpec("uniform", 4), QuantSpec("uniform", 4, True, "channel"),
                                  QuantSpec("log_sqrt2", 3)])
def test_all_codes_roundtrip(spec: QuantSpec) -> None:
    x = _data(0, spec)
    p = _params(x, spec)
    lo, hi = get_quantizer(spec.quantizer).code_range(spec)
    codes = torch.arange(lo, hi + 1, dtype=torch.int32).view(-1, 1).expand(-1, x.shape[1]).contiguous()
    if spec.quantizer != "uniform" or not str(spec.granularity).startswith("channel"):
        codes = codes[:, :1]
    vals = dequantize(codes, p, spec)
    assert torch.equal(quantize(vals, p, spec), codes)


@pytest.mark.parametrize("quantizer", ["uniform", "log2", "log_sqrt2"])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_more_bits_less_error(quantizer: str, observer: str) -> None:
    spec0 = QuantSpec(quantizer, 2, observer=observer)
    x = _data(3, spec0).flatten()[:, None]
    errs = []
    for b in (2, 3, 4, 6, 8):
        spec = spec0.with_(bits=b)
        errs.append((fake_quant(x, _params(x, spec), spec) - x).pow(2).mean().item())
    assert all(a >= b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_uniform_asym_exact_values() -> None:
    spec = QuantSpec("uniform", 2)  # 4 levels over [-1, 2]: step 1, zero point 1
    p = init_params(torch.tensor([-1.0]), torch.tensor([2.0]), spec)
    assert p["scale"].item() == pytest.approx(1.0)
    assert p["zero_point"].item() == 1.0
    x = torch.tensor([-3.0, -0.4, 0.6, 1.49, 7.0])
    assert fake_quant(x, p, spec).tolist() == [-1.0, 0.0, 1.0, 1.0, 2.0]


def test_log2_levels_and_zero_code() -> None:
    spec = QuantSpec("log2", 3)
    p = {"scale": torch.tensor(1.0)}
    levels = get_quantizer("log2").levels(p, spec)
    assert levels.tolist() == [0.0] + [2.0 ** -k for k in range(6, -1, -1)]  # 7 powers + zero = 8 codes
    assert fake_quant(torch.tensor([0.0, 1e-9]), p, spec).tolist() == [0.0, 0.0]
    paper = QuantSpec("log2", 3, options={"extra_zero": True})
    assert len(get_quantizer("log2").levels(p, paper)) == 9  # the papers' b bits + a separate zero


def test_log2_linear_rounding_is_fqvit_log_int_softmax() -> None:
    # FQ-ViT models/ptq/layers.py QIntSoftmax: round(sum e / e), then log_round (up at 1.5 * 2^k), codes >= 2^b -> 0
    g = torch.Generator().manual_seed(0)
    e = torch.randint(1, 2 ** 20, (200, 50), generator=g).double() * (torch.rand(200, 50, generator=g) < 0.9)
    ratio = torch.round(e.sum(-1, keepdim=True) / e)  # inf where e == 0
    big = torch.floor(torch.log2(ratio))
    big = big + ((ratio - 2 ** big) >= 2 ** (big - 1)).double()
    want = torch.where(big >= 16, torch.zeros_like(big), 2.0 ** -big.clamp(0, 15))
    spec = QuantSpec("log2", 4, options={"extra_zero": True, "round_domain": "linear"})
    got = fake_quant(e / e.sum(-1, keepdim=True), {"scale": torch.tensor(1.0, dtype=torch.float64)}, spec)
    assert torch.equal(got, want)
    # the domains differ between 2/3 and 1/sqrt2 of a power of two: 0.69 -> 1 (linear), 0.5 (log)
    one = {"scale": torch.tensor(1.0)}
    assert fake_quant(torch.tensor([0.69]), one, spec).item() == 1.0
    assert fake_quant(torch.tensor([0.69]), one, QuantSpec("log2", 4)).item() == 0.5
    with pytest.raises(ConfigError, match="round_domain"):
        get_quantizer("log_sqrt2").check_spec(QuantSpec("log_sqrt2", 4, options={"round_domain": "linear"}))


def test_log_sqrt2_levels() -> None:
    spec = QuantSpec("log_sqrt2", 3)
    levels = get_quantizer("log_sqrt2").levels({"scale": torch.tensor(1.0)}, spec)
    want = [0.0] + sorted(2.0 ** (-k / 2) for k in range(7))
    assert levels.tolist() == pytest.approx(want)


def test_ste_gradient_passes_through() -> None:
    spec = QuantSpec("uniform", 4)
    x = torch.linspace(-0.9, 0.9, 11, requires_grad=True)  # inside the range: identity gradient
    p = init_params(torch.tensor([-1.0]), torch.tensor([1.0]), spec)
    fake_quant(x, p, spec).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("lo, hi", [(0.0, 15.0), (-8.0, 7.0), (0.0, 1.0)])
def test_fast_clamp_equals_torch_clamp_in_values_and_gradient(lo: float, hi: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 51, 64) * 6  # above _CLAMP_MIN_NUMEL: the autograd function, not torch.clamp
    x[0, 0, :5] = torch.tensor([lo, hi, lo - 1e-6, hi + 1e-6, 0.5 * (lo + hi)])  # the bounds themselves
    g = torch.randn_like(x)
    grads = []
    for f in (torch.clamp, clamp):
        xi = x.clone().requires_grad_(True)
        y = f(xi, lo, hi)
        (y * g).sum().backward()
        grads.append((y.detach(), xi.grad))
    (y0, g0), (y1, g1) = grads
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert float(g1[0, 0, 0]) == 0.0 and float(g1[0, 0, 4]) == float(g[0, 0, 4])  # no gradient on a bound
    assert torch.equal(clamp(x, lo, hi), torch.clamp(x, lo, hi))  # no grad: torch's own
    assert clamp(x.clone().requires_grad_(True), lo, hi).grad_fn.name() == "_ClampBackward"  # the fast path ran


def test_mse_never_worse_than_minmax() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 1) ** 3  # heavy tails: clipping helps
    spec = QuantSpec("uniform", 4, observer="mse")
    lo, hi = x.amin(0), x.amax(0)
    p_mse = mse_search(x, lo, hi, spec)
    p_mm = init_params(lo, hi, spec)
    e_mse = (fake_quant(x, p_mse, spec) - x).pow(2).mean()
    e_mm = (fake_quant(x, p_mm, spec) - x).pow(2).mean()
    assert e_mse < e_mm


def test_per_channel_weight_params_shape() -> None:
    w = torch.randn(8, 3, 4, 4)
    p = weight_params(w, QuantSpec("uniform", 4, granularity="channel0"))
    assert p["scale"].shape == (8, 1, 1, 1)
    w2 = torch.randn(10, 6)
    p2 = weight_params(w2, QuantSpec("uniform", 4, granularity="channel0"))
    assert p2["scale"].shape == (10, 1)
    spec = QuantSpec("uniform", 8, granularity="channel0")
    err = (fake_quant(w2, p2, spec.with_(bits=4)) - w2).abs().amax(1)
    assert (err <= p2["scale"].squeeze(1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bad", [
    dict(quantizer="nope"), dict(bits=1), dict(bits=17), dict(observer="kl"), dict(granularity="rows"),
    dict(quantizer="log2", symmetric=True), dict(quantizer="log2", granularity="channel"),
])
def test_bad_specs_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        QuantSpec(**bad)


def test_spec_dict_roundtrip_and_unknown_key() -> None:
    s = QuantSpec("uniform", 4, True, "channel0", "percentile", 0.999)
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="unknown quantizer spec key"):
        QuantSpec.from_dict({"bits": 4, "bitz": 3})


def test_percentile_clips() -> None:
    x = torch.cat([torch.zeros(9999), torch.tensor([100.0])])[:, None]
    spec = QuantSpec("uniform", 8, observer="percentile", percentile=0.999)
    p = _params(x, spec)
    assert p["scale"].item() < 1.0
    assert math.isfinite(p["scale"].item())
