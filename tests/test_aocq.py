"""AOCQ: LN_alpha / Add_alpha (exact in float, lower per-tensor error), token-norm loss, stage-1
activation-scale search (monotone), the aocq recipe end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import has_fashion_mnist, has_reference_weights, tiny_deit, tiny_swin, tiny_vit

import vitq
from vitq.adapters import get_adapter
from vitq.bits import Bits
from vitq.errors import ConfigError
from vitq.models import load_into
from vitq.nn import FakeQuant, QLayerNorm
from vitq.passes.outlier import balance, balance_cost, per_tensor_quant_error, pow2_balance
from vitq.passes.reparam import fold_ln_affine
from vitq.passes.scale_search import ScaleSearchConfig, coordinate_search, search_act_scales, step_factors
from vitq.pipeline import Context, manifest, prepare, run_recipe, wrap
from vitq.quantizers.base import QuantSpec
from vitq.recipes import Recipe, load_recipe
from vitq.recon import ReconConfig, get_loss
from vitq.recon.losses import lp_loss, token_norm_loss, token_norm_terms, token_norm_weights
from vitq.roles import Role
from vitq.state import state_of


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _size(make) -> int:
    return 32 if make is tiny_swin else 16


@torch.no_grad()
def unbalanced(make, seed: int = 0) -> torch.nn.Module:
    """A tiny wrapped model with strongly unbalanced residual-stream and LayerNorm-output channels
    (writers of every stream multiplied by random factors 2^N(0, 1.5) - a different, valid model;
    LayerNorm outputs rescaled function-preservingly by the same kind of factors)."""
    model = wrap(make())
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    for s in ad.residual_streams(model):
        c = torch.pow(2.0, torch.randn(s.width, generator=g) * 1.5) * 1.1  # not powers of two
        for w in s.writers:
            if w.kind == "param":
                getattr(model, w.name).mul_(c)
                continue
            m = model.get_submodule(w.name)
            m.weight.mul_(c.reshape(-1, *([1] * (m.weight.ndim - 1))))
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(c)
    for p in ad.ln_consumers(model):
        ln = model.get_submodule(p.ln_name)
        r = torch.pow(2.0, -torch.randn(ln.weight.numel(), generator=g) * 2.0) * 0.9
        fold_ln_affine(ln, [model.get_submodule(n) for n in p.consumer_names], r)
    return model.eval()


# -- operator level ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_vit, tiny_deit, tiny_swin])
def test_balance_keeps_float_outputs(make) -> None:
    model = unbalanced(make)
    torch.manual_seed(2)
    x = torch.randn(6, 3, _size(make), _size(make))
    ref = model(x)
    b = copy.deepcopy(model)
    rep = balance(b, [x[:3], x[3:]])
    assert sum(r["channels_scaled"] for r in rep["add_alpha"].values()) > 0
    assert sum(r["channels_scaled"] for r in rep["ln_alpha"].values()) > 0
    if make is tiny_swin:
        assert len(rep["add_alpha"]) == 2  # one stream per stage, across the patch merging
    torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-6)
    # with any quantizer present but disabled, the recipe path gives the same float model
    q = prepare(copy.deepcopy(model), "aocq", "W8A8")
    run_recipe(q, Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}]}, "t"),
               Context(calib=x, bits=Bits.parse("W8A8")))
    with vitq.nn.disabled(q):
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-6)


def test_pow2_balance_rules() -> None:
    lo = -torch.tensor([1.0, 1.0, 1.0, 32.0, 0.25])
    hi = -lo
    a = pow2_balance(lo, hi, rule="median")
    assert torch.equal(a, torch.tensor([1.0, 1.0, 1.0, 32.0, 0.25]))
    for rule in ("median", "mse"):
        a = pow2_balance(lo, hi, rule=rule)
        assert torch.equal(a, torch.pow(2.0, torch.log2(a).round()))  # powers of two
        e = torch.log2(a)
        assert balance_cost(lo, hi, e) < balance_cost(lo, hi, torch.zeros(5))
    # mildly unbalanced, asymmetric: mse never worse than doing nothing
    g = torch.Generator().manual_seed(0)
    lo, hi = -torch.rand(3, 16, generator=g) - 0.5, torch.rand(3, 16, generator=g) * 3 + 0.5
    e = torch.log2(pow2_balance(lo, hi, rule="mse"))
    assert balance_cost(lo, hi, e) <= balance_cost(lo, hi, torch.zeros(16))
    dead = pow2_balance(torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]), max_exp=3, rule="median")
    assert torch.equal(dead, torch.tensor([1.0, 1.0, 0.125]))  # a dead channel: clamped
    with pytest.raises(ConfigError):
        pow2_balance(lo, hi, rule="max")


@pytest.mark.skipif(not (has_reference_weights("fmnist-vit") and has_reference_weights("fmnist-swin")
                         and has_fashion_mnist()), reason="reference weights / Fashion-MNIST missing")
@pytest.mark.parametrize("name", ["fmnist-vit-outlier", "fmnist-swin-outlier"])
def test_balance_lowers_per_tensor_error_on_outlier_models(name) -> None:
    from vitq.data import DataSpec, Preprocess, build_dataset, calibration_subset, stack_images
    from vitq.models import data_config
    from vitq.reference import load_reference

    model = wrap(load_reference(name))
    pre = Preprocess(data_config(model))
    x, _ = stack_images(calibration_subset(build_dataset(DataSpec.parse("fashion-mnist"), "train", pre), 32, 0))
    ad = get_adapter(model)
    cap: dict = {}
    hooks = [model.get_submodule(p.ln_name).register_forward_hook(
        lambda _m, _i, y, n=p.ln_name: cap.__setitem__(n, y.detach())) for p in ad.ln_consumers(model)]
    for s in ad.residual_streams(model):
        for r in s.readers:
            hooks.append(model.get_submodule(r.name).register_forward_pre_hook(
                lambda _m, a, k=(s.name, r.name), t=r.tile: cap.__setitem__(k, a[0].detach().reshape(-1, t, a[0].shape[-1] // t))))
    with torch.no_grad():
        model(x)
    before = dict(cap)
    rep = balance(model, [x])
    with torch.no_grad():
        model(x)
    for bits in (8, 4):
        for p in ad.ln_consumers(model):
            alpha = torch.pow(2.0, torch.tensor(rep["ln_alpha"][p.ln_name]["exponents"], dtype=torch.float32))
            torch.testing.assert_close(cap[p.ln_name] * alpha, before[p.ln_name], rtol=1e-6, atol=1e-6)
            assert per_tensor_quant_error(before[p.ln_name], alpha, bits) < \
                0.8 * per_tensor_quant_error(before[p.ln_name], None, bits)
        tot_b = tot_a = 0.0
        for s in ad.residual_streams(model):
            alpha = torch.pow(2.0, torch.tensor(rep["add_alpha"][s.name]["exponents"], dtype=torch.float32))
            eb = sum(per_tensor_quant_error(before[(s.name, r.name)], None, bits) for r in s.readers)
            ea = sum(per_tensor_quant_error(before[(s.name, r.name)], alpha, bits) for r in s.readers)
            assert ea <= eb * 1.0001
            tot_b, tot_a = tot_b + eb, tot_a + ea
        assert tot_a < 0.95 * tot_b


def test_add_alpha_checkpoint_round_trip() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    model = unbalanced(tiny_vit)
    r = Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
    q = run_recipe(copy.deepcopy(model), r, Context(calib=x, bits=Bits.parse("W8A8")))
    assert any(isinstance(m, QLayerNorm) and m.input_scale is not None for m in q.modules())
    fresh = prepare(copy.deepcopy(model), r, "W8A8")
    load_into(fresh, q.state_dict(), "test")
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


def test_balance_pass_errors() -> None:
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ConfigError, match="before calibrate"):
        vitq.quantize(tiny_vit(), Recipe.from_dict(
            {"extends": "aocq", "passes": [{"pass": "calibrate"}, {"pass": "aocq_balance"}]}, "t"), "W8A8", x)
    with pytest.raises(ConfigError):
        Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance", "alpha": 2}]}, "t")
    with pytest.raises(ConfigError, match="add_rule"):
        vitq.quantize(tiny_vit(), Recipe.from_dict(
            {"extends": "aocq", "passes": [{"pass": "aocq_balance", "add_rule": "max"}]}, "t"), "W8A8", x)


# -- loss level ------------------------------------------------------------------------------------
def test_token_norm_equals_weighted_mse_and_mse_for_equal_norms() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 7, 5, generator=g)
    y[:, 2] *= 40.0  # an extreme token
    yh = y + 0.1 * torch.randn(3, 7, 5, generator=g)
    w = token_norm_weights(y)
    n = y.pow(2).sum(-1)
    eps = 1e-2
    m = n.median(1, keepdim=True).values
    torch.testing.assert_close(w, (1 + eps) * m / (n + eps * m))
    mm = n.mean(1, keepdim=True)
    torch.testing.assert_close(token_norm_weights(y, ref="mean"), (1 + eps) * mm / (n + eps * mm))
    torch.testing.assert_close(get_loss("token_norm_mean").fn(yh, y, None, 2.0),
                               ((yh - y).pow(2) * token_norm_weights(y, ref="mean").unsqueeze(-1)).sum(1).mean())
    torch.testing.assert_close(token_norm_loss(yh, y, None, 2.0), ((yh - y).pow(2) * w.unsqueeze(-1)).sum(1).mean())
    torch.testing.assert_close(token_norm_terms(yh, y).sum(1).mean() / 5, token_norm_loss(yh, y, None, 2.0))
    # every token of the same norm: exactly the engine's mse
    yu = y / y.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(token_norm_loss(yh, yu, None, 2.0), lp_loss(yh, yu, 2.0))
    # logits (B, K): one token per sample, mse
    torch.testing.assert_close(token_norm_loss(yh[:, 0], y[:, 0], None, 2.0), lp_loss(yh[:, 0], y[:, 0], 2.0))
    # Swin layout (B, H, W, C): tokens over H and W
    y4, yh4 = y.reshape(3, 7, 1, 5).expand(3, 7, 2, 5), yh.reshape(3, 7, 1, 5).expand(3, 7, 2, 5)
    assert token_norm_weights(y4).shape == (3, 7, 2)
    assert get_loss("token_norm").fn is token_norm_loss
    ReconConfig(loss="token_norm")  # usable by any recipe: loss: token_norm
    assert float(token_norm_loss(yh4, y4, None, 2.0)) > 0


def test_token_norm_is_scale_invariant_per_token() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 9, 6, generator=g)
    err = 0.05 * torch.randn(2, 9, 6, generator=g)
    c = torch.ones(2, 9, 1)
    c[0, 3], c[1, 0] = 1000.0, 0.001  # not the median token of their sample
    m = lambda t: t.pow(2).sum(-1).median(1, keepdim=True).values  # noqa: E731
    base = token_norm_terms(y + err, y, eps=0.0) / m(y)
    scaled = token_norm_terms(c * (y + err), c * y, eps=0.0) / m(c * y)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=0)  # each token: relative error
    # a token scaled 1000x (its error with it) takes over mse, not token_norm
    yh = c * (y + err)
    share_mse = (yh - c * y)[0, 3].pow(2).sum() / (yh - c * y)[0].pow(2).sum()
    tn = token_norm_terms(yh, c * y)
    share_tn = tn[0, 3] / tn[0].sum()
    assert share_mse > 0.99
    assert share_tn < 0.5
    tm = token_norm_terms(yh, c * y, ref="mean")  # the mean reference lets the extreme token dominate
    assert tm[0, 3] / tm[0].sum() > 0.9


# -- framework level -------------------------------------------------------------------------------
def test_step_factors_and_coordinate_search_monotone() -> None:
    assert step_factors(0, 2, 1.0, 0.5) == [0.5, 2 ** -0.5, 2 ** 0.5, 2.0]
    assert step_factors(3, 1, 1.0, 0.5) == [2 ** -0.125, 2 ** 0.125]
    fqs = []
    for s0 in (1.0, 0.2):
        fq = FakeQuant(QuantSpec(), Role.LN_IN, site=f"s{s0}")
        fq.set_params({"scale": torch.tensor([s0]), "zero_point": torch.tensor([0.0])})
        fqs.append(fq)
    target = (0.3, 0.9)
    loss = lambda _i: sum((float(f.scale) - t) ** 2 for f, t in zip(fqs, target))  # noqa: E731
    hist = coordinate_search(fqs, loss, steps=4, points=2, span=1.0, shrink=0.5)
    assert len(hist) == 5 and all(b <= a for a, b in zip(hist, hist[1:]))
    assert hist[-1] < 0.05 * hist[0]


def test_stage1_never_increases_block_loss() -> None:
    torch.manual_seed(3)
    x = torch.randn(16, 3, 16, 16)
    model = unbalanced(tiny_vit)
    ctx = Context(calib=x, bits=Bits.parse("W4A8"), batch_size=8)
    r = Recipe.from_dict({"extends": "aocq", "passes": [{"pass": "aocq_balance"}, {"pass": "calibrate"}]}, "t")
    q = run_recipe(copy.deepcopy(model), r, ctx)
    s0 = {fq.site: fq.scale.clone() for fq in vitq.nn.fake_quants(q, "act") if fq.spec.quantizer == "uniform"}
    w_enabled = [fq.enabled for fq in vitq.nn.fake_quants(q, "weight")]
    rep = search_act_scales(q, ScaleSearchConfig(steps=2, points=1, num_samples=16, batch_size=8), ctx)
    assert [fq.enabled for fq in vitq.nn.fake_quants(q, "weight")] == w_enabled  # weights restored
    blocks = [u for u in rep["units"] if u["sites"] > 0]
    assert blocks
    for u in blocks:
        assert len(u["losses"]) == 3
        assert all(b <= a for a, b in zip(u["losses"], u["losses"][1:]))
    assert any(u["losses"][-1] < u["losses"][0] for u in blocks)
    assert any(not torch.equal(fq.scale, s0[fq.site]) for fq in vitq.nn.fake_quants(q, "act") if fq.site in s0)
    with pytest.raises(ConfigError):
        ScaleSearchConfig(steps=-1)
    with pytest.raises(ConfigError, match="gradients"):
        ScaleSearchConfig(loss="fisher_diag")


# -- recipe end to end ----------------------------------------------------------------------------
def small_aocq(**balance) -> Recipe:
    return Recipe.from_dict({"extends": "aocq", "passes": [
        {"pass": "aocq_balance", **balance}, {"pass": "calibrate"},
        {"pass": "aocq_act_scales", "steps": 1, "points": 1, "num_samples": 8, "batch_size": 8},
        {"pass": "reconstruct", "weights": "adaround", "acts": "none", "loss": "token_norm", "iters": 4,
         "num_samples": 8, "batch_size": 4}]}, "aocq-small")


@pytest.mark.parametrize("make,bits", [(tiny_vit, "W4A8"), (tiny_swin, "W8A8")])
def test_aocq_end_to_end(make, bits) -> None:
    torch.manual_seed(4)
    x = torch.randn(8, 3, _size(make), _size(make))
    model = unbalanced(make)
    with torch.no_grad():
        ref = model(x)
    q = run_recipe(copy.deepcopy(model), small_aocq(), Context(calib=x, bits=Bits.parse(bits), batch_size=8))
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all()
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert rel < 0.5
    roles = {m["role"] for m in manifest(q) if m["quantizer"] != "float"}
    assert {"LN_IN", "RESIDUAL", "SOFTMAX_IN", "ATTN_PROBS", "QKV_IN"} <= roles
    assert state_of(q).act_scales["units"] and state_of(q).reconstruction[-1]["config"]["loss"] == "token_norm"


def test_aocq_recipe_loads() -> None:
    r = load_recipe("aocq")
    assert r.full_quant and [p.name for p in r.passes] == ["aocq_balance", "calibrate", "aocq_act_scales", "reconstruct"]
    assert dict(r.passes[3].options)["acts"] == "none" and dict(r.passes[3].options)["loss"] == "token_norm"
