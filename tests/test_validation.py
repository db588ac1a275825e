"""Bad arguments are refused before any model or data is loaded: one line, exit 2."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import has_reference_weights
from test_cli import expect_error


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("x")
    return f


def _fast(args: list[str], capsys, pattern: str) -> None:
    t0 = time.perf_counter()
    expect_error(args, capsys, pattern)
    assert time.perf_counter() - t0 < 5  # refused from the arguments, not after loading and evaluating


@pytest.mark.parametrize("flag", ["--batch-size", "--eval-size", "--calib-size", "--knn-bank"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sizes_must_be_positive(flag: str, value: str, capsys) -> None:
    _fast(["quantize", flag, value], capsys, rf"{flag} {value}: give a positive number")


def test_num_classes_may_be_zero_for_an_encoder(capsys) -> None:
    _fast(["quantize", "--num-classes", "-3"], capsys, r"--num-classes -3: give 0 \(an encoder")


@pytest.mark.parametrize("given", [["--iters", "-3"], ["--set", "iters=-3"]])
def test_iters_is_one_option_with_one_rule(given: list[str], capsys) -> None:
    """--iters N is --set iters=N: the reconstruction options' rule (>= 0) for both, before loading."""
    from vitq.run import RunSpec

    _fast(["quantize", "--recipe", "qdrop", *given], capsys, r"iters must be an integer >= 0, got -3")
    zero = [RunSpec(recipe="qdrop", options={"iters": 0}), RunSpec(recipe="qdrop", options=(("iters", 0),))]
    assert all(pc.opts.iters == 0 for s in zero for pc in s.recipe_obj.passes if pc.name == "reconstruct")
    _fast(["quantize", "--recipe", "qdrop", "--iters", "5", "--set", "iters=6"], capsys, "iters given both as --iters")


def test_output_paths_are_checked_first(afile: Path, tmp_path: Path, capsys) -> None:
    _fast(["quantize", "--out", str(afile)], capsys, "is a file: give a folder")
    _fast(["quantize", "--out", str(afile / "sub")], capsys, "is a file, so no folder can be made under it")
    _fast(["quantize", "--out", "/proc/vitq-nope"], capsys, "cannot create or write the folder")
    _fast(["quantize", "--json", str(tmp_path)], capsys, "is a folder: give a file name")
    _fast(["quantize", "--json", str(afile / "r.json")], capsys, "is a file, so nothing can be written under it")
    _fast(["quantize", "--json", "/proc/vitq-nope.json"], capsys, "cannot write in /proc")
    _fast(["quantize", "--recipe", "qdrop", "--resume-dir", str(afile)], capsys, "--resume-dir .* is a file")
    _fast(["compare", "--recipes", "minmax", "--md", str(tmp_path)], capsys, "--md .* is a folder")
    _fast(["report", "--out", str(afile)], capsys, "--out .* is a file")


def test_an_existing_export_is_not_overwritten(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "vitq.json").write_text("{}")
    _fast(["quantize", "--out", str(run)], capsys, "already holds a saved quantization: pass --overwrite")


def test_flags_a_command_would_ignore(capsys) -> None:
    _fast(["eval", "--seed", "0", "1", "2"], capsys, "eval does not calibrate, so --seed changes nothing")
    _fast(["quantize", "--exclude", "NOSUCHROLE"], capsys, "--exclude NOSUCHROLE: no such role; roles are ATTN_K")
    _fast(["quantize", "--workers", "-1"], capsys, "--workers -1")
    expect_error(["quantize", "fmnist-vit", "--num-classes", "5"], capsys, "reference model with its own 10-class head")


@pytest.mark.skipif(not has_reference_weights("fmnist-vit"), reason="needs the reference weights")
def test_an_exclusion_that_matches_no_module(capsys) -> None:
    expect_error(["quantize", "fmnist-vit", "--exclude", r"blokcs\.0"], capsys,
                 r"--exclude 'blokcs\\\\.0' matches no module of the model")


