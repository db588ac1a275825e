"""The packed ``vitq`` format: bit packing, exact reload without the float weights, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import vitq
from vitq.adapters import ModelSource
from vitq.export.deploy import export, verify
from vitq.export.packed import pack_bits, unpack_bits


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trips(bits: int, data) -> None:
    n = data.draw(st.integers(0, 300))
    values = torch.tensor(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n)), dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_pack_refuses_values_out_of_range() -> None:
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_bits(torch.tensor([0, 16]), 4)


def test_four_bit_codes_are_two_per_byte() -> None:
    assert pack_bits(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]


@pytest.mark.parametrize("name,recipe,bits", [("fmnist-vit", "repq", "W4A4"), ("fmnist-vit-outlier", "minmax", "W3A3"),
                                              ("fmnist-swin", "percentile", "W6A6")])
def test_packed_reload_is_exact(tmp_path: Path, name: str, recipe: str, bits: str) -> None:
    m, source = vitq.load_model(name)
    size = vitq.data_config(m).input_size
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, *size, generator=g), torch.randn(8, *size, generator=g)
    q = vitq.quantize(m, recipe, bits, calib_data=calib)
    rep = export(q, tmp_path / "packed", "vitq", source=source)
    assert rep["packed_weights"] == sum(1 for e in vitq.manifest(q) if e["kind"] == "weight" and e["quantizer"] != "float")
    meta = json.loads((tmp_path / "packed" / "vitq.json").read_text())
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "packed" / "model.safetensors"))
    assert all(k + ".codes" in stored and k not in stored for k in meta["quantization_map"])  # no float weight
    assert all(stored[k].dtype == torch.uint8 for k in stored if k.endswith(".codes"))
    back = vitq.load_quantized(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_packed_refuses_a_pickled_source(tmp_path: Path) -> None:
    q = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(4, 3, 16, 16))
    with pytest.raises(vitq.errors.ModelError, match="pickle has no architecture"):
        export(q, tmp_path / "p", "vitq", source=ModelSource("pickle", "model.pt"))
    with pytest.raises(vitq.errors.ConfigError, match="needs the model's source"):
        export(q, tmp_path / "p", "vitq")


def test_packed_export_of_a_reference_model_is_exact_and_small(tmp_path: Path) -> None:
    m, source = vitq.load_model("fmnist-vit")
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sizes = {}
    for bits in ("W4A8", "W8A8"):
        q = vitq.quantize(vitq.load_model("fmnist-vit")[0], "minmax", bits, calib_data=x[:32])
        rep = export(q, tmp_path / bits, "vitq", source=source)
        sizes[bits] = rep["bytes"] / rep["float32_state_bytes"]
        res = verify(q, tmp_path / bits, [(x, q(x).argmax(-1))], fmt="vitq", max_top1_diff=0.0)
        assert res["max_logit_diff"] == 0.0 and res["agreement"] == 100.0
    # a 64-wide model: per-channel scales and the file header weigh more than at ViT sizes
    assert sizes["W4A8"] < 0.19 and sizes["W8A8"] < 0.31 and sizes["W4A8"] < 0.65 * sizes["W8A8"]


def test_packed_size_targets_on_a_vit_sized_model(tmp_path: Path) -> None:
    """At ViT widths the codes dominate: W4 within 0.16x, W8 within 0.27x of the float32 model."""
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for bits, target in (("W4A8", 0.16), ("W8A8", 0.27)):
        m, source = vitq.load_model("vit_tiny_patch16_224", random_weights=True, num_classes=10)
        q = vitq.quantize(m, "minmax", bits, calib_data=x)
        rep = export(q, tmp_path / bits, "vitq", source=source)
        assert rep["bytes"] <= target * rep["float32_state_bytes"], (bits, rep["bytes"] / rep["float32_state_bytes"])
        with torch.no_grad():
            assert torch.equal(vitq.load_quantized(tmp_path / bits)(x[:1]), q(x[:1]))


def test_cli_export_vitq_reloads_with_eval(tmp_path: Path, capsys) -> None:
    from vitq.cli import main

    run = tmp_path / "run"
    assert main(["quantize", "fmnist-vit", "--recipe", "repq", "--bits", "W4A4", "--eval-size", "200", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "vitq", "--verify", "--eval-size", "200", "--no-progress",
                 "--max-top1-diff", "0"]) == 0
    out = capsys.readouterr().out
    assert "agree on 100.00%" in out and (run / "packed" / "model.safetensors").is_file()
    assert main(["eval", str(run / "packed"), "--eval-size", "200", "--no-progress"]) == 0
