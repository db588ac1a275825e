"""Two-scale quantizers (twin_uniform, v2sf, o2sf) and PTF: the properties every quantizer has, the
power-of-two structure, the published formulas they must match, and the integer references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import ConfigError
from vitq.integer import integer_layernorm, two_scale_matmul
from vitq.nn.fake_quant import FakeQuant
from vitq.observers import Observer
from vitq.quantizers import QuantSpec, dequantize, fake_quant, get_quantizer, init_params, quantize
from vitq.quantizers.ptf import effective_scale
from vitq.quantizers.two_scale import GELU_MIN, outlier_channels, regions, search_params
from vitq.roles import Role


def _spec(q: str, bits: int, **opts) -> QuantSpec:
    gran = "channel" if q in ("ptf", "o2sf") else "tensor"
    return QuantSpec(q, bits, granularity=gran, options=opts)


SPECS = (
    [_spec("twin_uniform", b) for b in (2, 3, 4, 8)]
    + [_spec("twin_uniform", b, mode="gelu") for b in (2, 3, 4, 8)]
    + [_spec("twin_uniform", 4, split_rule="threshold"), _spec("twin_uniform", 4, search=False)]
    + [_spec("v2sf", b) for b in (2, 4, 8)]
    + [_spec("v2sf", 4, large_scale="max"), _spec("v2sf", 4, split_rule="threshold")]
    + [_spec("v2sf", b, mode="gelu", negative=n) for b in (3, 4, 8) for n in ("own_scale", "small_scale", "clip")]
    + [_spec("v2sf", 2, mode="gelu", negative="clip"), _spec("v2sf", 4, mode="gelu", split_rule="threshold"),
       _spec("v2sf", 4, mode="gelu", neg_range="observed", search=False)]
    + [_spec(q, b) for q in ("ptf", "o2sf") for b in (2, 4, 8)]
    + [_spec("ptf", 4, shift_rule="range"), _spec("o2sf", 4, exponent="fit"), _spec("o2sf", 4, kappa=8.0),
       _spec("o2sf", 4, zero_point="shared"), _spec("o2sf", 4, zero_point="shared", exponent="fit")]
)


def _data(seed: int, spec: QuantSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.quantizer in ("ptf", "o2sf"):
        x = torch.randn(64, 8, generator=g) * (0.5 + torch.rand(1, 8, generator=g)) + torch.randn(1, 8, generator=g)
        x[:, seed % 8] *= 4 + 28 * torch.rand(1, generator=g).item()  # one 4-32x outlier channel
        return x
    x = torch.randn(64, 12, generator=g) * (0.5 + 4 * torch.rand(1, 12, generator=g))
    return F.gelu(x) if spec.opts.mode == "gelu" else torch.softmax(x, -1)


def _params(x: torch.Tensor, spec: QuantSpec):
    obs = Observer(spec, "test")
    obs.observe(x)
    return obs.compute()


# -- properties every quantizer has ---------------------------------------------------------------
@settings(max_examples=60, deadline=None)
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
    assert torch.allclose(fake_quant(fq, p, spec), fq, atol=1e-6, rtol=0)  # idempotent
    assert torch.equal(quantize(fq, p, spec), codes)  # grid values round-trip to the same codes


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.quantizer}{s.bits}-{dict(s.options)}")
def test_all_codes_roundtrip(spec: QuantSpec) -> None:
    x = _data(1, spec)
    p = _params(x, spec)
    q = get_quantizer(spec.quantizer)
    if spec.quantizer in ("ptf", "o2sf"):
        codes = torch.arange(0, 2 ** spec.bits, dtype=torch.int32).view(-1, 1).expand(-1, x.shape[1]).contiguous()
    else:
        codes = q.used_codes(p, spec)
        lo, hi = q.code_range(spec)
        assert int(codes.min()) >= lo and int(codes.max()) <= hi
        vals = dequantize(codes, p, spec)
        assert len(set(vals.tolist())) == len(codes)  # one code per value
    assert torch.equal(quantize(dequantize(codes, p, spec), p, spec), codes)


@pytest.mark.parametrize("spec", [
    _spec("twin_uniform", 2), _spec("twin_uniform", 2, search=False), _spec("twin_uniform", 2, mode="gelu"),
    _spec("v2sf", 2), _spec("v2sf", 3, mode="gelu"), _spec("v2sf", 3, mode="gelu", search=False),
    _spec("v2sf", 3, mode="gelu", negative="small_scale"), _spec("v2sf", 2, mode="gelu", negative="clip"),
    _spec("ptf", 2), _spec("o2sf", 2), _spec("o2sf", 2, exponent="fit"),
], ids=lambda s: f"{s.quantizer}-{dict(s.options)}")
def test_more_bits_less_error(spec: QuantSpec) -> None:
    x = _data(3, spec)
    errs = []
    for b in range(spec.bits, 9):
        s = spec.with_(bits=b)
        errs.append((fake_quant(x, _params(x, s), s) - x).pow(2).mean().item())
    assert all(a >= b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_ste_gradient_inside_range() -> None:
    spec = _spec("v2sf", 4, search=False)
    p = init_params(torch.tensor([0.0]), torch.tensor([1.0]), spec)
    x = torch.linspace(0.01, 0.99, 13, requires_grad=True)  # 0.09 lies in the gap above the small region
    fake_quant(x, p, spec).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    out = torch.tensor([-0.5, 1.5], requires_grad=True)  # outside [0, 1]: no gradient
    fake_quant(out, p, spec).sum().backward()
    assert torch.equal(out.grad, torch.zeros(2))


# -- power-of-two structure ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", [s for s in SPECS if s.quantizer in ("twin_uniform", "v2sf")],
                         ids=lambda s: f"{s.quantizer}{s.bits}-{dict(s.options)}")
def test_power_of_two_ratio(spec: QuantSpec) -> None:
    p = _params(_data(5, spec), spec)
    m = p["shift"].item()
    assert m == round(m) and m >= 0
    for r in regions(p, spec):
        ratio = (r.scale / p[r.unit]).item()
        assert ratio == 2.0 ** r.shift.item()  # exact: decoding is a shift
    if spec.quantizer == "v2sf" and spec.opts.mode == "softmax" and "large_scale" not in dict(spec.options):
        assert regions(p, spec)[-1].scale.item() == pytest.approx(1 / (2 ** (spec.bits - 1) - 1), rel=1e-7)


@pytest.mark.parametrize("q", ["ptf", "o2sf"])
def test_ptf_shifts_are_integer_powers(q: str) -> None:
    spec = _spec(q, 8)
    p = _params(_data(2, spec), spec)
    assert torch.equal(p["shift"], p["shift"].round())
    assert torch.all(p["scale"] == p["scale"][0])
    assert torch.equal(effective_scale(p) / p["scale"], torch.pow(2.0, p["shift"]))
    if q == "ptf":
        assert torch.all(p["zero_point"] == p["zero_point"][0])
    else:  # two levels: (shift 0, z_n) and (shift n, z_o)
        assert len(set(zip(p["shift"].tolist(), p["zero_point"].tolist()))) <= 2 and p["shift"].min().item() == 0


# -- the published formulas -------------------------------------------------------------------
def test_twin_softmax_levels() -> None:
    spec = _spec("twin_uniform", 3, search=False, shift=1)  # split 1/2: Δ_high = 1/3, Δ_low = 1/6
    p = init_params(torch.tensor([0.0]), torch.tensor([1.0]), spec)
    levels = get_quantizer("twin_uniform").levels(p, spec)
    assert levels.tolist() == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 2 / 3, 1])


def test_twin_softmax_matches_ptq4vit_away_from_the_split() -> None:
    """PTQ4ViT: x < split -> round(x/Δ_low)Δ_low, else round(x/Δ_high)Δ_high (without the released
    code's additive quirk); the two agree except within one step above the split."""
    bits, i = 6, 4
    q = 2 ** (bits - 1) - 1
    split = 2.0 ** -i
    spec = _spec("twin_uniform", bits, search=False, shift=i)
    p = init_params(torch.tensor([0.0]), torch.tensor([1.0]), spec)
    x = torch.rand(20000, generator=torch.Generator().manual_seed(0)) ** 3
    low = torch.clamp(torch.round(x / (split / q)), 0, q) * (split / q)
    high = torch.clamp(torch.round(x * q), 0, q) / q
    ref = torch.where(x < split, low, high)
    away = (x < split) | (x > split + 1.0 / q)
    assert torch.allclose(fake_quant(x, p, spec)[away], ref[away], atol=1e-7, rtol=0)


def test_twin_gelu_matches_ptq4vit() -> None:
    """PTQ4ViT post-GELU: x_pos + x_neg with Δ_neg = 0.16997/2^{b-1} (quant_layers/linear.py)."""
    bits = 6
    h = 2 ** (bits - 1)
    x = F.gelu(torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3)
    spec = _spec("twin_uniform", bits, mode="gelu", search=False)
    p = init_params(x.min().reshape(1), x.max().reshape(1), spec)
    d_pos = x.max() / (h - 0.5)
    d_neg = GELU_MIN / h
    assert p["scale"].item() == pytest.approx(d_pos.item()) and p["scale_neg"].item() == pytest.approx(d_neg)
    ref = (torch.clamp(torch.round(x / p["scale"]), 0, h - 1) * p["scale"]
           + torch.clamp(torch.round(x / p["scale_neg"]), -h, 0) * p["scale_neg"])
    assert torch.allclose(fake_quant(x, p, spec), ref, atol=1e-7, rtol=0)


def test_v2sf_softmax_is_twin_softmax_with_split_2_pow_minus_m() -> None:
    x = _data(4, _spec("v2sf", 8))
    v = search_params(x, _spec("v2sf", 8))
    t = search_params(x, _spec("twin_uniform", 8, split_exps=list(range(1, 9))))
    assert torch.equal(v["scale"], t["scale"]) and torch.equal(v["shift"], t["shift"])
    assert torch.equal(fake_quant(x, v, _spec("v2sf", 8)), fake_quant(x, t, _spec("twin_uniform", 8)))


def test_ptf_matches_fqvit_observer() -> None:
    """FQ-ViT PtfObserver.get_quantization_params, rewritten: scale8 = (max-min)/255, z from scale8,
    per channel the first of scale1/2/4/8 with the least L2 error."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 16, generator=g)
    x[:, [2, 11]] *= 12
    x[:, 5] += 3
    spec = _spec("ptf", 8)
    p = _params(x, spec)
    qmax = 255
    scale8 = (x.max() - x.min()) / qmax
    zp = torch.clamp(-torch.round(x.min() / scale8), 0, qmax)
    want = []
    for j in range(16):
        d = x[:, j]
        errs = [((torch.clamp(torch.round(d / (scale8 / 2 ** (3 - a)) + zp), 0, qmax) - zp)
                 * (scale8 / 2 ** (3 - a)) - d).pow(2).mean().item() for a in range(4)]
        want.append(float(errs.index(min(errs))))
    assert p["shift"].tolist() == want
    assert p["zero_point"][0].item() == zp.item()
    assert p["scale"][0].item() == pytest.approx((scale8 / 8).item(), rel=1e-6)
    assert p["shift"][2].item() == 3 and p["shift"][11].item() == 3


# -- search -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [_spec("twin_uniform", 4), _spec("twin_uniform", 4, mode="gelu", search_steps=20),
                                  _spec("v2sf", 4), _spec("v2sf", 4, mode="gelu")],
                         ids=lambda s: f"{s.quantizer}-{dict(s.options)}")
def test_search_takes_the_best_candidate_and_calls_the_metric(spec: QuantSpec) -> None:
    x = _data(6, spec).flatten()
    calls = []

    def metric(xh: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (xh - xx).pow(2).mean()

    best = search_params(x, spec, metric)
    q = get_quantizer(spec.quantizer)
    cands = list(q.candidates(x.min().reshape(1), x.max().reshape(1), spec))
    assert len(calls) == len(cands)
    errs = [(fake_quant(x, c, spec) - x).pow(2).mean().item() for c in cands]
    assert (fake_quant(x, best, spec) - x).pow(2).mean().item() == pytest.approx(min(errs))
    # a different metric changes the choice: weight only the large values (as an output metric may)
    big = search_params(x, spec, lambda xh, xx: ((xh - xx) * (xx > xx.max() / 2)).pow(2).mean())
    assert (fake_quant(x, big, spec) - x)[x > x.max() / 2].pow(2).mean() <= \
        (fake_quant(x, best, spec) - x)[x > x.max() / 2].pow(2).mean() + 1e-12


# -- O-2SF ----------------------------------------------------------------------------------------
def _outlier_tensor(factor: float, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g) * (0.5 + torch.rand(64, generator=g)) + 0.3 * torch.randn(64, generator=g)
    planted = [3, 17, 40]
    x[:, planted] *= factor
    return x, planted


def test_o2sf_flags_planted_outlier_channels() -> None:
    x, planted = _outlier_tensor(16.0)
    spec = _spec("o2sf", 8)
    p = _params(x, spec)
    assert torch.nonzero(p["shift"]).flatten().tolist() == planted
    r = x.abs().amax(0)
    normal = torch.ones(64, dtype=torch.bool)
    normal[planted] = False
    n = math.ceil(math.log2(r[planted].max() / r[normal].max()))
    assert set(p["shift"].tolist()) == {0.0, float(n)}
    assert torch.nonzero(outlier_channels(x.amin(0), x.amax(0), 4.0)).flatten().tolist() == planted


@pytest.mark.parametrize("factor", [8.0, 16.0, 32.0])
def test_o2sf_beats_a_single_per_tensor_scale(factor: float) -> None:
    x, _ = _outlier_tensor(factor, seed=int(factor))
    errs = {}
    for spec in (_spec("o2sf", 8), QuantSpec("uniform", 8), _spec("o2sf", 6), QuantSpec("uniform", 6)):
        errs[(spec.quantizer, spec.bits)] = (fake_quant(x, _params(x, spec), spec) - x).pow(2).mean().item()
    assert errs[("o2sf", 8)] < errs[("uniform", 8)]
    assert errs[("o2sf", 6)] < errs[("uniform", 6)]


def test_o2sf_without_outliers_is_per_tensor_uniform() -> None:
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    spec = _spec("o2sf", 8)
    p = _params(x, spec)
    assert p["shift"].abs().sum().item() == 0
    u = QuantSpec("uniform", 8)
    assert torch.allclose(fake_quant(x, p, spec), fake_quant(x, _params(x, u), u), atol=1e-6)


def test_o2sf_in_fakequant_buffers_and_state_dict() -> None:
    x, planted = _outlier_tensor(16.0)
    x = x.view(8, 64, 64)
    fq = FakeQuant(_spec("o2sf", 8), Role.LN_IN if hasattr(Role, "LN_IN") else list(Role)[0], "ln")
    fq.start_calibration()
    fq(x)
    fq.finish_calibration()
    assert fq.shift.shape == (64,) and torch.nonzero(fq.shift).flatten().tolist() == planted
    y = fq(x)
    assert torch.equal(y, fake_quant(x, fq.params, fq.spec))
    other = FakeQuant(_spec("o2sf", 8), fq.role, "ln")
    other.load_state_dict(fq.state_dict())
    assert torch.equal(other(x), y)


# -- integer references -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [_spec("v2sf", 8), _spec("twin_uniform", 6), _spec("v2sf", 6, mode="gelu"),
                                  _spec("v2sf", 6, mode="gelu", negative="small_scale"),
                                  _spec("twin_uniform", 8, mode="gelu")],
                         ids=lambda s: f"{s.quantizer}{s.bits}-{dict(s.options)}")
def test_integer_matmul_equals_fake_quant(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 24, 24, generator=g) * 3
    a = torch.softmax(logits, -1) if spec.opts.mode == "softmax" else F.gelu(logits)
    v = torch.randn(2, 3, 24, 16, generator=g)
    vspec = QuantSpec("uniform", 8)
    pa, pv = _params(a, spec), _params(v, vspec)
    ca, cv = quantize(a, pa, spec), quantize(v, pv, vspec)
    res = two_scale_matmul(ca, pa, spec, cv, pv, vspec)
    ref = fake_quant(a, pa, spec) @ fake_quant(v, pv, vspec)
    assert torch.allclose(res["out"], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert res["fits_int32"]
    # the integer part is exact: the decoded integers are the fake-quant values over the fine scale
    b_int = cv.long() - pv["zero_point"].round().long()
    fa = fake_quant(a, pa, spec).double()
    units = list(res["acc"])
    if units == ["scale"]:
        a_int = torch.round(fa / pa["scale"].double()).long()
        assert torch.equal(res["acc"]["scale"], a_int @ b_int)
    else:
        neg = fa < 0
        a_pos = torch.round(torch.where(neg, 0, fa) / pa["scale"].double()).long()
        a_neg = torch.round(torch.where(neg, fa, 0) / pa["scale_neg"].double()).long()
        assert torch.equal(res["acc"]["scale"], a_pos @ b_int)
        assert torch.equal(res["acc"]["scale_neg"], a_neg @ b_int)


@pytest.mark.parametrize("q", ["o2sf", "ptf"])
def test_integer_layernorm_equals_fake_quant(q: str) -> None:
    x, planted = _outlier_tensor(24.0, seed=5)
    x = x.view(8, 64, 64)
    spec = _spec(q, 8)
    p = _params(x, spec)
    assert p["shift"][planted].min().item() > 0
    g = torch.Generator().manual_seed(2)
    w, b = 1 + 0.1 * torch.randn(64, generator=g), 0.1 * torch.randn(64, generator=g)
    y = integer_layernorm(quantize(x, p, spec), p, w, b, eps=1e-6)
    ref = F.layer_norm(fake_quant(x, p, spec), (64,), w, b, eps=1e-6)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)


# -- configuration errors -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(quantizer="twin_uniform", granularity="channel"),
    dict(quantizer="twin_uniform", symmetric=True),
    dict(quantizer="twin_uniform", observer="mse"),
    dict(quantizer="twin_uniform", options={"mode": "relu"}),
    dict(quantizer="twin_uniform", options={"mode": "gelu", "shift": 3}),
    dict(quantizer="twin_uniform", options={"split_exps": [-1, 2]}),
    dict(quantizer="v2sf", options={"shifts": [1, 99]}),
    dict(quantizer="v2sf", options={"nope": 1}),
    dict(quantizer="v2sf", options={"mode": "gelu", "negative": "mirror"}),
    dict(quantizer="v2sf", bits=2, options={"mode": "gelu"}),
    dict(quantizer="v2sf", options={"mode": "gelu", "clip_grid": [1.0, 0.0]}),
    dict(quantizer="v2sf", options={"search": "yes"}),
    dict(quantizer="ptf"),
    dict(quantizer="ptf", granularity="channel", options={"max_shift": -1}),
    dict(quantizer="ptf", granularity="channel", symmetric=True),
    dict(quantizer="o2sf", granularity="channel", options={"kappa": 0.5}),
    dict(quantizer="o2sf", granularity="channel", options={"exponent": "floor"}),
    dict(quantizer="o2sf", granularity="channel", observer="mse"),
])
def test_bad_specs_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        QuantSpec(**bad)
