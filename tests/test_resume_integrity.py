"""The resume state is checked before it is used: a truncated, damaged or edited ``state.pt`` / ``run.json`` /
cached input is a one-line refusal naming the file, and a resume folder made with other CLI arguments is
refused before any loading or calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit

import vitq
from vitq.bits import Bits
from vitq.errors import ConfigError
from vitq.pipeline import Context
from vitq.recon import ReconConfig, engine, reconstruct


def _setup(run_dir: Path):
    torch.manual_seed(3)
    x = torch.randn(32, 3, 16, 16)
    q = vitq.quantize(tiny_vit(depth=2), "minmax", "W4A4", calib_data=x)
    cfg = ReconConfig(iters=3, batch_size=8, num_samples=32, chunk_size=16, slicing="half", run_dir=str(run_dir))
    return q, cfg, Context(calib=x, bits=Bits.parse("W4A4"), batch_size=16)


def _crash_after_first_unit(monkeypatch):
    real = engine.Reconstructor._unit
    calls = {"n": 0}

    def unit(self, u, store):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run stops after the first unit was checkpointed
        return real(self, u, store)

    monkeypatch.setattr(engine.Reconstructor, "_unit", unit)


@pytest.fixture
def stopped_run(tmp_path, monkeypatch):
    """A run directory whose reconstruction stopped after one unit (state + the next unit's cached inputs),
    and the result of the same run done without a stop."""
    q, cfg, ctx = _setup(tmp_path / "full")
    reconstruct(q, cfg, ctx)
    full = {k: v.clone() for k, v in q.state_dict().items()}
    with monkeypatch.context() as m:
        _crash_after_first_unit(m)
        q, cfg, ctx = _setup(tmp_path / "run")
        with pytest.raises(KeyboardInterrupt):
            reconstruct(q, cfg, ctx)
    return tmp_path / "run", full


def _resume(run_dir: Path):
    q, cfg, ctx = _setup(run_dir)
    rep = reconstruct(q, cfg, ctx)
    return q, rep


def test_an_intact_state_resumes_to_the_same_result(stopped_run):
    run_dir, full = stopped_run
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert state["done"] == 1 and state["inputs"], "the stopped run left no cached inputs to check"
    q, rep = _resume(run_dir)
    assert rep["resumed_from_unit"] == 1
    assert all(torch.equal(v, full[k]) for k, v in q.state_dict().items())


def test_a_truncated_state_is_refused_naming_the_file(stopped_run):
    run_dir, _ = stopped_run
    p = run_dir / "state.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"state\.pt is unreadable .*truncated or damaged.*delete"):
        _resume(run_dir)


def test_an_edited_state_is_refused_by_its_digest(stopped_run):
    run_dir, _ = stopped_run
    p = run_dir / "state.pt"
    state = torch.load(p, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[0] += 1e-3  # a plausible tensor, a different model
    torch.save(state, p)
    with pytest.raises(ConfigError, match=r"state\.pt does not match its content digest"):
        _resume(run_dir)


def test_a_damaged_cached_input_is_refused(stopped_run):
    run_dir, _ = stopped_run
    f = sorted((run_dir / "inputs").glob("x?-0001-*.pt"))[0]
    data = bytearray(f.read_bytes())
    data[-40] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"{f.name} is changed or damaged"):
        _resume(run_dir)
    f.unlink()
    with pytest.raises(ConfigError, match=rf"{f.name} is missing"):
        _resume(run_dir)


def test_a_truncated_run_json_is_refused(stopped_run):
    run_dir, _ = stopped_run
    p = run_dir / "run.json"
    p.write_text(p.read_text()[:20])
    with pytest.raises(ConfigError, match=r"run\.json is unreadable \(truncated or edited\)"):
        _resume(run_dir)


def test_cli_refuses_a_resume_folder_of_other_arguments_before_loading(tmp_path, capsys):
    from vitq.cli import main
    from vitq.run import RESUME_RECORD

    d = tmp_path / "resume"
    base = ["quantize", "no-such-model-file.pth", "--resume-dir", str(d), "--no-progress"]
    # the first run records its arguments (and then fails to load its model: nothing saved, nothing refused)
    assert main(base + ["--bits", "W4A4"]) == 2
    assert json.loads((d / RESUME_RECORD).read_text())["bits"] == "W4A4"
    capsys.readouterr()
    assert main(base + ["--bits", "W3A3"]) == 2  # still no saved state: the record is rewritten, the model refused
    assert "W3A3" in (d / RESUME_RECORD).read_text()
    capsys.readouterr()
    (d / "00-reconstruct").mkdir()  # now the folder holds state of the W3A3 run
    assert main(base + ["--bits", "W4A4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bits W3A3 (now W4A4)" in err[0] and "another --resume-dir" in err[0], err
    assert "no-such-model-file" not in err[0], "the model was looked at before the resume folder was checked"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: qdrop\n")
    assert main(base + ["--bits", "W3A3", "--recipe", str(recipe)]) == 2
    assert "--recipe" in capsys.readouterr().err
    (d / RESUME_RECORD).write_text("{trunc")
    assert main(base + ["--bits", "W3A3"]) == 2
    assert f"{RESUME_RECORD} is unreadable" in capsys.readouterr().err
