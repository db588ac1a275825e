"""TanQ (our reconstruction [R] of DopQ-ViT's tangent quantizer): the quantizer properties every
quantizer has, the documented level values, density at both ends, the θ search and its pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitq.errors import ConfigError
from vitq.observers import Observer
from vitq.quantizers import QuantSpec, dequantize, fake_quant, get_quantizer, quantize
from vitq.quantizers.tan import attention_output_error, search_theta

TANQ = get_quantizer("tanq")
SPECS = [QuantSpec("tanq", b, options=o) for b in (2, 3, 4, 6, 8)
         for o in ({}, {"theta": 0.6}, {"theta": 0.98}, {"level_fn": "logtan"},
                   {"level_fn": "logtan", "theta": 0.9})]


def _softmax_data(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 16, generator=g) * torch.rand(64, 1, generator=g) * 8
    return torch.softmax(logits, -1)


def _params(x: torch.Tensor, spec: QuantSpec):
    obs = Observer(spec, "test")
    obs.observe(x)
    return obs.compute()


def _unit(spec: QuantSpec, theta: float | None = None):
    th = spec.opts.initial_theta if theta is None else theta
    return {"scale": torch.tensor(1.0), "theta": torch.tensor(float(th))}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), idx=st.integers(0, len(SPECS) - 1))
def test_codes_in_range_and_consistent(seed: int, idx: int) -> None:
    spec = SPECS[idx]
    x = _softmax_data(seed)
    p = _params(x, spec)
    codes = quantize(x, p, spec)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** spec.bits - 1
    fq = fake_quant(x, p, spec)
    assert torch.equal(dequantize(codes, p, spec), fq)
    assert torch.allclose(fake_quant(fq, p, spec), fq, atol=1e-6, rtol=0)  # idempotent
    assert torch.equal(quantize(fq, p, spec), codes)  # grid values keep their codes


@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits <= 6])
def test_all_codes_roundtrip(spec: QuantSpec) -> None:
    # (at 8 bits logtan's smallest levels 2^-q underflow float32 and merge with 0, as log2's do)
    p = {"scale": torch.tensor(0.8), "theta": torch.tensor(float(_unit(spec)["theta"]))}
    codes = torch.arange(2 ** spec.bits, dtype=torch.int32)
    vals = dequantize(codes, p, spec)
    assert torch.equal(quantize(vals, p, spec), codes)
    assert torch.equal(fake_quant(vals, p, spec), vals)


def test_out_of_range_values_clamp() -> None:
    spec = QuantSpec("tanq", 4)
    p = {"scale": torch.tensor(0.5), "theta": torch.tensor(0.9)}
    out = fake_quant(torch.tensor([-1.0, 0.0, 0.5, 0.9, 3.0]), p, spec)
    assert out.tolist() == [0.0, 0.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("options", [{}, {"level_fn": "logtan"}, {"theta": 0.98}])
def test_more_bits_less_error(options: dict) -> None:
    x = _softmax_data(3).flatten()[:, None]
    errs = []
    for b in (2, 3, 4, 6, 8):
        spec = QuantSpec("tanq", b, options=options)
        errs.append((fake_quant(x, _params(x, spec), spec) - x).pow(2).mean().item())
    assert all(a >= b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0]
    if options.get("level_fn", "tan") == "tan":  # logtan, like log2, adds bits only near 0
        assert errs[-1] < errs[0] / 100


def test_documented_level_values() -> None:
    """The values METHODS.md §1b(iii) lists for Variants A and B."""
    lv = lambda spec, th: TANQ.levels(_unit(spec, th), spec).tolist()  # noqa: E731
    a3 = QuantSpec("tanq", 3)
    assert lv(a3, 0.8) == pytest.approx([0, .045, .133, .335, .665, .867, .955, 1], abs=6e-4)
    assert lv(a3, 0.9) == pytest.approx([0, .022, .070, .240, .760, .930, .978, 1], abs=6e-4)
    want4 = [0, .0084, .0197, .0357, .0602, .1013, .1813, .3591, .6409, .8187, .8987, .9398, .9643,
             .9803, .9916, 1]
    assert lv(QuantSpec("tanq", 4), 0.9) == pytest.approx(want4, abs=6e-5)
    b3 = QuantSpec("tanq", 3, options={"level_fn": "logtan"})  # default θ = 0.5: (4/π) arctan(2^-q)
    assert lv(b3, 0.5) == pytest.approx(sorted([1, .590, .312, .158, .080, .040, .020, 0]), abs=6e-4)
    lvl = lv(a3, 0.8)
    assert lvl[0] == 0.0 and lvl[-1] == 1.0  # exact ends


def test_levels_dense_at_both_ends() -> None:
    spec = QuantSpec("tanq", 4)
    tan = TANQ.levels(_unit(spec), spec)
    log2 = get_quantizer("log2").levels({"scale": torch.tensor(1.0)}, QuantSpec("log2", 4))
    uniform = torch.linspace(0, 1, 16)
    top = lambda lv: int(((lv >= 0.5) & (lv <= 1)).sum())  # noqa: E731
    low = lambda lv: int((lv <= 0.05).sum())  # noqa: E731
    assert top(tan) > top(log2) and top(tan) >= 6
    assert low(tan) > low(uniform)
    # symmetric: level k and level N-1-k are mirror images
    assert torch.allclose(tan + tan.flip(0), torch.ones(16), atol=1e-6)


def test_beats_log2_on_power_law_with_mass_near_one() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=g)
    near0 = u[:180_000] ** 6  # power law: most mass near 0
    near1 = 1 - 0.3 * u[180_000:] ** 3  # the sparse, important values near 1
    x = torch.cat([near0, near1])[:, None]
    for b in (3, 4):
        t_spec, l_spec = QuantSpec("tanq", b), QuantSpec("log2", b)
        e_t = (fake_quant(x, _params(x, t_spec), t_spec) - x).pow(2).mean()
        e_l = (fake_quant(x, _params(x, l_spec), l_spec) - x).pow(2).mean()
        assert e_t < e_l, (b, e_t, e_l)


def test_straight_through_gradient() -> None:
    spec = QuantSpec("tanq", 3)
    p = {"scale": torch.tensor(0.5, requires_grad=True), "theta": torch.tensor(0.9, requires_grad=True)}
    x = torch.tensor([-0.2, 0.1, 0.3, 0.45, 0.9], requires_grad=True)
    fake_quant(x, p, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert p["scale"].grad is not None and p["theta"].grad is not None  # the LUT is differentiable


@pytest.mark.parametrize("bad", [
    dict(options={"level_fn": "sin"}), dict(options={"theta": 1.0}), dict(options={"theta": 0}),
    dict(options={"theta": "big"}), dict(options={"thetta": 0.9}), dict(symmetric=True),
    dict(granularity="channel"),
])
def test_bad_specs_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        QuantSpec("tanq", 4, **bad)


def _attention(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 4, 32, 32, generator=g) * torch.rand(8, 4, 32, 1, generator=g) * 6
    return torch.softmax(logits, -1), torch.randn(8, 4, 32, 16, generator=g)


@pytest.mark.parametrize("level_fn", ["tan", "logtan"])
def test_theta_search_no_worse_than_default(level_fn: str) -> None:
    a, v = _attention()
    spec = QuantSpec("tanq", 4, options={"level_fn": level_fn})
    best, table = search_theta(a, v, spec)
    err_best = attention_output_error(a, v, best, spec)
    for s in {1.0, max(r["scale"] for r in table), min(r["scale"] for r in table)}:
        default = {"scale": torch.tensor(s), "theta": torch.tensor(0.9)}
        assert err_best <= attention_output_error(a, v, default, spec) + 1e-9
    assert err_best == pytest.approx(min(r["error"] for r in table))
    assert len(table) == 7 * len({r["scale"] for r in table})


def test_theta_search_rejects_bad_input() -> None:
    a, v = _attention()
    with pytest.raises(ConfigError):
        search_theta(a, v, QuantSpec("log2", 4))
    with pytest.raises(ConfigError):
        search_theta(a, v, QuantSpec("tanq", 4), grid=(0.5, 1.2))
    with pytest.raises(ConfigError):
        search_theta(a, v, QuantSpec("tanq", 4), scales=("huge",))


def test_tanq_calibrate_pass_on_vit_and_swin() -> None:
    from conftest import tiny_swin, tiny_vit

    from vitq import Bits, Context, Recipe, manifest, run_recipe
    from vitq.adapters.timm.swin import TimmWindowAttention
    from vitq.adapters.timm.vit import TimmAttention
    from vitq.passes.tanq_calib import tanq_sites

    recipe = Recipe.from_dict({
        "extends": "fp", "name": "tanq-probs",
        "rules": {"act:ATTN_PROBS": {"quantizer": "tanq", "bits": "A", "options": {"theta": 0.9}}},
        "passes": [{"pass": "calibrate"}, {"pass": "tanq_calibrate", "thetas": [0.6, 0.9], "max_images": 4}],
    })
    for make, size, typ in ((tiny_vit, 16, TimmAttention), (tiny_swin, 32, TimmWindowAttention)):
        model = make()
        x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
        run_recipe(model, recipe, Context(calib=x, bits=Bits.parse("W8A4"), batch_size=3))
        sites = tanq_sites(model)
        assert len(sites) == sum(isinstance(m, typ) for m in model.modules()) > 0
        for _, fq in sites:
            assert float(fq.theta) in (pytest.approx(0.6), pytest.approx(0.9))
            assert 0 < float(fq.scale) <= 1.0
        quantized = [e for e in manifest(model) if e["quantizer"] != "float"]
        assert {e["role"] for e in quantized} == {"ATTN_PROBS"}
        assert torch.isfinite(model(x)).all()
