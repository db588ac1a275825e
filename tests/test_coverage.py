"""Architecture coverage (docs/coverage.md): every architecture of the catalogue behaves as its row says - a supported
one quantizes every Linear, keeps W8A8 output cosine >= 0.99 and exports to ONNX with parity; a refused one is
refused with one line that names it (never a wrong error, never a traceback)."""

from __future__ import annotations

import re

import pytest
from scripts.coverage import CASES, MIN_COSINE, check


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_each_architecture_is_what_its_row_says(case) -> None:
    if case.library == "hf":
        pytest.importorskip("transformers")
    if case.supported:
        pytest.importorskip("onnxruntime")
    r = check(case, export=case.supported)
    assert r.taken == case.supported, r.message
    if case.supported:
        assert r.quantized == r.linears > 0, (r.quantized, r.linears)  # every Linear of the model quantized
        assert r.cosine is not None and r.cosine >= MIN_COSINE, r.cosine
        assert not r.message and r.onnx_diff is not None and r.onnx_diff <= 1e-2, (r.message, r.onnx_diff)
    else:
        assert r.message and "\n" not in r.message and "Traceback" not in r.message
        assert re.search(case.refusal or type(case.build()).__name__, r.message), r.message


def test_the_coverage_page_lists_every_architecture() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "coverage.md").read_text()
    for c in CASES:
        assert f"`{c.name}`" in page, f"docs/coverage.md has no row for {c.name}: python -m scripts.coverage"


@pytest.mark.parametrize("recipe", __import__("vitq").list_recipes())
def test_every_recipe_runs_on_the_quickgelu_clip_tower(recipe: str) -> None:
    """OpenAI CLIP's image tower (QuickGELU): every shipped recipe runs, its post-GELU quantizers (twin uniform, V-2SF)
    included - QuickGELU's minimum (-0.1636) lies inside GELU's negative range, which those grids cover."""
    import torch
    from test_hf import _short

    import vitq

    case = next(c for c in CASES if c.key == "clip_quickgelu")
    x = case.input(8)
    q = vitq.quantize(case.build(), _short(recipe), "W4A4", calib_data=x)
    with torch.no_grad():
        out = q(x)
    assert out.shape == (8, 5) and (torch.isfinite(out).all() or recipe.startswith("fq"))
