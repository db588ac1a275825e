"""Exports carry a seal (sha256 of the tensor file and of the configuration) checked before loading."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit

import vitq
from vitq.errors import ModelError
from vitq.export import load_quantized, save_quantized
from vitq.export.packed import save_packed
from vitq.models import ModelSource


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import timm.models._registry as reg

    tmp = tmp_path_factory.mktemp("seal")
    x = torch.randn(8, 3, 16, 16)
    model = tiny_vit()
    ckpt = tmp / "float.pth"
    torch.save(model.state_dict(), ckpt)
    reg._model_entrypoints["seal_tiny_vit"] = lambda pretrained=False, **kw: tiny_vit()
    q = vitq.quantize(copy.deepcopy(model), "minmax", "W4A8", calib_data=x)
    src = ModelSource("timm", "seal_tiny_vit", str(ckpt))
    vitq.state_of(q).source = src
    plain = save_quantized(q, tmp / "plain", src)
    save_packed(q, tmp / "packed", src)
    with torch.no_grad():
        ref = q(x)
    yield {"plain": plain, "packed": tmp / "packed", "x": x, "ref": ref}
    reg._model_entrypoints.pop("seal_tiny_vit", None)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_an_intact_export_loads_to_the_same_outputs(exported, kind: str) -> None:
    with torch.no_grad():
        assert torch.equal(load_quantized(exported[kind])(exported["x"]), exported["ref"])


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_flipped_bytes_are_refused_or_change_nothing(exported, kind: str, tmp_path: Path) -> None:
    rnd = random.Random(0)
    size = (exported[kind] / "model.safetensors").stat().st_size
    for trial in range(12):
        d = _copy(exported[kind], tmp_path / f"t{trial}")
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        pos = rnd.randrange(size)
        data[pos] ^= 1 << rnd.randrange(8)
        f.write_bytes(bytes(data))
        with pytest.raises(ModelError, match="does not match the digest recorded in vitq.json"):
            load_quantized(d)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(bits="W8A8"),
    lambda m: m["recipe"]["rules"]["weight:*"].update(bits=8),
    lambda m: m["source"].update(name="vit_tiny_patch16_224"),
])
def test_an_edited_configuration_is_refused(exported, edit, tmp_path: Path) -> None:
    d = _copy(exported["plain"], tmp_path / "e")
    meta = json.loads((d / "vitq.json").read_text())
    edit(meta)
    (d / "vitq.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="differs from the configuration it was exported with"):
        load_quantized(d)


def test_truncated_or_incomplete_configuration(exported, tmp_path: Path) -> None:
    d = _copy(exported["plain"], tmp_path / "t")
    text = (d / "vitq.json").read_text()
    (d / "vitq.json").write_text(text[: len(text) // 2])
    with pytest.raises(ModelError, match="is not readable JSON"):
        load_quantized(d)
    meta = json.loads(text)
    meta.pop("source")
    (d / "vitq.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="has no 'source'"):
        load_quantized(d)
    meta = json.loads(text)
    meta.pop("integrity")
    (d / "vitq.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="has no integrity record"):
        load_quantized(d)
    (d / "vitq.json").write_text(text)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="is not a vitq export"):
        load_quantized(d)


def test_an_export_of_a_pickled_model_is_self_contained(tmp_path):
    """The export keeps its own sealed copy of the pickle: it loads after the original is gone, from anywhere."""
    import os
    import shutil

    x = torch.randn(8, 3, 16, 16)
    src_file = tmp_path / "user" / "float.pt"
    src_file.parent.mkdir()
    model = tiny_vit()
    torch.save(model, src_file)
    q = vitq.quantize(copy.deepcopy(model), "minmax", "W4A8", calib_data=x)
    out = save_quantized(q, tmp_path / "exp", ModelSource("pickle", str(src_file)))
    meta = json.loads((out / "vitq.json").read_text())
    assert str(src_file) not in json.dumps(meta) and "float_model.pt" in meta["integrity"]["files"]
    shutil.rmtree(src_file.parent)  # the user's file is gone
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        loaded = load_quantized(moved, trust_pickle=True)
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    again = save_quantized(loaded, tmp_path / "again", vitq.state_of(loaded).source)  # re-saving keeps it whole
    assert torch.equal(load_quantized(again, trust_pickle=True)(x), q(x))
    with pytest.raises(ModelError, match="unpickling runs code|--trust-pickle"):
        load_quantized(again)
    data = bytearray((Path(moved) / "float_model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (Path(moved) / "float_model.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="float_model.pt does not match the digest"):
        load_quantized(moved, trust_pickle=True)


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname", "sub/../../x", "..", ""])
def test_an_integrity_entry_outside_the_export_is_refused_before_it_is_opened(exported, entry: str, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """The seal lists file names of the folder; a path that leaves it (crafted) is refused before anything is read
    (it was opened and hashed)."""
    import vitq.export.integrity as integ

    d = _copy(exported["plain"], tmp_path / "x")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    meta = json.loads((d / "vitq.json").read_text())
    meta["integrity"]["files"][entry] = "0" * 64
    (d / "vitq.json").write_text(json.dumps(meta))
    opened: list[str] = []
    real = integ.file_sha256
    monkeypatch.setattr(integ, "file_sha256", lambda f: opened.append(str(f)) or real(f))
    with pytest.raises(ModelError, match="which is not a file name inside the export"):
        load_quantized(d)
    assert opened == []


def test_what_vitq_wrote_but_does_not_load_is_named(exported, tmp_path: Path, capsys) -> None:
    """An interrupted export (its files, no vitq.json) and an ONNX file or folder given as MODEL: one line with the
    right fix ("unknown model" and "pass --trust-pickle" - the wrong fix - before)."""
    from test_cli import expect_error

    d = _copy(exported["plain"], tmp_path / "half")
    (d / "vitq.json").unlink()
    with pytest.raises(ModelError, match="is an incomplete vitq export"):
        vitq.load_model(str(d))
    expect_error(["eval", str(d), "--no-progress"], capsys, r"incomplete vitq export .*: export the model again")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07")  # what it holds is not read
    (onnx_dir / "export.json").write_text("{}")
    for target in (onnx_dir, onnx_dir / "model.onnx"):
        expect_error(["eval", str(target), "--no-progress"], capsys,
                     r"is an ONNX export: .* onnxruntime \(vitq.export.OnnxModel\)")


@pytest.mark.parametrize("edit", [
    lambda e: e.update(bits=9), lambda e: e.update(shape=[3]), lambda e: e.update(offset="x"), lambda e: e.pop("spec"),
], ids=["bits_9", "shape", "offset", "no_spec"])
def test_a_resealed_packed_export_with_a_wrong_quantization_map(exported, edit, tmp_path: Path) -> None:
    """The seal covers vitq.json, but a map edited and resealed (crafted) is still checked: one line (a ValueError
    traceback before)."""
    from vitq.export.integrity import KEY, seal

    d = _copy(exported["packed"], tmp_path / "p")
    meta = json.loads((d / "vitq.json").read_text())
    edit(meta["quantization_map"][next(iter(meta["quantization_map"]))])
    files = list(meta.pop(KEY)["files"])
    (d / "vitq.json").write_text(json.dumps(seal(meta, d, files)))
    with pytest.raises(ModelError, match=r"the quantization map.s entry for .* is not valid|out of range|does not match the architecture"):
        load_quantized(d)


def test_an_overwrite_interrupted_half_way_is_incomplete_not_the_old_export(exported, tmp_path: Path, monkeypatch) -> None:
    """A re-export stages its files in a hidden folder and moves them in, vitq.json (the completion marker) removed
    first and written last: a write that dies while the files are written leaves the previous export intact (it
    loads, the same model); one that dies while they are moved in reads as incomplete, never as the previous
    configuration over new tensors; the next write removes what the killed one staged."""
    import vitq.export.integrity as integ
    from vitq.export.integrity import STAGING

    d = _copy(exported["plain"], tmp_path / "o")
    q = load_quantized(d)
    before = (d / "vitq.json").read_bytes()

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(integ, "seal", die)  # killed after the tensors were staged, before anything moved
    with pytest.raises(KeyboardInterrupt):
        save_quantized(q, d, vitq.state_of(q).source)
    monkeypatch.undo()
    assert (d / "vitq.json").read_bytes() == before and list(d.glob(STAGING + "*"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_quantized(d)(x), q(x))  # the previous export, whole

    real = integ.os.replace

    def dies_at_the_marker(src, dst):
        if Path(dst).name == "vitq.json":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(integ.os, "replace", dies_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(q, d, vitq.state_of(q).source)
    monkeypatch.undo()
    assert not (d / "vitq.json").exists()
    with pytest.raises(ModelError, match="is an incomplete vitq export"):
        vitq.load_model(str(d))
    save_quantized(q, d, vitq.state_of(q).source)  # a new write completes it and removes the staged leftovers
    assert (d / "vitq.json").is_file() and not list(d.glob(STAGING + "*"))
