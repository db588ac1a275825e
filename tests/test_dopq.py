"""DopQ-ViT (issue 4): MOSF targets, the I&S-ViT three-stage schedule on the reconstruction engine,
the ``dopq-calib`` / ``dopq`` recipes end to end, and where the reparameterization target cancels."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_swin, tiny_vit

import vitq
from vitq.adapters import get_adapter
from vitq.errors import ConfigError
from vitq.nn import FakeQuant, disabled, fake_quants
from vitq.passes.quantize import manifest
from vitq.passes.reparam import apply_channel_scales
from vitq.passes.repq import clip_scales_mad, reparam_scales, reparameterize
from vitq.recipes import Recipe, load_recipe
from vitq.recon import ReconConfig
from vitq.state import state_of

MODELS = [(tiny_vit, 16), (tiny_swin, 32)]
POST_LN = ("QKV_IN", "FC1_IN", "REDUCTION_IN")
#: (scale target, MAD clip k): RepQ-ViT mean, MOSF median, the mad_clip statistic, MOSF-MAD [R]
MOSF = [("mean", None), ("median", None), ("mad_clip", None), ("median", 3.0)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _recipe(name: str, pass_opts: dict | None = None, **changes) -> Recipe:
    """A shipped recipe with pass options changed (every pass of that name) for fast tests."""
    d = load_recipe(name).to_dict()
    for p in d["passes"]:
        p.update((pass_opts or {}).get(p["pass"], {}))
    d.update(changes)
    return Recipe.from_dict(d)


FAST = {"reconstruct": {"iters": 3, "num_samples": 16, "batch_size": 8},
        "tanq_calibrate": {"thetas": [0.8, 0.9], "max_images": 8}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def _channelwise(make, size: int, outliers: bool = False):
    """repq up to (not including) reparam, W4A4, on a tiny model (optionally with outlier channels)."""
    model = make()
    torch.manual_seed(2)
    calib, x = torch.randn(16, 3, size, size), torch.randn(8, 3, size, size)
    if outliers:
        pairs = get_adapter(model).ln_consumers(model)
        apply_channel_scales(model, {p.ln_name: {0: 20.0, 3: 12.0} for p in pairs})
    r = _recipe("repq", passes=[{"pass": "calibrate"}])
    return vitq.quantize(model, r, "W4A4", calib_data=calib), x


# ------------------------------------------------------------------------------------------ MOSF
def test_clip_scales_mad_is_median_plus_k_mad() -> None:
    d = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.2, 40.0, 0.95])
    med = d.median()
    mad = (d - med).abs().median()
    out = clip_scales_mad(d, 3.0)
    assert float(out[5]) == pytest.approx(float(med + 3 * mad))
    assert torch.equal(out[:5], d[:5]) and float(out[6]) == pytest.approx(0.95)
    # k = 0 clips everything above the median
    assert float(clip_scales_mad(d, 0.0).max()) == pytest.approx(float(med))


def test_mosf_mad_grids_each_channel_with_the_clipped_scale() -> None:
    """With clip_mad_k, channel c of the new LN output is gridded as (min(Δ_c, med + k MAD), z_c)."""
    torch.manual_seed(0)
    d, z = torch.rand(16) + 0.05, torch.randint(0, 15, (16,)).float()
    d[3] = 30.0
    r, b, dt, zt = reparam_scales(d, z, "median", clip_mad_k=3.0)
    dc = clip_scales_mad(d.double(), 3.0).float()
    assert float(dc[3]) < 2.0
    x = torch.randn(100, 16) * 3
    torch.testing.assert_close((x / r - b) / dt + zt, x / dc + z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("make,size", MODELS)
@pytest.mark.parametrize("target,k", MOSF)
def test_mosf_targets_keep_float_outputs(make, size: int, target: str, k) -> None:
    q, x = _channelwise(make, size, outliers=True)
    with disabled(q), torch.no_grad():
        before = q(x)
    n = reparameterize(q, target, clip_mad_k=k)
    assert n == (9 if make is tiny_swin else 4)
    with disabled(q), torch.no_grad():
        after = q(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_mosf_mad_clip_changes_the_quantized_model_target_alone_does_not() -> None:
    outs = {}
    x = None
    for target, k in (("mean", None), ("median", None), ("mad_clip", None), ("median", 3.0)):
        q, x = _channelwise(tiny_vit, 16, outliers=True)
        reparameterize(q, target, zero_point_target="mean", clip_mad_k=k)
        with torch.no_grad():
            outs[target, k] = q(x)
    ref = outs["mean", None]
    assert _rel(outs["median", None], ref) < 1e-9  # the scale target cancels
    assert _rel(outs["mad_clip", None], ref) < 1e-9  # any scale statistic cancels
    assert _rel(outs["median", 3.0], ref) > 1e-3  # clipping the outlier channels does not


@pytest.mark.parametrize("make,size", MODELS)
def test_repq_pipeline_mean_vs_median_differs_exactly_by_the_zero_point_term(make, size: int) -> None:
    """The cancellation METHODS.md §1b(ii) predicts, made precise. With the *scale* target alone
    changed the RepQ pipeline's quantized model is the same (to float rounding); with the *zero
    point* target changed too, the first consumer's output moves by exactly
    ``(W' - Ŵ') · 1 · Δt · (zt_median - zt_mean)`` (per output channel, the same for every token):
    the codes are identical, but the shift b is folded into the bias with the float W' while the
    dequantized activation meets the quantized Ŵ'."""
    runs = {}
    x = None
    for target, zp in (("mean", "mean"), ("median", "mean"), ("median", "median")):
        model = make()
        torch.manual_seed(2)
        calib, x = torch.randn(16, 3, size, size), torch.randn(4, 3, size, size)
        r = _recipe("repq", pass_opts={"reparam": {"target": target, "zero_point_target": zp}})
        q = vitq.quantize(model, r, "W4A4", calib_data=calib)
        pair = get_adapter(q).ln_consumers(q)[0]
        layer = q.get_submodule(pair.consumer_names[0])
        got: dict[str, torch.Tensor] = {}
        h = layer.register_forward_hook(lambda m, i, o, got=got: got.setdefault("y", o.detach()))
        with torch.no_grad():
            out = q(x)
        h.remove()
        runs[target, zp] = (q, layer, got["y"], out)
    (_, _, y_mm, out_mm), (_, _, y_dm, out_dm) = runs["mean", "mean"], runs["median", "mean"]
    assert _rel(out_dm, out_mm) < 1e-9 and _rel(y_dm, y_mm) < 1e-9
    q_a, lay_a, y_a, _ = runs["median", "mean"]
    q_b, lay_b, y_b, out_b = runs["median", "median"]
    assert _rel(out_b, out_mm) > 1e-6  # the zero-point target does move the result
    fq_a, fq_b = lay_a.input_quant, lay_b.input_quant
    assert torch.allclose(fq_a.scale, fq_b.scale)
    with torch.no_grad():
        w = lay_b.weight
        err = (w - lay_b.weight_quant(w)).sum(1)  # (W' - Ŵ') · 1
    pred = err * fq_b.scale * (fq_b.zero_point - fq_a.zero_point)
    diff = (y_b - y_a).reshape(-1, y_b.shape[-1])
    torch.testing.assert_close(diff, pred.expand_as(diff), atol=1e-4 * float(y_a.abs().max()), rtol=1e-3)