def test_flags_that_only_make_sense_with_others(tmp_path: Path, capsys) -> None:
    """Refused from the arguments, before any model is loaded (they were ignored, or refused after the work)."""
    _fast(["quantize", "fmnist-vit", "--weight-dtype", "int8"], capsys, r"--weight-dtype int8 .* writes none: pass --export onnx")
    _fast(["quantize", "fmnist-vit", "--out", str(tmp_path / "o"), "--export", "vitq", "--weight-dtype", "int8"], capsys,
          r"writes a vitq export: pass --export onnx")
    for v in ("-1", "nan"):
        _fast(["quantize", "fmnist-vit", "--out", str(tmp_path / "o2"), "--export", "onnx", "--max-top1-diff", v], capsys,
              r"--max-top1-diff \S+: give the points of top-1 the parity check allows")
    _fast(["quantize", "fmnist-vit", "--random-weights"], capsys, r"fmnist-vit is a reference model with trained weights")
    # export and parity flags where nothing is exported or verified: they were silently ignored
    _fast(["quantize", "fmnist-vit", "--max-top1-diff", "0.5"], capsys, r"--max-top1-diff 0.5 is the parity check's limit, "
          r"and this command checks no file: pass --out DIR --export onnx")
    _fast(["quantize", "fmnist-vit", "--runtime", "openvino"], capsys, r"--runtime openvino .* verifies no ONNX file")
    _fast(["quantize", "fmnist-vit", "--out", str(tmp_path / "o3"), "--export", "vitq", "--runtime", "openvino"], capsys,
          r"--runtime openvino .* verifies no ONNX file")
    _fast(["export", "fmnist-vit", "--out", str(tmp_path / "f"), "--runtime", "openvino"], capsys,
          r"--runtime openvino .* verifies nothing: pass --verify")
    # the OpenVINO form runs in OpenVINO only: --runtime cannot choose another
    _fast(["quantize", "fmnist-vit", "--out", str(tmp_path / "o4"), "--export", "openvino", "--runtime", "onnxruntime"],
          capsys, r"--runtime onnxruntime: the OpenVINO form runs in OpenVINO .*drop --runtime")
    _fast(["export", "fmnist-vit", "--format", "openvino", "--out", str(tmp_path / "f"), "--verify", "--runtime",
           "openvino"], capsys, r"--runtime openvino: the OpenVINO form runs in OpenVINO")
    _fast(["export", "fmnist-vit", "--out", str(tmp_path / "f"), "--max-top1-diff", "1"], capsys,
          r"checks no file: pass --verify")
    _fast(["quantize", "fmnist-vit", "--emulate", "uniform8"], capsys, r"--emulate uniform8 .* this command exports nothing")
    _fast(["quantize", "fmnist-vit", "--recipe-out", str(tmp_path / "r.yaml")], capsys,
          r"--recipe-out \S+ writes the mixed-precision recipe --bits auto chooses, and --bits W8A8 chooses none")
    # an encoder's k-NN bank: smaller than k, or given where the head is evaluated
    _fast(["quantize", "fmnist-dinov2", "--knn-bank", "5"], capsys, r"--knn-bank 5: the k-NN votes over the 20 nearest")
    _fast(["quantize", "fmnist-vit", "--task", "classify", "--knn-bank", "100"], capsys,
          r"--knn-bank sizes an encoder's k-NN memory bank and --task classify")
    expect_error(["quantize", "fmnist-vit", "--recipe", "minmax", "--knn-bank", "100", "--eval-size", "20", "--no-progress"],
                 capsys, r"--knn-bank 100 sizes an encoder's k-NN memory bank, and this model is evaluated by its "
                 r"classification head")


def test_two_when_blocks_that_both_hold_and_disagree(tmp_path: Path, capsys) -> None:
    """Two when blocks holding at one width with different values: one silently won before."""
    import vitq
    from vitq.errors import ConfigError

    r = vitq.Recipe.from_dict({"extends": "minmax", "when": {"A<=4": {"calib_size": 64}, "A<=6": {"calib_size": 128}}}, "t")
    assert r.at("W6A6").calib_size == 128 and r.at("W8A8").calib_size == r.calib_size
    with pytest.raises(ConfigError, match=r"when blocks 'A<=4' and 'A<=6' both hold at W4A4 and give different calib_size"):
        r.at("W4A4")
    same = vitq.Recipe.from_dict({"extends": "minmax", "when": {"A<=4": {"calib_size": 64}, "A<=6": {"calib_size": 64}}}, "t")
    assert same.at("W4A4").calib_size == 64  # agreeing blocks are fine
    wa = vitq.Recipe.from_dict({"extends": "minmax", "when": {"W==8": {"calib_size": 16}, "A==8": {"calib_size": 64}}}, "t")
    assert wa.at("W4A8").calib_size == 64 and wa.at("W8A4").calib_size == 16
    with pytest.raises(ConfigError, match=r"when blocks 'W==8' and 'A==8' both hold at W8A8 and give different calib_size"):
        wa.at("W8A8")
    y = tmp_path / "r.yaml"
    y.write_text("extends: minmax\nwhen:\n  A<=4: {rules: {'act:FC2_IN': {quantizer: uniform, bits: A, granularity: tensor, "
                 "observer: percentile}}}\n  A==4: {rules: {'act:FC2_IN': {quantizer: uniform, bits: A, granularity: tensor, "
                 "observer: mse}}}\n")
    _fast(["quantize", "fmnist-vit", "--recipe", str(y), "--bits", "W4A4"], capsys, r"both hold at W4A4 and give different rule act:FC2_IN")


