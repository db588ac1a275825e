"""CLI: every bad input gives exit code 2 and a one-line error; end-to-end runs write JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import has_fashion_mnist, has_reference_weights, tiny_vit

from vitq.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(args: list[str], capsys, pattern: str) -> str:
    import re

    code, out, err = run(args, capsys)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vitq: error: ")
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def q(model: str, data: str, *extra: str) -> list[str]:
    return ["quantize", model, "--data", data, "--no-progress", *extra]


def test_unknown_model(capsys, fmnist_dir: Path) -> None:
    expect_error(q("no-such-model", f"fashion-mnist:{fmnist_dir}"), capsys, "unknown model 'no-such-model'")


def test_unknown_recipe(capsys, fmnist_dir: Path, pickled_vit: Path) -> None:
    expect_error(q(str(pickled_vit), f"fashion-mnist:{fmnist_dir}", "--recipe", "magic", "--trust-pickle"),
                 capsys, "unknown recipe 'magic'")


@pytest.mark.parametrize("bits", ["W9A8", "8bit", "W4", "W1A1"])
def test_malformed_bits(capsys, bits: str) -> None:
    expect_error(["quantize", "fmnist-vit", "--bits", bits], capsys, "bit-width")


def test_timm_name_needs_checkpoint(capsys) -> None:
    expect_error(["quantize", "vit_tiny_patch16_224"], capsys, "needs its weights as --checkpoint")


def test_missing_checkpoint(capsys, tmp_path: Path) -> None:
    expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "nope.pth")], capsys,
                 "does not exist")


def test_truncated_and_corrupt_checkpoints(capsys, tmp_path: Path) -> None:
    sd = tiny_vit().state_dict()
    p = tmp_path / "w.pth"
    torch.save(sd, p)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(p)], capsys, "truncated or corrupt")
    s = tmp_path / "w.safetensors"
    s.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(s)], capsys, "truncated or corrupt")
    e = tmp_path / "empty.pth"
    e.write_bytes(b"")
    expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(e)], capsys, "is empty")


def test_checkpoint_mismatch_names_keys(capsys, tmp_path: Path) -> None:
    p = tmp_path / "other.pth"
    torch.save(tiny_vit(num_classes=1000).state_dict(), p)  # wrong size for vit_tiny
    line = expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(p)], capsys,
                        "does not match the architecture")
    # both kinds of mismatch are named: the blocks the tiny model lacks, and the first wrong shape with its sizes
    assert "missing keys blocks.10.attn.proj.bias" in line and "(+116 more)" in line
    assert "shape mismatch at blocks.0.attn.proj.bias (checkpoint (32,) vs model (192,))" in line


def test_checkpoint_with_pickled_objects(capsys, tmp_path: Path) -> None:
    p = tmp_path / "obj.pth"
    import argparse

    torch.save({"state_dict": tiny_vit().state_dict(), "args": argparse.Namespace(lr=0.1)}, p)
    expect_error(["quantize", "vit_tiny_patch16_224", "--checkpoint", str(p)], capsys,
                 "pickled Python objects|truncated or corrupt|cannot be read")


def test_pickle_needs_trust(capsys, pickled_vit: Path) -> None:
    expect_error(["quantize", str(pickled_vit)], capsys, "unpickling runs code.*--trust-pickle")


def test_pickle_not_a_module(capsys, tmp_path: Path) -> None:
    p = tmp_path / "dict.pt"
    torch.save({"a": 1}, p)
    expect_error(["quantize", str(p), "--trust-pickle"], capsys, "not an nn.Module")


def test_unsupported_model_type(capsys, tmp_path: Path, fmnist_dir: Path) -> None:
    p = tmp_path / "mlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), p)
    expect_error(q(str(p), f"fashion-mnist:{fmnist_dir}", "--trust-pickle", "--skip-fp"), capsys,
                 "unsupported model type .*vitq supports .*SwinTransformer")


@pytest.mark.parametrize("size,pattern", [("0", "--calib-size 0: give a positive number"), ("-3", "--calib-size -3: give a positive number"),
                                          ("65", "larger than the train split")])
def test_bad_calibration_size(capsys, fmnist_dir: Path, pickled_vit: Path, size: str, pattern: str) -> None:
    expect_error(q(str(pickled_vit), f"fashion-mnist:{fmnist_dir}", "--trust-pickle", "--calib-size", size),
                 capsys, pattern)


def test_missing_data(capsys, tmp_path: Path, fmnist_dir: Path, pickled_vit: Path) -> None:
    expect_error(q(str(pickled_vit), f"fashion-mnist:{tmp_path / 'none'}", "--trust-pickle"), capsys,
                 "does not exist")
    (fmnist_dir / "train-images-idx3-ubyte.gz").unlink()
    expect_error(q(str(pickled_vit), f"fashion-mnist:{fmnist_dir}", "--trust-pickle"), capsys,
                 "missing Fashion-MNIST file train-images-idx3-ubyte")
    expect_error(q(str(pickled_vit), str(tmp_path / "no_such_folder"), "--trust-pickle"), capsys,
                 "neither 'fashion-mnist'")


def test_empty_imagefolder(capsys, tmp_path: Path, pickled_vit: Path) -> None:
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    expect_error(q(str(pickled_vit), str(root), "--trust-pickle"), capsys, "no class folders|holds no images")


def test_nan_during_calibration(capsys, tmp_path: Path, fmnist_dir: Path) -> None:
    m = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    with torch.no_grad():
        m.blocks[0].norm1.weight[3] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(m, p)
    expect_error(q(str(p), f"fashion-mnist:{fmnist_dir}", "--trust-pickle", "--skip-fp", "--calib-size", "8"),
                 capsys, r"NaN values reached quantization site blocks\.0\.attn\.qkv\.input_quant")


def test_quantize_json_export_and_eval(capsys, tmp_path: Path, fmnist_dir: Path, pickled_vit: Path) -> None:
    out, js = tmp_path / "out", tmp_path / "r.json"
    code, qout, err = run(q(str(pickled_vit), f"fashion-mnist:{fmnist_dir}", "--trust-pickle", "--bits", "W4A8",
                              "--calib-size", "16", "--eval-size", "20", "--out", str(out), "--json", str(js)), capsys)
    assert code == 0, err
    r = json.loads(js.read_text())
    for k in ("fp_top1", "q_top1", "recipe", "bits", "calib_size", "eval_size", "seed", "calib_seconds",
              "eval_seconds", "peak_rss_mb", "manifest"):
        assert k in r, k
    assert r["bits"] == "W4A8" and r["calib_size"] == 16 and r["eval_size"] == 20
    assert (out / "model.safetensors").is_file() and (out / "vitq.json").is_file()
    code, stdout, err = run(["eval", str(out), "--data", f"fashion-mnist:{fmnist_dir}", "--eval-size", "20",
                             "--no-progress", "--trust-pickle", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["top1"] == r["q_top1"] and ev["nll"] > 0 and "test log-loss" in stdout
    # the paired test against the float model rides along with every quantize run
    vs = r["vs_fp"]
    assert vs["n"] == 20 and vs["top1_a"] == r["fp_top1"] and vs["top1_b"] == r["q_top1"]
    assert vs["diff"] == pytest.approx(-r["drop"], abs=0.01) and 0.0 <= vs["p_value"] <= 1.0
    assert "McNemar" in qout
    # ... with the paired test of the test log-loss, whose quantized side is what `vitq eval` measures
    assert vs["nll_b"] == pytest.approx(ev["nll"], abs=1e-4) and vs["nll_a"] > 0 and 0.0 <= vs["nll_p"] <= 1.0
    assert vs["nll_ci95"][0] <= vs["nll_diff"] <= vs["nll_ci95"][1] and "  test log-loss quantized - FP" in qout


def test_compare_two_exports(capsys, tmp_path: Path, fmnist_dir: Path, pickled_vit: Path) -> None:
    data = f"fashion-mnist:{fmnist_dir}"
    for bits in ("W8A8", "W3A3"):
        code, _, err = run(q(str(pickled_vit), data, "--trust-pickle", "--bits", bits, "--calib-size", "8",
                             "--eval-size", "30", "--skip-fp", "--out", str(tmp_path / bits),
                             "--json", str(tmp_path / f"{bits}.json")), capsys)
        assert code == 0, err
    js = tmp_path / "cmp.json"
    code, out, err = run(["compare", str(tmp_path / "W8A8"), str(tmp_path / "W3A3"), "--data", data,
                          "--eval-size", "30", "--no-progress", "--trust-pickle", "--json", str(js)], capsys)
    assert code == 0, err
    c = json.loads(js.read_text())
    r8, r3 = (json.loads((tmp_path / f"{b}.json").read_text())["q_top1"] for b in ("W8A8", "W3A3"))
    assert c["n"] == 30 and c["top1_a"] == r8 and c["top1_b"] == r3
    assert c["diff"] == pytest.approx(r3 - r8, abs=0.01)
    assert c["only_a_correct"] - c["only_b_correct"] == round((r8 - r3) * 30 / 100)
    assert "McNemar" in out
    # a model compared with itself: no difference, p = 1
    code, out, err = run(["compare", str(tmp_path / "W8A8"), str(tmp_path / "W8A8"), "--data", data,
                          "--eval-size", "30", "--no-progress", "--trust-pickle", "--json", str(js)], capsys)
    assert code == 0, err
    c = json.loads(js.read_text())
    assert c["diff"] == 0 and c["p_value"] == 1.0 and c["agree"] == 100.0 and not c["significant_5pct"]
    assert c["nll_diff"] == 0 and c["nll_p"] == 1.0 and c["nll_ci95"] == [0, 0]


def test_quantize_several_seeds(capsys, tmp_path: Path, fmnist_dir: Path, pickled_vit: Path) -> None:
    data = f"fashion-mnist:{fmnist_dir}"
    single = []
    for seed in ("0", "1", "2"):
        js = tmp_path / f"s{seed}.json"
        code, _, err = run(q(str(pickled_vit), data, "--trust-pickle", "--recipe", "repq", "--bits", "W3A3", "--calib-size", "4",
                             "--eval-size", "32", "--seed", seed, "--json", str(js)), capsys)
        assert code == 0, err
        single.append(json.loads(js.read_text())["q_top1"])
    js = tmp_path / "multi.json"
    code, out, err = run(q(str(pickled_vit), data, "--trust-pickle", "--recipe", "repq", "--bits", "W3A3", "--calib-size", "4",
                           "--eval-size", "32", "--seed", "0", "1", "2", "--json", str(js)), capsys)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert r["seeds"] == [0, 1, 2] and [x["q_top1"] for x in r["per_seed"]] == single  # each seed as if alone
    import statistics
    assert r["q_top1"] == pytest.approx(statistics.fmean(single), abs=0.006)
    assert r["q_top1_std"] == pytest.approx(statistics.stdev(single), abs=0.01)  # singles are rounded
    assert r["drop"] == pytest.approx(r["fp_top1"] - statistics.fmean(single), abs=0.011)
    assert r["vs_fp"] is None and all(x["vs_fp"]["n"] == 32 for x in r["per_seed"])  # one paired test per seed
    assert "mean ± std over 3 seeds" in out
    # ... and one pooled test of the mean over seeds against FP
    pl = r["vs_fp_pooled"]
    assert pl["seeds"] == 3 and pl["diff"] == pytest.approx(-r["drop"], abs=0.011)
    assert 0.0 <= pl["p_value"] <= 1.0 and 0.0 <= pl["nll_p"] <= 1.0
    assert pl["nll_diff"] == pytest.approx(statistics.fmean(x["vs_fp"]["nll_diff"] for x in r["per_seed"]), abs=1e-4)
    assert "mean over 3 seeds, quantized - FP" in out
    expect_error(q(str(pickled_vit), data, "--trust-pickle", "--seed", "0", "1", "--out", str(tmp_path / "o")),
                 capsys, "single --seed")


def test_compare_missing_second_model(capsys, fmnist_dir: Path, pickled_vit: Path) -> None:
    expect_error(["compare", str(pickled_vit), "no-such-model", "--trust-pickle", "--data",
                  f"fashion-mnist:{fmnist_dir}", "--no-progress"], capsys, "no-such-model")


def test_list(capsys) -> None:
    code, out, _ = run(["list"], capsys)
    assert code == 0
    for word in ("minmax", "percentile", "omse", "log_sqrt2", "fmnist-swin-outlier", "SwinTransformer",
                 "reconstruct", "loss=mse", "select=validate", "prefer=block", "target=mean"):  # passes and their options
        assert word in out


def test_console_exit_code_and_no_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "vitq", "quantize", "nope-model"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
@pytest.mark.skipif(not (has_reference_weights("fmnist-vit") and has_fashion_mnist()),
                    reason="reference weights or Fashion-MNIST missing")
def test_reference_w8a8_minmax_loses_at_most_one_point(capsys, tmp_path: Path) -> None:
    js = tmp_path / "r.json"
    code, out, err = run(["quantize", "fmnist-vit", "--recipe", "minmax", "--bits", "W8A8", "--eval-size", "2000",
                          "--no-progress", "--json", str(js)], capsys)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert r["fp_top1"] - r["q_top1"] <= 1.0, r
    assert r["fp_top1"] > 50


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path: Path) -> None:
    """Importing torch, timm and transformers takes seconds: Ctrl-C there was a 40-line traceback from an import."""
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("vitq")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "vitq"]
    p = subprocess.Popen([*cmd, "list"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(0.5)  # inside the imports (`vitq list` takes several seconds here)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "vitq: interrupted", (p.returncode, err)
