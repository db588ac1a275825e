"""Mixed precision: per-site weight bits from measured sensitivity under a budget (vitq.insight.mixed)."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import has_fashion_mnist, has_reference_weights, tiny_vit
from test_cli import expect_error, run

import vitq
from vitq.bits import parse_auto as parse_auto_bits
from vitq.errors import ConfigError
from vitq.insight.mixed import (
    _bits_of,
    allocate,
    mixed_recipe,
    recipe_yaml,
    sensitivity_table,
)
from vitq.recipes import Recipe


def _table(n_sites: int, seed: int) -> dict:
    rnd = random.Random(seed)
    sites = []
    for i in range(n_sites):
        base = rnd.uniform(0.001, 0.1)
        kl = {"3": base * 8, "4": base * 2, "6": base / 8, "8": base / 64, "float": 0.0}
        sites.append({"module": f"m{i}", "role": "QKV_IN", "params": rnd.choice([64, 128, 256, 512]), "kl": kl})
    return {"base_kl": 0.0, "sites": sites}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [3.0, 3.7, 4.5, 6.0, 9.0])
def test_knapsack_is_the_brute_force_optimum(seed: int, budget: float) -> None:
    t = _table(4, seed)
    a = allocate(t, budget_bits=budget, resolution=20000)
    total = sum(s["params"] for s in t["sites"])
    assert a["avg_bits"] <= budget + 1e-9
    best = min((sum(s["kl"][k] for s, k in zip(t["sites"], combo)), combo)
               for combo in itertools.product(["3", "4", "6", "8", "float"], repeat=4)
               if sum(s["params"] * _bits_of(k) for s, k in zip(t["sites"], combo)) <= budget * total)
    assert a["predicted_kl"] == pytest.approx(best[0], rel=1e-9, abs=1e-12)


def test_more_budget_never_costs_more_and_limits_are_errors() -> None:
    t = _table(12, 0)
    costs = [allocate(t, budget_bits=b)["predicted_kl"] for b in (3, 3.5, 4, 5, 6, 8, 32)]
    assert all(a >= b for a, b in zip(costs, costs[1:])) and costs[-1] == 0.0
    assert set(allocate(t, budget_bits=3)["bits"].values()) == {"3"}
    with pytest.raises(ConfigError, match="below the smallest choice"):
        allocate(t, budget_bits=2.5)
    with pytest.raises(ConfigError, match="one budget"):
        allocate(t)
    mb = allocate(t, budget_mb=sum(s["params"] for s in t["sites"]) * 4 / 8e6)
    assert mb["weight_mb"] <= sum(s["params"] for s in t["sites"]) * 4 / 8e6 + 1e-12


def test_auto_bits_forms() -> None:
    assert parse_auto_bits("auto") == 8 and parse_auto_bits("autoA4") == 4 and parse_auto_bits("WautoA6") == 6
    assert parse_auto_bits("W4A4") is None
    with pytest.raises(ConfigError, match="out of range"):
        parse_auto_bits("autoA9")


def test_sensitivity_is_monotone_and_the_recipe_carries_the_choice() -> None:
    torch.manual_seed(0)
    x = torch.randn(48, 3, 16, 16)
    fp = tiny_vit()
    t = sensitivity_table(fp, "percentile", 8, x[:16], [x[16:32], x[32:]])
    assert t["base_kl"] == pytest.approx(0.0, abs=1e-7) and t["images"] == 32
    tot = {k: sum(s["kl"][k] for s in t["sites"]) for k in ("3", "4", "6", "8", "float")}
    assert tot["3"] > tot["4"] > tot["6"] > tot["8"] > tot["float"] - 1e-9  # more bits, less divergence
    for s in t["sites"]:
        kl = s["kl"]
        assert kl["3"] > kl["8"] and min(kl.values()) > -1e-6 and kl["float"] == t["base_kl"], s
    a = allocate(t, budget_bits=4.0)
    r = mixed_recipe("percentile", fp, a)
    assert Recipe.from_dict(yaml.safe_load(recipe_yaml(r))) == r  # the file reads back to the same recipe
    q = vitq.quantize(copy.deepcopy(fp), r, "W8A8", calib_data=x[:16])
    got = {m["site"].rsplit(".", 1)[0]: str(m.get("bits")) if m["quantizer"] != "float" else "float"
           for m in vitq.manifest(q) if m["kind"] == "weight"}
    assert got == a["bits"]
    assert len(set(a["bits"].values())) > 1  # a real mix at 4 bits average, not one width


def test_mixed_cli_bad_inputs(capsys) -> None:
    expect_error(["quantize", "--bits", "W4A4", "--budget", "4"], capsys, "pass --bits auto")
    expect_error(["quantize", "--bits", "auto"], capsys, "needs one budget")
    expect_error(["quantize", "--bits", "auto", "--budget", "4", "--budget-mb", "1"], capsys, "needs one budget")
    expect_error(["quantize", "--bits", "auto", "--budget", "2"], capsys, "between 3")
    expect_error(["quantize", "--bits", "autoA12", "--budget", "4"], capsys, "out of range")


@pytest.mark.slow
@pytest.mark.skipif(not (has_fashion_mnist() and has_reference_weights("fmnist-vit")),
                    reason="needs Fashion-MNIST and the reference weights")
def test_cli_bits_auto_writes_a_recipe_that_runs_again(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, text, err = run(["quantize", "fmnist-vit", "--recipe", "percentile", "--bits", "auto", "--budget", "4.5",
                           "--sensitivity-size", "128", "--eval-size", "500", "--out", str(out), "--no-progress",
                           "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    assert "mixed precision: 26 weight sites" in text and "exact multiple-choice knapsack" in text
    res = json.loads((tmp_path / "a.json").read_text())
    alloc = res["mixed_precision"]["allocation"]
    assert alloc["avg_bits"] <= 4.5 and res["recipe"] == "percentile-mixed"
    got = {m["site"].rsplit(".", 1)[0]: str(m["bits"]) for m in res["manifest"] if m["kind"] == "weight"}
    assert got == alloc["bits"]
    code, _, err = run(["quantize", "fmnist-vit", "--recipe", str(out / "recipe.yaml"), "--bits", "W8A8",
                        "--eval-size", "500", "--no-progress", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["q_top1"] == res["q_top1"] and again["manifest"] == res["manifest"]
