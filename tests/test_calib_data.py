"""Calibration on the data users have: any folder of images, no labels; evaluation on val/ alone;
DataLoader workers; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitq.cli import main
from vitq.data import ImageFiles, calibration_subset


def _img(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(arr).convert(mode).save(path)


def calib_folder(root: Path) -> Path:
    """12 readable images, flat and nested, mixed sizes / formats / modes, plus a corrupt file, a
    truncated one, a text file and a hidden file."""
    specs = [("a.png", (40, 30), "RGB"), ("b.jpg", (28, 28), "L"), ("c.PNG", (100, 60), "RGBA"),
             ("d.bmp", (33, 47), "RGB"), ("e.gif", (28, 40), "P"), ("f.webp", (64, 64), "RGB"),
             ("sub/g.jpeg", (20, 20), "L"), ("sub/h.png", (90, 31), "LA"), ("sub/deep/i.tif", (28, 28), "RGB"),
             ("sub/deep/j.png", (300, 200), "RGB"), ("k.jpg", (50, 50), "CMYK"), ("l.ppm", (30, 30), "RGB")]
    for i, (name, size, mode) in enumerate(specs):
        _img(root / name, size, mode, i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = (root / "a.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(data)
    return root


def test_image_files_reads_every_image_and_skips_the_unreadable(tmp_path: Path) -> None:
    from vitq.models import load_model, transforms

    root = calib_folder(tmp_path / "calib")
    ds = ImageFiles(root, transforms(load_model("fmnist-vit")[0]).image)
    assert len(ds) == 14  # 12 images + the 2 unreadable ones with image suffixes; no .txt, no hidden file
    cs = calibration_subset(ds, 12, seed=0)
    assert len(cs) == 12 and sorted(Path(f).name for f in cs.skipped) == ["broken.jpg", "truncated.png"]
    xs = torch.stack([cs[i][0] for i in range(12)])
    assert xs.shape == (12, 1, 28, 28) and torch.isfinite(xs).all()
    assert calibration_subset(ds, 12, seed=0).indices == cs.indices  # seeded
    with pytest.raises(Exception, match="only 12 of the 14 files .* are readable"):
        calibration_subset(ds, 13, seed=0)
    # a folder of files none of which opens: the fix is other files, not a smaller --calib-size (it said "<= 0")
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.png").write_bytes(b"")
    bad = ImageFiles(junk, transforms(load_model("fmnist-vit")[0]).image)
    for size, at_most in ((2, False), (3, True)):
        with pytest.raises(Exception, match=r"none of the 3 files under .* is a readable image \(e\.g\. .*png\): pass a"):
            calibration_subset(bad, size, seed=0, at_most=at_most)


def test_cli_calibrates_on_a_folder_and_evaluates_on_val_alone(tmp_path: Path) -> None:
    calib = calib_folder(tmp_path / "calib")
    val = tmp_path / "imnet" / "val"
    for c in range(10):  # class folders in Fashion-MNIST's class order
        for i in range(2):
            _img(val / f"{c:02d}" / f"{i}.png", (37, 29), "RGB", 100 + 10 * c + i)
    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-vit", "--data", str(tmp_path / "imnet"), "--calib-data", str(calib),
                 "--calib-size", "12", "--workers", "2", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["calib_data"] == str(calib) and len(r["calib_skipped"]) == 2 and r["eval_size"] == 20
    assert r["preprocessing"]["transform"] == "timm.data.create_transform" and r["device"] == "cpu"
    # the val split itself as --data (class folders directly inside)
    assert main(["eval", "fmnist-vit", "--data", str(val), "--no-progress"]) == 0


def test_cli_data_errors_are_one_line(tmp_path: Path, capsys) -> None:
    calib = calib_folder(tmp_path / "calib")
    val = tmp_path / "imnet" / "val" / "0"
    _img(val / "0.png", (28, 28), "L", 0)
    base = ["quantize", "fmnist-vit", "--data", str(tmp_path / "imnet"), "--no-progress"]
    cases = [
        (base, "no train/ folder to calibrate on: pass --calib-data"),
        (base + ["--calib-data", str(calib), "--calib-size", "40"], "calibration size 40 is larger than"),
        (base + ["--calib-data", str(calib), "--calib-size", "13"], "only 12 of the 14 files"),
        (base + ["--calib-data", str(tmp_path / "nowhere")], "does not exist"),
        (base + ["--calib-data", str(tmp_path / "imnet" / "val" / "0" / "0.png")], "is not a folder"),
        (base + ["--calib-data", str(calib), "--workers", "-1"], "--workers -1"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((base + ["--calib-data", str(tmp_path / "empty")], "holds no image files"))
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_a_corrupt_evaluation_image_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    val = tmp_path / "imnet" / "val"
    _img(val / "0" / "0.png", (28, 28), "L", 0)
    (val / "1").mkdir(parents=True)
    (val / "1" / "bad.png").write_bytes(b"\x89PNG garbage")
    for workers in ("0", "2"):
        assert main(["eval", "fmnist-vit", "--data", str(tmp_path / "imnet"), "--workers", workers,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot read image" in err and "bad.png" in err and len(err.splitlines()) == 1, err


def _class_split(root: Path, classes: list[str], per_class: int = 2, seed: int = 0) -> None:
    for k, c in enumerate(classes):
        for i in range(per_class):
            _img(root / c / f"{i}.png", (28, 28), "L", seed + 10 * k + i)


def test_a_corrupt_train_image_is_skipped_and_counted(tmp_path: Path, capsys) -> None:
    root = tmp_path / "imnet"
    classes = [f"{c:02d}" for c in range(10)]
    _class_split(root / "train", classes)
    _class_split(root / "val", classes, seed=500)
    (root / "train" / "03" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--calib-size", "20", "--no-progress", "--skip-fp",
                 "--json", str(out)]) == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert [Path(f).name for f in r["calib_skipped"]] == ["bad.jpg"]
    assert "1 unreadable, skipped: bad.jpg" in capsys.readouterr().out
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--calib-size", "21", "--no-progress"]) == 2
    assert "only 20 of the 21 files" in capsys.readouterr().err


def test_class_folders_must_match_the_head_and_each_other(tmp_path: Path, capsys) -> None:
    root = tmp_path / "imnet"
    ten = [f"{c:02d}" for c in range(10)]
    _class_split(root / "train", ten)
    _class_split(root / "val", ten[:9] + ["zz"], seed=500)
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--calib-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class folders of" in err and "only in train/: 09" in err \
        and "only in val/: zz" in err and "--calib-data" in err, err
    # with --calib-data the train split's classes do not matter
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--calib-data", str(root / "train"),
                 "--calib-size", "8", "--no-progress", "--skip-fp"]) == 0
    capsys.readouterr()
    twelve = tmp_path / "twelve" / "val"
    _class_split(twelve, [f"{c:02d}" for c in range(12)], per_class=1)
    for argv in (["eval", "fmnist-vit", "--data", str(twelve)],
                 ["quantize", "fmnist-vit", "--data", str(twelve.parent), "--calib-data", str(root / "train")]):
        assert main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "12 class folders" in err and "scores 10 classes" in err, err


def test_the_recipes_calibration_size_is_a_ceiling_not_a_demand(tmp_path: Path, capsys) -> None:
    # the default recipe (best) takes up to 1024 images at W4A4: a folder of 20 calibrates it with all 20, said in
    # one line; an explicit --calib-size above what the folder has is still refused
    root = tmp_path / "imnet"
    classes = [f"{c:02d}" for c in range(10)]
    _class_split(root / "train", classes)
    _class_split(root / "val", classes, seed=500)
    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--bits", "W4A4", "--set", "iters=1", "--no-progress",
                 "--skip-fp", "--json", str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "the recipe takes up to 1024, the source has 20: using all 20" in said, said
    # the default reconstructs here: it says what that costs, with the iterations asked for (--set or --iters)
    assert "recipe best (the default) at W4A4: 2 reconstruction stage(s) of 1 iterations per block" in said, said
    r = json.loads(out.read_text())
    assert r["recipe"] == "best" and r["calib_size"] == 20, {k: r.get(k) for k in ("recipe", "calib_size")}
    assert main(["quantize", "fmnist-vit", "--data", str(root), "--recipe", "repq", "--calib-size", "21",
                 "--no-progress"]) == 2
    assert "calibration size 21 is larger than" in capsys.readouterr().err


def test_image_depths_bombs_and_unreadable_files_in_a_folder(tmp_path: Path, capsys) -> None:
    """16-bit greyscale PNGs are scaled to 8 bits (PIL's conversion clipped every value above 255 to white) and
    counted in the summary; a PNG whose header claims 100 000 x 100 000 pixels is one line naming it; a folder with
    one unreadable file calibrates at the recipe's default size on the readable ones (it failed: the default counted
    files)."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    from vitq.data.folders import read_image
    from vitq.errors import DataError

    g16 = tmp_path / "g16.png"
    Image.fromarray(np.full((28, 28), 65535 // 2, dtype=np.uint16)).save(g16)
    im = read_image(g16)
    assert im.mode == "L" and im.getextrema() == (127, 127) and im.info["vitq_scaled_from"].startswith("I")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"bomb.png is too large to decode safely"):
        read_image(bomb)

    folder = tmp_path / "calib"
    for i in range(8):
        _img(folder / f"{i}.png", (28, 28), "L", i)
    for i in range(3):
        Image.fromarray((np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)).save(folder / f"w{i}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bomb.rename(folder / "bomb.png")
    out = tmp_path / "r.json"
    assert main(["quantize", "fmnist-vit", "--calib-data", str(folder), "--recipe", "minmax", "--bits", "W8A8",
                 "--eval-size", "50", "--no-progress", "--skip-fp", "--json", str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert json.loads(out.read_text())["calib_size"] == 11
    assert "11 of the 13 image files" in said and "2 unreadable" in said and "3 of 16 bits per pixel, scaled" in said, said
