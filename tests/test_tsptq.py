"""TSPTQ-ViT recipe (``tsptq``) and its ablations: end to end on tiny ViT / DeiT / Swin, manifest, W8A8 error."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_deit, tiny_swin, tiny_vit, unfuse

from vitq.bits import Bits
from vitq.pipeline import Context, manifest, run_recipe
from vitq.recipes import load_recipe


def _size(make) -> int:
    return 32 if make is tiny_swin else 16


def _run(make, recipe: str, bits: str = "W8A8"):
    torch.manual_seed(3)
    x = torch.randn(2, 3, _size(make), _size(make))
    model = unfuse(make())
    q = run_recipe(copy.deepcopy(model), load_recipe(recipe), Context(calib=x, bits=Bits.parse(bits), batch_size=2))
    with torch.no_grad():
        ref, out = model(x), q(x)
    return q, ref, out


def _by_role(q) -> dict[str, set[str]]:
    roles: dict[str, set[str]] = {}
    for e in manifest(q):
        if e["kind"] == "act":
            roles.setdefault(e["role"], set()).add(e["quantizer"])
    return roles


@pytest.mark.parametrize("make", [tiny_vit, tiny_deit, tiny_swin])
def test_tsptq_end_to_end_w8a8(make) -> None:
    q, ref, out = _run(make, "tsptq")
    assert torch.isfinite(out).all()
    roles = _by_role(q)
    assert roles["ATTN_PROBS"] == {"v2sf"} and roles["FC2_IN"] == {"v2sf"}
    assert roles["LN_IN"] == {"o2sf"} and roles["RESIDUAL"] == {"o2sf"}
    assert roles["SOFTMAX_IN"] == {"uniform"}
    # fully quantized: every Linear / matmul input and every weight; only the image stays float
    float_sites = [e for e in manifest(q) if e["quantizer"] == "float"]
    assert [(e["kind"], e["role"]) for e in float_sites] == [("act", "PATCH_EMBED")]
    # random-weight tiny models (flat logits), so the bound is loose; float vs W8A8 logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.35, rel


def test_tsptq_lower_bits() -> None:
    q, ref, out = _run(tiny_vit, "tsptq", "W4A4")
    assert torch.isfinite(out).all()
    ps = [e for e in manifest(q) if e["role"] == "ATTN_PROBS" and e["kind"] == "act"]
    assert ps and all(e["quantizer"] == "v2sf" and e["bits"] == 4 for e in ps)


def _rules(name: str) -> dict[str, str]:
    r = load_recipe(name)
    assert r.full_quant
    return {k: (v.quantizer if v is not None else "float") for k, v in r.rules}


def test_tsptq_ablations() -> None:
    full = _rules("tsptq")
    v2sf_only, o2sf_only = _rules("tsptq-v2sf-only"), _rules("tsptq-o2sf-only")
    assert full["act:LN_IN"] == full["act:RESIDUAL"] == "o2sf"
    assert full["act:ATTN_PROBS"] == full["act:FC2_IN"] == "v2sf"
    assert v2sf_only["act:LN_IN"] == v2sf_only["act:RESIDUAL"] == "uniform"
    assert v2sf_only["act:ATTN_PROBS"] == v2sf_only["act:FC2_IN"] == "v2sf"
    assert o2sf_only["act:ATTN_PROBS"] == o2sf_only["act:FC2_IN"] == "uniform"
    assert o2sf_only["act:LN_IN"] == o2sf_only["act:RESIDUAL"] == "o2sf"
    for name in ("tsptq", "tsptq-v2sf-only", "tsptq-o2sf-only"):
        assert "[R]" in load_recipe(name).paper


def test_tsptq_repq_keeps_tsptq_sites_and_folds_post_ln_outliers() -> None:
    """tsptq-repq (our composition): the tsptq quantizers stay, post-LN sites end per-tensor after the
    fold, and on a model with planted LayerNorm-output outlier channels it is far closer to float."""
    from vitq.adapters import get_adapter
    from vitq.passes.reparam import apply_channel_scales

    torch.manual_seed(5)
    model = unfuse(tiny_vit())
    pairs = get_adapter(model).ln_consumers(model)
    apply_channel_scales(model, {p.ln_name: {0: 32.0, 2: 16.0} for p in pairs})
    x = torch.randn(8, 3, 16, 16)
    err = {}
    for name in ("tsptq", "tsptq-repq"):
        q = run_recipe(copy.deepcopy(model), load_recipe(name), Context(calib=x, bits=Bits.parse("W6A6"), batch_size=8))
        outs = []
        for m in (q, model):  # the first qkv output: the site whose input carries the planted channels
            h = m.get_submodule("blocks.0.attn.qkv").register_forward_hook(lambda _m, _a, o, outs=outs: outs.append(o))
            with torch.no_grad():
                m(x)
            h.remove()
        err[name] = float((outs[0] - outs[1]).pow(2).mean() / outs[1].pow(2).mean())
        if name == "tsptq-repq":
            roles = _by_role(q)
            assert roles["ATTN_PROBS"] == {"v2sf"} and roles["LN_IN"] == {"o2sf"}
            post = [e for e in manifest(q) if e["kind"] == "act" and e["role"] in ("QKV_IN", "FC1_IN")]
            assert post and all(e["granularity"] == "tensor" for e in post)
    assert err["tsptq-repq"] < 0.5 * err["tsptq"], err


def test_tsptq_hessian_search_touches_only_v2sf_sites() -> None:
    """tsptq re-chooses V-2SF's parameters with PTQ4ViT's Hessian-guided search (ptq4vit_search,
    quantizers: [v2sf]); every other quantizer is exactly as in tsptq-v2sf-mse (MSE choice only)."""
    from vitq.errors import ConfigError
    from vitq.nn import FakeQuant
    from vitq.passes.ptq4vit import search_layers

    torch.manual_seed(3)
    x = torch.randn(8, 3, 16, 16)
    model = unfuse(tiny_vit())
    ctx = lambda: Context(calib=x, bits=Bits.parse("W4A4"), batch_size=8)  # noqa: E731
    a = run_recipe(copy.deepcopy(model), load_recipe("tsptq"), ctx())
    b = run_recipe(copy.deepcopy(model), load_recipe("tsptq-v2sf-mse"), ctx())
    fb = {n: m for n, m in b.named_modules() if isinstance(m, FakeQuant)}
    changed = 0
    for n, fq in a.named_modules():
        if not isinstance(fq, FakeQuant):
            continue
        same = all(torch.equal(v, fb[n].params[k]) for k, v in fq.params.items())
        if fq.spec.quantizer == "v2sf":
            changed += not same
        else:
            assert same, n
    assert changed > 0
    layers = search_layers(a, quantizers=["v2sf"])
    assert layers and all(getattr(m, s).spec.quantizer == "v2sf" for m, slots in layers for s in slots)
    bad = load_recipe("tsptq").to_dict()
    bad["passes"][-1]["quantizers"] = ["v2sff"]
    from vitq.recipes import Recipe
    with pytest.raises(ConfigError, match="unknown quantizer 'v2sff'"):
        run_recipe(copy.deepcopy(model), Recipe.from_dict(bad), ctx())
