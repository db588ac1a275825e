"""vitq reproduce: the shipped protocols are valid, and a protocol runs end to end on a tiny generated
ImageNet-layout folder with local weight files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitq.cli import main
from vitq.errors import ConfigError, DataError
from vitq.reproduce import find_weights, list_protocols, load_protocol


def test_shipped_protocols_are_valid() -> None:
    import timm

    assert {"ptq4vit-lineage", "fqvit-lineage"} <= set(list_protocols())
    for name in list_protocols():
        p = load_protocol(name)
        assert p.bits and p.models and p.recipes
        for m in p.models:
            assert timm.is_model(m.timm), m.timm
        ours = {method for _, method in p.recipes}
        for method, by_bits in p.reported.items():
            assert method in ours or "not" in method, method  # every other row says it is not a vitq recipe
            for b, row in by_bits.items():
                assert b in p.bits, (method, b)
                assert set(row) <= {m.label for m in p.models}, (method, b)
                assert all(0 <= v <= 100 for v in row.values())
    p = load_protocol("ptq4vit-lineage")
    assert p.paper("RepQ-ViT", "W4A4", "DeiT-S") == 69.03 and p.paper("DopQ-ViT", "W3A3", "DeiT-S") == 59.26
    assert "GLF-Q 2026 (not in vitq)" in p.others()


def imagenet(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            for i in range(per_class):
                d = root / split / f"n{c:08d}"
                d.mkdir(parents=True, exist_ok=True)
                w, h = 64 + 16 * i, 48 + 8 * c
                arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{split}_{c}_{i}.JPEG")
    return root


def make_test_vit_weights(folder: Path, classes: int = 3) -> Path:
    """timm's ``test_vit`` (RGB, 160 px) with seeded random weights, saved as ``folder/test_vit.safetensors``."""
    import timm
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=classes).state_dict(),
              str(folder / "test_vit.safetensors"))
    return folder / "test_vit.safetensors"


def test_reproduce_end_to_end_on_a_tiny_imagenet(tmp_path: Path) -> None:
    root = imagenet(tmp_path / "imagenet")
    weights = make_test_vit_weights(tmp_path / "weights").parent
    proto = tmp_path / "tiny.yaml"
    proto.write_text("""description: a tiny protocol
source: made up for the test
bits: [W8A8, W4A4]
models:
  Tiny: {timm: test_vit, fp: 50.0}
recipes:
  minmax: MinMax
  repq: RepQ-ViT
reported:
  RepQ-ViT:
    W4A4: {Tiny: 40.0}
  Somebody else (not in vitq):
    W4A4: {Tiny: 45.5}
""")
    out, md = tmp_path / "rows.json", tmp_path / "table.md"
    assert main(["reproduce", str(proto), "--imagenet", str(root), "--weights", str(weights), "--calib-size", "6",
                 "--bits", "W4A4", "--no-progress", "--json", str(out), "--md", str(md)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["label"], r["bits"], r["recipe"]) for r in rows] == [("Tiny", "W4A4", "minmax"), ("Tiny", "W4A4", "repq")]
    repq = rows[1]
    assert repq["paper_top1"] == 40.0 and repq["paper_diff"] == round(repq["q_top1"] - 40.0, 2) and repq["eval_size"] == 12
    assert repq["schema"] == "vitq.result/1" and repq["model"] == "test_vit" and repq["vs_fp"]["n"] == 12
    assert repq["context"] == {"Somebody else (not in vitq)": 45.5} and repq["calib_size"] == 6
    table = md.read_text()
    assert "| repq (RepQ-ViT) |" in table and "40.00" in table and "*Somebody else (not in vitq)* | 45.50" in table


def test_reproduce_refusals(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="unknown protocol 'nope'"):
        load_protocol("nope")
    (tmp_path / "w").mkdir()
    with pytest.raises(DataError, match="no weights for deit_small_patch16_224"):
        find_weights(tmp_path / "w", "deit_small_patch16_224")
    (tmp_path / "w" / "deit_small_patch16_224.pth").write_bytes(b"x")
    assert find_weights(tmp_path / "w", "deit_small_patch16_224.fb_in1k").name == "deit_small_patch16_224.pth"
    base = ["reproduce", "ptq4vit-lineage", "--imagenet", str(tmp_path), "--weights", str(tmp_path / "w")]
    for extra, msg in ((["--models", "ViT-Z"], "--models ViT-Z: not in this protocol"),
                       (["--models", "ViT-S"], "no weights for vit_small_patch16_224"),
                       (["--models", "DeiT-S", "--recipes", "fq"], "--recipes fq: not in this protocol")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