def test_reparam_clip_option_errors() -> None:
    q, _ = _channelwise(tiny_vit, 16)
    with pytest.raises(ConfigError, match="clip_mad_k"):
        reparameterize(q, "median", clip_mad_k=-1)
    with pytest.raises(ConfigError, match="clip_mad_k"):
        reparam_scales(torch.ones(3), torch.zeros(3), "median", clip_mad_k="big")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- engine / passes
def test_weight_quant_off_trains_float_weights_and_restores_the_switches() -> None:
    model = tiny_vit()
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    r = _recipe("dopq-calib")
    q = vitq.quantize(copy.deepcopy(model), r, "W4A4", calib_data=x)
    states = [(fq.kind, fq.enabled) for fq in fake_quants(q)]
    w0 = {n: p.detach().clone() for n, p in q.named_parameters()}
    ctx = vitq.pipeline.Context(calib=x, bits=vitq.bits.Bits.parse("W4A4"), batch_size=8)
    seen = []

    def spy(m, i, o):
        seen.append(m.enabled)

    hooks = [fq.register_forward_hook(spy) for fq in fake_quants(q, "weight")]
    from vitq.recon import reconstruct

    cfg = ReconConfig(weights="fp", acts="none", weight_quant=False, iters=3, batch_size=8, num_samples=16)
    rep = reconstruct(q, cfg, ctx)
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every weight FakeQuant was off during the pass
    assert [(fq.kind, fq.enabled) for fq in fake_quants(q)] == states
    assert sum(u["fp_weights"] for u in rep["unit_reports"]) > 0
    changed = [n for n, p in q.named_parameters() if not torch.equal(p, w0[n])]
    assert changed and all(n.endswith(("weight", "bias")) for n in changed)


