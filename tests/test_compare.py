"""vitq compare MODEL --recipes ... --bits ... --seeds ...: recipes x bits x seeds in one table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import has_fashion_mnist, has_reference_weights, tiny_vit
from test_cli import expect_error, run

from vitq.run import manifest_digest
from vitq.run.compare import compare, to_csv, to_markdown


def _data():
    torch.manual_seed(1)
    x = torch.randn(96, 3, 16, 16)
    with torch.no_grad():
        y = tiny_vit()(x).argmax(-1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)], {0: x[:16], 1: x[16:32], 2: x[32:48]}


def test_compare_rows_are_the_runs_and_the_tests_against_the_first() -> None:
    batches, calib = _data()
    res = compare(tiny_vit(), batches, calib, ["minmax", "percentile"], ["W4A4", "W8A8"])
    assert [(r["recipe"], r["bits"]) for r in res["rows"]] == [("minmax", "W4A4"), ("percentile", "W4A4"),
                                                                ("minmax", "W8A8"), ("percentile", "W8A8")]
    assert res["fp"]["top1"] == 100.0 and len(res["runs"]) == 2 * 2 * 3
    for row in res["rows"]:
        mine = [r["top1"] for r in res["runs"] if r["recipe"] == row["recipe"] and r["bits"] == row["bits"]]
        assert [x["q_top1"] for x in row["per_seed"]] == [round(v, 2) for v in mine]
        assert abs(row["q_top1"] - sum(mine) / 3) < 6e-3 and row["schema"] == "vitq.result/1"
        assert row["q_top1_std"] is not None and row["q_top1_std"] >= 0
    first, other = res["rows"][0], res["rows"][1]
    assert first["vs_first"] is None
    assert abs(other["vs_first"]["diff"] - (other["q_top1"] - first["q_top1"])) < 1e-2  # pooled = mean of per-seed diffs
    assert other["vs_first"]["seeds"] == 3 and other["vs_fp_pooled"]["seeds"] == 3 and other["vs_fp"] is None
    w4 = {r["recipe"]: r["q_top1"] for r in res["rows"] if r["bits"] == "W4A4"}
    w8 = {r["recipe"]: r["q_top1"] for r in res["rows"] if r["bits"] == "W8A8"}
    assert all(w8[k] >= w4[k] for k in w4)  # more bits, less error
    # a recipe's manifest is the same for every seed, and differs between recipes and bits
    digests = {(r["recipe"], r["bits"]): r["digest"] for r in res["rows"]}
    assert len(set(digests.values())) == 4
    md = to_markdown(res)
    assert md.count("\n") == 2 + 4 and "(reference)" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(res))))
    assert len(rows) == 4 and rows[1]["recipe"] == "percentile" and rows[1]["top1_per_seed"].count(" ") == 2


def test_compare_equals_quantize_on_the_same_seed() -> None:
    import copy

    import vitq

    batches, calib = _data()
    res = compare(tiny_vit(), batches, {1: calib[1]}, ["omse"], ["W4A4"])
    q = vitq.quantize(copy.deepcopy(tiny_vit()), "omse", "W4A4", calib_data=calib[1], seed=1)
    with torch.no_grad():
        top1 = 100.0 * sum(int((q(x).argmax(-1) == y).sum()) for x, y in batches) / 96
    assert res["rows"][0]["q_top1"] == pytest.approx(top1, abs=6e-3)
    assert res["rows"][0]["digest"] == manifest_digest(q)


def test_compare_bad_inputs(capsys) -> None:
    expect_error(["compare", "fmnist-vit"], capsys, "needs MODEL_B")
    expect_error(["compare", "fmnist-vit", "fmnist-deit", "--recipes", "minmax"], capsys, "not both")
    expect_error(["compare", "fmnist-vit", "--recipes", "minmax,minmax"], capsys, "minmax is given twice")
    expect_error(["compare", "fmnist-vit", "--recipes", "minmax", "--seeds", "0,x"], capsys, "give integers")
    expect_error(["compare", "fmnist-vit", "--recipes", "minmax", "--seeds", "0,0"], capsys, "--seeds 0,0: 0 is given twice")
    expect_error(["compare", "fmnist-vit", "--recipes", "minmax,repq", "--set", "lr_round=0.1"], capsys,
                 r"no recipe of minmax, repq has a pass with option\(s\) lr_round")
    expect_error(["compare", "fmnist-vit", "--recipes", "minmax", "--bits", "W4A4,W9A9"], capsys, "weight bit-width 9 is out of range")
    expect_error(["compare", "fmnist-vit", "--recipes", "nosuch"], capsys, "nosuch")


@pytest.mark.slow
@pytest.mark.skipif(not (has_fashion_mnist() and has_reference_weights("fmnist-vit")),
                    reason="needs Fashion-MNIST and the reference weights")
def test_cli_compare_writes_every_format_and_matches_quantize(tmp_path: Path, capsys) -> None:
    f = {k: tmp_path / f"c.{k}" for k in ("md", "csv", "json", "png")}
    code, out, err = run(["compare", "fmnist-vit", "--recipes", "minmax,repq", "--bits", "W4A4,W6A6", "--seeds", "0,1",
                          "--eval-size", "1000", "--no-progress", "--md", str(f["md"]), "--csv", str(f["csv"]),
                          "--json", str(f["json"]), "--png", str(f["png"])], capsys)
    assert code == 0, err
    assert "vs minmax (pooled p)" in out and out.count("repq") == 2
    res = json.loads(f["json"].read_text())
    assert len(res["rows"]) == 4 and res["seeds"] == [0, 1] and res["fp"]["images"] == 1000
    assert f["png"].read_bytes()[:4] == b"\x89PNG" and f["md"].read_text().count("| repq |") == 2
    # the same run through vitq quantize gives the same top-1
    code, _, err = run(["quantize", "fmnist-vit", "--recipe", "repq", "--bits", "W4A4", "--seed", "1",
                        "--eval-size", "1000", "--no-progress", "--json", str(tmp_path / "q.json")], capsys)
    assert code == 0, err
    q = json.loads((tmp_path / "q.json").read_text())
    row = next(r for r in res["rows"] if r["recipe"] == "repq" and r["bits"] == "W4A4")
    assert row["per_seed"][1]["q_top1"] == q["q_top1"]


def test_each_recipe_calibrates_on_its_own_number_of_images() -> None:
    from dataclasses import replace

    from vitq.recipes import load_recipe

    batches, calib = _data()
    asked = []

    def source(n: int, seed: int) -> torch.Tensor:
        asked.append((n, seed))
        return calib[seed][:n]

    a, b = replace(load_recipe("minmax"), calib_size=16), replace(load_recipe("percentile"), calib_size=8)
    res = compare(tiny_vit(), batches, source, [a, b], ["W8A8"], seeds=[0, 1])
    assert sorted(set(asked)) == [(8, 0), (8, 1), (16, 0), (16, 1)]
    assert [r["calib_size"] for r in res["rows"]] == [16, 8]
