"""vitq report and the per-site measurements under it (vitq.insight.sites)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import has_fashion_mnist, has_reference_weights, tiny_swin, tiny_vit, unfuse

import vitq
from vitq.insight import levels, only, site_errors, site_samples, site_sensitivity
from vitq.nn import fake_quants


def _labelled(model, x):
    """Labels = the float model's own predictions (so quantization error shows as lost top-1)."""
    with torch.no_grad():
        y = model(x).argmax(-1)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]


def test_only_no_site_is_the_float_model_and_all_sites_the_quantized_one() -> None:
    x = torch.randn(8, 3, 16, 16)
    fp = unfuse(tiny_vit())  # timm's explicit attention path: the one the wrapped model computes bit for bit
    q = vitq.quantize(copy.deepcopy(fp), "minmax", "W4A4", calib_data=x)
    with torch.no_grad(), only(q, []):
        assert torch.equal(q(x), fp(x))
    with torch.no_grad(), only(q, fake_quants(q)):
        full = q(x)
    with torch.no_grad():
        assert torch.equal(full, q(x))
    assert all(fq.enabled for fq in fake_quants(q))  # the context restored every flag


def test_a_broken_site_is_found_by_error_and_by_sensitivity() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    fp = tiny_vit(depth=3)
    q = vitq.quantize(copy.deepcopy(fp), "minmax", "W8A8", calib_data=x[:32])
    victim = next(fq for fq in fake_quants(q, "act") if fq.site == "blocks.1.mlp.fc1.input_quant")
    victim.scale = victim.scale * 40  # a grid 40x too coarse: 8 bits behave like 3
    batches = _labelled(fp, x)
    errs = {e["site"]: e for e in site_errors(q, [b[0] for b in batches[:2]])}
    assert min(errs, key=lambda s: errs[s]["sqnr_db"]) == victim.site
    downstream = errs["blocks.2.attn.qkv.input_quant"]
    assert downstream["acc_sqnr_db"] < downstream["sqnr_db"]  # the broken site's error reaches later sites
    sens = site_sensitivity(q, batches)
    assert sens["fp"]["top1"] == 100.0
    worst = max(sens["sites"], key=lambda r: r["d_nll"])
    assert worst["site"] == victim.site and worst["d_nll"] > 0
    assert len(sens["sites"]) == sum(1 for m in vitq.manifest(q) if m["quantizer"] != "float")


def test_site_errors_fall_with_bits() -> None:
    x = torch.randn(16, 3, 16, 16)
    e = {}
    for bits in ("W4A4", "W8A8"):
        q = vitq.quantize(tiny_vit(), "minmax", bits, calib_data=x)
        e[bits] = {r["site"]: r["sqnr_db"] for r in site_errors(q, [x])}
    assert e["W4A4"].keys() == e["W8A8"].keys()
    assert all(e["W8A8"][s] > e["W4A4"][s] + 10 for s in e["W4A4"])  # ~6 dB per bit


def test_levels_are_the_quantizer_grid() -> None:
    x = torch.randn(16, 3, 16, 16)
    q = vitq.quantize(tiny_vit(), "repq", "W4A4", calib_data=x)
    uni = next(fq for fq in fake_quants(q, "act") if fq.site == "blocks.0.attn.proj.input_quant")
    lv = levels(uni, -10.0, 10.0)
    assert lv is not None and len(lv) == 16
    step = (lv[1:] - lv[:-1])
    assert torch.allclose(step, uni.scale.reshape(()).expand_as(step), rtol=1e-4)
    log = next(fq for fq in fake_quants(q, "act") if fq.role.value == "ATTN_PROBS")
    lv = levels(log, 0.0, 1.0)
    assert lv is not None and 2 < len(lv) <= 17 and float(lv[0]) == 0.0  # 2^A power levels + zero (repq: extra_zero)
    w = next(fq for fq in fake_quants(q, "weight"))
    assert levels(w, -1.0, 1.0) is None  # per-channel: one grid per channel, not drawn


def test_samples_find_sites_by_name_before_and_after_reparameterization() -> None:
    x = torch.randn(16, 3, 32, 32)
    fp = tiny_swin()
    before = vitq.prepare(copy.deepcopy(fp), "repq", "W4A4")
    q = vitq.quantize(copy.deepcopy(fp), "repq", "W4A4", calib_data=x)
    name = next(fq.site for fq in fake_quants(q, "act") if fq.role.value == "QKV_IN")
    a, b = site_samples(q, [name], [x])[name], site_samples(before, [name], [x])[name]
    assert a["channel_max"].shape == b["channel_max"].shape
    assert not torch.allclose(a["channel_max"], b["channel_max"])  # the fold changed the per-channel ranges
    with pytest.raises(vitq.errors.ConfigError, match="no quantization site named nope"):
        site_samples(q, ["nope"], [x])


def _render(html: Path) -> dict[str, int]:
    """Open the page in headless Chromium; the page's own script counts its images that decoded."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Chromium is not installed: run scripts/setup.sh (it installs Debian's chromium for the tests)"
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, out.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="(\d+)"', body.group(1)))
    return {k: int(v) for k, v in attrs.items()}


@pytest.mark.slow
@pytest.mark.skipif(not (has_fashion_mnist() and has_reference_weights("fmnist-vit")),
                    reason="needs Fashion-MNIST and the reference weights")
def test_cli_report_renders_in_a_browser(tmp_path: Path, capsys) -> None:
    from vitq.cli import main

    out = tmp_path / "rep"
    code = main(["report", "fmnist-vit-outlier", "--recipe", "repq", "--bits", "W4A4", "--out", str(out),
                 "--eval-size", "300", "--sensitivity-size", "200", "--error-images", "32", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    assert "most sensitive sites" in text and f"report: {out / 'report.html'}" in text
    rep = json.loads((out / "report.json").read_text())
    n_q = sum(1 for m in rep["manifest"] if m["quantizer"] != "float")
    assert len(rep["sites"]) == n_q and rep["reparameterized"]
    assert rep["figures"] == ["channels.png", "distributions.png", "errors.png", "sensitivity.png"]
    for f in rep["figures"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the outlier twin's folded channels: before reparameterization the widest channel is far wider
    html = (out / "report.html").read_text()
    assert "before reparameterization in grey" in html and html.count("data:image/png;base64,") == 4
    seen = _render(out / "report.html")
    assert seen["data-images"] == 4 and seen["data-images-ok"] == 4