def test_weight_quant_option_errors() -> None:
    with pytest.raises(ConfigError, match="weight_quant is false"):
        ReconConfig(weights="adaround", weight_quant=False)
    bad = {"passes": [{"pass": "calibrate", "weights_only": "yes"}]}
    with pytest.raises(ConfigError, match="weights_only"):
        vitq.quantize(tiny_vit(), Recipe.from_dict({**load_recipe("minmax").to_dict(), **bad}), "W8A8",
                      calib_data=torch.randn(4, 3, 16, 16))
    with pytest.raises(ConfigError, match="no option"):
        Recipe.from_dict({"passes": [{"pass": "reparam", "clip": 3}]})


def test_calibrate_weights_only_keeps_activation_parameters() -> None:
    model = tiny_vit()
    x = torch.randn(8, 3, 16, 16)
    q = vitq.quantize(model, "minmax", "W4A4", calib_data=x)
    acts = {fq.site: fq.scale.clone() for fq in fake_quants(q, "act") if fq.enabled}
    lin = next(m for m in q.modules() if isinstance(getattr(m, "weight_quant", None), FakeQuant))
    with torch.no_grad():
        lin.weight.mul_(2.0)
    s0 = lin.weight_quant.scale.clone()
    from vitq.passes.calibrate import CalibrateOptions, calibrate_pass

    calibrate_pass(q, None, CalibrateOptions(weights_only=True))
    torch.testing.assert_close(lin.weight_quant.scale, 2 * s0)
    assert all(torch.equal(fq.scale, acts[fq.site]) for fq in fake_quants(q, "act") if fq.enabled)


# ------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("make,size", MODELS)
@pytest.mark.parametrize("name", ["dopq-calib", "dopq"])
def test_dopq_recipes_end_to_end(make, size: int, name: str) -> None:
    model = make()
    torch.manual_seed(3)
    calib, x = torch.randn(16, 3, size, size), torch.randn(4, 3, size, size)
    q = vitq.quantize(copy.deepcopy(model), _recipe(name, FAST), "W8A8", calib_data=calib)
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 2e-2
    man = manifest(q)
    assert all(e["calibrated"] for e in man if e["quantizer"] != "float")
    assert {e["granularity"] for e in man if e["role"] in POST_LN and e["kind"] == "act"} == {"tensor"}
    assert {e["quantizer"] for e in man if e["role"] == "ATTN_PROBS"} == {"tanq"}
    if name == "dopq":
        reps = state_of(q).reconstruction
        assert len(reps) == 2
        assert reps[0]["config"]["weight_quant"] is False and reps[1]["config"]["weight_quant"] is True
        assert all(u["fp_weights"] > 0 for r in reps for u in r["unit_reports"] if "head" in u["unit"])


def test_dopq_recipe_shape() -> None:
    """The three stages in order, and the documented CPU defaults (paper: 1000/200 iters, 1024 images)."""
    r = load_recipe("dopq")
    names = [p.name for p in r.passes]
    assert names == ["calibrate", "tanq_calibrate", "reconstruct", "reparam", "calibrate", "reconstruct"]
    s1, s3 = r.passes[2], r.passes[5]
    assert s1.opt("weight_quant") is False and s1.opt("weights") == "fp" and s1.opt("acts") == "none"
    assert s3.opt("weight_quant", True) is True and s3.opt("weights") == "fp"
    assert r.passes[3].opt("target") == "median" and r.passes[4].opt("weights_only") is True
    assert s1.opt("iters") == s3.opt("iters") == 100 and r.calib_size == 256
    c = load_recipe("dopq-calib")
    assert [p.name for p in c.passes] == ["calibrate", "reparam", "tanq_calibrate"]


def test_cli_dopq_recipes(capsys, fmnist_dir: Path, tmp_path: Path) -> None:
    from vitq.cli import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "dopq-calib" in listed and "\n  dopq " in listed
    for name, extra in (("dopq-calib", []), ("dopq", ["--iters", "1"])):
        out = tmp_path / f"{name}.json"
        code = main(["quantize", "fmnist-vit", "--data", f"fashion-mnist:{fmnist_dir}",
                     "--recipe", name, "--bits", "W4A4", "--calib-size", "8", "--no-progress", "--json", str(out),
                     *extra])
        assert code == 0, capsys.readouterr()
        res = json.loads(out.read_text())
        assert res["recipe"] == name and res["bits"] == "W4A4"