def test_a_folder_another_run_is_writing_is_refused(tmp_path: Path, capsys) -> None:
    """Two runs writing one --out at once both said "saved" and one replaced the other: the folder's lock refuses
    the second in one line; a lock whose process ended (killed) is taken over, and a finished run leaves none."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from vitq.cli import main
    from vitq.run.outputs import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))  # a live run
    _fast(["quantize", "fmnist-vit", "--recipe", "minmax", "--bits", "W8A8", "--out", str(out), "--no-progress"], capsys,
          rf"--out {out} is being written by another vitq run \(pid {os.getpid()} on ")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    assert main(["quantize", "fmnist-vit", "--recipe", "minmax", "--bits", "W8A8", "--out", str(out), "--eval-size", "50",
                 "--skip-fp", "--no-progress"]) == 0, capsys.readouterr().err
    assert (out / "vitq.json").is_file() and not lock.exists()


def test_a_negative_seed_is_refused(capsys) -> None:
    """A seed below 0 ran (torch wraps it) while numpy's generators refuse it: one rule for every command."""
    _fast(["quantize", "--seed", "-1"], capsys, r"--seed -1: give one or more whole numbers from 0 up")


@pytest.mark.parametrize("key,value,said", [("symmetric", "'yes'", "symmetric must be true or false"),
                                            ("symmetric", "1", "symmetric must be true or false"),
                                            ("observer", "[minmax]", "observer must be a name"),
                                            ("percentile", "'0.99'", "percentile must be a number")])
def test_a_rule_value_of_the_wrong_type_is_refused(tmp_path: Path, capsys, key: str, value: str, said: str) -> None:
    """A quoted 'yes' for symmetric is a string, and truthy: it quantized symmetrically without a word."""
    y = tmp_path / "r.yaml"
    y.write_text(f"extends: minmax\nrules:\n  'weight:*': {{quantizer: uniform, bits: W, {key}: {value}}}\n")
    _fast(["quantize", "fmnist-vit", "--recipe", str(y)], capsys, said)


@pytest.mark.parametrize("given,said", [(["--bits", "W8A8,w8a8"], r"--bits W8A8,W8A8: W8A8 is given twice"),
                                        (["--recipes", "minmax,repq,minmax"], r"--recipes minmax,repq,minmax: minmax is given twice"),
                                        (["--seeds", "0,0"], r"--seeds 0,0: 0 is given twice"),  # said "--seed 0 0"
                                        (["--seed", "1", "1"], r"--seed 1 1: 1 is given twice")])
def test_compare_refuses_a_row_given_twice(given: list[str], capsys, said: str) -> None:
    """`compare --bits W8A8,W8A8` ran both rows (a comparison of a run with itself) after loading everything."""
    _fast(["compare", "fmnist-vit", *(["--recipes", "minmax"] if given[0] != "--recipes" else []), *given], capsys, said)


def test_the_compare_api_refuses_a_width_given_twice() -> None:
    import torch
    from conftest import tiny_vit

    from vitq.errors import ConfigError
    from vitq.run.compare import compare

    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ConfigError, match="bit-width given twice in W8A8, W8A8"):
        compare(tiny_vit(), [(x, torch.zeros(4, dtype=torch.long))], {0: x}, ["minmax"], ["W8A8", "W8A8"])


def test_export_openvino_without_openvino_is_one_line_before_loading(tmp_path: Path, capsys, monkeypatch) -> None:
    """--export openvino where the openvino package is missing: one line naming the extra, before calibration."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    _fast(["quantize", "fmnist-vit", "--out", str(tmp_path / "o"), "--export", "openvino"], capsys,
          r"--export openvino needs the openvino package: install the OpenVINO extra: pip install 'vitq\[openvino\]'")
