"""A calibrated model is traceable: no data-dependent Python branch in its forward, so
``torch.export.export`` succeeds and the exported program computes exactly what the eager
fake-quant model computes (the first step of a real integer export)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_swin, tiny_vit

import vitq
from vitq.errors import CalibrationError

CASES = [("minmax", "W8A8"), ("repq", "W4A8"), ("dopq-calib", "W4A8"), ("ptq4vit", "W8A8"), ("tsptq", "W8A8"),
         ("fqvit", "W4A8")]


@pytest.mark.parametrize("make,size,recipe,bits", [(tiny_vit, 16, r, b) for r, b in CASES]
                         + [(tiny_swin, 32, "repq", "W4A8"), (tiny_swin, 32, "fqvit", "W4A8")])
def test_torch_export_of_a_calibrated_model_is_exact(make, size: int, recipe: str, bits: str) -> None:
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, size, size, generator=g), torch.randn(4, 3, size, size, generator=g)
    r = vitq.load_recipe(recipe)
    if recipe == "ptq4vit":
        r = vitq.recipes.set_pass_options(r, {"steps": 4, "rounds": 1})
    q = vitq.quantize(make(), r, bits, calib_data=calib)
    ep = torch.export.export(q, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), q(x))


def test_an_uncalibrated_model_refuses_to_trace() -> None:
    q = vitq.prepare(tiny_vit(), "minmax", "W8A8")
    with pytest.raises(CalibrationError, match="has no parameters"):
        torch.export.export(q, (torch.randn(2, 3, 16, 16),))


def test_loaded_checkpoint_is_ready_without_reading_tensors(tmp_path) -> None:
    """The forward reads a Python flag mirrored from the ``initialized`` buffer when a state dict
    loads: a saved and reloaded model runs (and traces) like the one that was calibrated."""
    x = torch.randn(8, 3, 16, 16)
    q = vitq.quantize(tiny_vit(), "minmax", "W4A4", calib_data=x)
    fresh = vitq.prepare(copy.deepcopy(tiny_vit()), "minmax", "W4A4")
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
