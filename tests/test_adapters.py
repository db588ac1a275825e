"""Wrapped model with no (or disabled) quantization == the float model, per attention class."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_deit, tiny_swin, tiny_vit, unfuse

import vitq
from vitq.adapters import get_adapter
from vitq.adapters.timm.swin import TimmWindowAttention
from vitq.adapters.timm.vit import TimmAttention
from vitq.errors import ModelError
from vitq.nn import FakeQuant, QLinear, disabled

VIT_VARIANTS = {
    "vit-token": lambda: tiny_vit(),
    "vit-avg-noclass": lambda: tiny_vit(global_pool="avg", class_token=False),
    "vit-qknorm-layerscale": lambda: tiny_vit(qk_norm=True, init_values=0.1),
    "vit-registers-fcnorm": lambda: tiny_vit(reg_tokens=2, global_pool="avg", fc_norm=True),
    "vit-nobias": lambda: tiny_vit(qkv_bias=False),
    "deit-distilled": lambda: tiny_deit(),
}


@pytest.mark.parametrize("name", sorted(VIT_VARIANTS))
def test_vit_wrapped_equals_float(name: str, images16: torch.Tensor) -> None:
    model = unfuse(VIT_VARIANTS[name]())
    ref = model(images16)
    wrapped = vitq.wrap(copy.deepcopy(model))
    assert sum(isinstance(m, TimmAttention) for m in wrapped.modules()) == len(model.blocks)
    assert torch.equal(wrapped(images16), ref)  # same order of operations as timm: bit-exact
    fused = VIT_VARIANTS[name]()  # timm's default SDPA path: equal up to float rounding
    torch.testing.assert_close(wrapped(images16), fused(images16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"window_size": 8}, {"img_size": 24}])  # shifted windows, one window, padding
def test_swin_wrapped_equals_float(kw: dict) -> None:
    model = unfuse(tiny_swin(**kw))
    size = kw.get("img_size", 32)
    x = torch.randn(4, 3, size, size)
    ref = model(x)
    wrapped = vitq.wrap(copy.deepcopy(model))
    assert sum(isinstance(m, TimmWindowAttention) for m in wrapped.modules()) == 4
    assert torch.equal(wrapped(x), ref)
    torch.testing.assert_close(wrapped(x), tiny_swin(**kw)(x), atol=1e-5, rtol=1e-5)


def test_state_dict_keys_unchanged_by_wrapping() -> None:
    model = tiny_swin()
    keys = set(model.state_dict())
    wrapped = vitq.wrap(copy.deepcopy(model))
    assert set(wrapped.state_dict()) == keys


@pytest.mark.parametrize("make", [tiny_vit, tiny_deit, tiny_swin])
@pytest.mark.parametrize("recipe", ["minmax", "omse"])
def test_disabled_quantization_equals_float(make, recipe: str) -> None:
    model = unfuse(make())
    size = 32 if make is tiny_swin else 16
    x = torch.randn(6, 3, size, size)
    ref = model(x)
    q = vitq.quantize(copy.deepcopy(model), recipe, "W4A4", calib_data=x)
    assert not torch.equal(q(x), ref)  # quantization does something
    with disabled(q):
        assert torch.equal(q(x), ref)
    assert not torch.equal(q(x), ref)  # and is back on after the block


def test_every_linear_is_wrapped_with_roles() -> None:
    model = vitq.wrap(tiny_swin())
    roles = {m.role.value for m in model.modules() if isinstance(m, QLinear)}
    assert roles == {"QKV_IN", "PROJ_IN", "FC1_IN", "FC2_IN", "REDUCTION_IN", "HEAD_IN"}
    assert not any(type(m) is torch.nn.Linear for m in model.modules())


def test_sites_cover_the_protocol() -> None:
    model = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(2, 3, 16, 16))
    sites = {(fq.role.value, fq.kind) for fq in model.modules() if isinstance(fq, FakeQuant)}
    for role in ("QKV_IN", "PROJ_IN", "FC1_IN", "FC2_IN", "HEAD_IN"):
        assert (role, "act") in sites and (role, "weight") in sites
    for role in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_PROBS"):
        assert (role, "act") in sites
    assert ("PATCH_EMBED", "weight") in sites and ("PATCH_EMBED", "act") not in sites


def test_unsupported_model_type_lists_supported() -> None:
    with pytest.raises(ModelError, match="unsupported model type .*vitq supports .*VisionTransformer"):
        get_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_unsupported_features_raise() -> None:
    with pytest.raises(ModelError, match="MLP activation SiLU at blocks.0.mlp is not supported: the post-GELU"):
        vitq.wrap(tiny_vit(act_layer=torch.nn.SiLU))  # SiLU's minimum (-0.278) lies below GELU's range
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(ModelError, match="transformer block"):
        vitq.wrap(tiny_vit(block_fn=ResPostBlock))
    m = tiny_vit()
    m.blocks[0].extra = torch.nn.Linear(4, 4)  # a layer the adapter does not know: never silently float
    with pytest.raises(ModelError, match="does not know layer"):
        vitq.wrap(m)


@pytest.mark.parametrize("make,size", [(tiny_vit, 16), (tiny_deit, 16), (tiny_swin, 32)])
def test_chain_composes_to_the_model(make, size: int) -> None:
    from vitq.adapters import run_chain

    model = vitq.wrap(unfuse(make()))
    x = torch.randn(3, 3, size, size)
    pieces = get_adapter(model).chain(model)
    kinds = [p.kind for p in pieces]
    assert kinds[0] == "embed" and kinds[-1] == "head" and "attn" in kinds and "mlp" in kinds
    assert torch.equal(run_chain(pieces, x), model(x))
    if make is tiny_swin:
        assert "merge" in kinds and {p.stage for p in pieces if p.kind == "attn"} == {0, 1}


@pytest.mark.parametrize("make,size", [(tiny_vit, 16), (tiny_swin, 32)])
def test_fully_quantized_slots_exist_and_are_float_when_empty(make, size: int) -> None:
    from vitq.nn import QAdd, QLayerNorm, QSoftmax

    model = unfuse(make())
    x = torch.randn(2, 3, size, size)
    wrapped = vitq.wrap(copy.deepcopy(model))
    assert any(isinstance(m, QLayerNorm) for m in wrapped.modules())
    assert sum(isinstance(m, QAdd) for m in wrapped.modules()) == 2 * sum(isinstance(m, QSoftmax) for m in wrapped.modules())
    assert torch.equal(wrapped(x), model(x))
    again = copy.deepcopy(wrapped)  # wrapped models deep-copy (and pickle) cleanly
    assert torch.equal(again(x), model(x))
