"""Fashion-MNIST IDX reading, ImageFolder, preprocessing from pretrained_cfg, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import has_fashion_mnist, tiny_vit, write_idx

from vitq.data import (
    DataSpec,
    FashionMNIST,
    Preprocess,
    PreprocessConfig,
    build_dataset,
    calibration_subset,
    eval_subset,
    make_loader,
    read_idx,
)
from vitq.errors import DataError
from vitq.models import data_config


def test_read_fmnist_folder(fmnist_dir: Path) -> None:
    tr, te = FashionMNIST(fmnist_dir, "train"), FashionMNIST(fmnist_dir, "test")
    assert len(tr) == 64 and len(te) == 32
    x, y = tr[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8 and 0 <= y < 10


@pytest.mark.skipif(not has_fashion_mnist(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist() -> None:
    te = FashionMNIST(None, "test")
    assert len(te) == 10000 and te.images.shape == (10000, 1, 28, 28)
    assert sorted(te.targets.unique().tolist()) == list(range(10))


def test_missing_folder_and_file(fmnist_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere", "train")
    (fmnist_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing Fashion-MNIST file t10k-labels-idx1-ubyte"):
        FashionMNIST(fmnist_dir, "test")


def test_truncated_idx(tmp_path: Path) -> None:
    arr = np.zeros((4, 28, 28), dtype=np.uint8)
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, arr, gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p)


def test_preprocess_from_pretrained_cfg() -> None:
    model = tiny_vit()  # 3 channels, 16x16; timm's default ImageNet cfg
    cfg = data_config(model)
    assert cfg.input_size == (3, 16, 16)
    pre = Preprocess(cfg)
    grey = torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)
    out = pre(grey)
    assert out.shape == (3, 16, 16)  # grey -> 3 channels, resized
    batch = pre(torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8))
    assert batch.shape == (5, 3, 16, 16)
    model.pretrained_cfg = {"mean": (0.5,), "std": (0.25,), "crop_pct": 1.0}
    cfg2 = data_config(model)
    assert cfg2.mean == (0.5, 0.5, 0.5) and cfg2.crop_pct == 1.0
    x = Preprocess(cfg2)(torch.full((1, 16, 16), 255, dtype=torch.uint8))
    torch.testing.assert_close(x, torch.full((3, 16, 16), 2.0))


def test_batched_equals_itemwise(fmnist_dir: Path) -> None:
    pre = Preprocess(PreprocessConfig((1, 32, 32), (0.3,), (0.35,), "bilinear", 1.0))
    ds = build_dataset(f"fashion-mnist:{fmnist_dir}", "eval", pre)
    xb, yb = next(iter(make_loader(ds, batch_size=8)))
    items = torch.stack([ds[i][0] for i in range(8)])
    torch.testing.assert_close(xb, items)
    assert yb.tolist() == [ds[i][1] for i in range(8)]


def test_calibration_sampling(fmnist_dir: Path) -> None:
    ds = FashionMNIST(fmnist_dir, "train")
    a, b = calibration_subset(ds, 10, seed=3), calibration_subset(ds, 10, seed=3)
    assert a.indices == b.indices and len(set(a.indices)) == 10
    assert calibration_subset(ds, 10, seed=4).indices != a.indices
    with pytest.raises(DataError, match="must be positive"):
        calibration_subset(ds, 0, 0)
    with pytest.raises(DataError, match="larger than the train split \\(64 images\\)"):
        calibration_subset(ds, 65, 0)
    with pytest.raises(DataError, match="larger than the evaluation split"):
        eval_subset(FashionMNIST(fmnist_dir, "test"), 33)
    assert len(eval_subset(FashionMNIST(fmnist_dir, "test"), 5)) == 5


def _png(path: Path, color: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (color, color, color)).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "imnet"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                _png(root / split / c / f"{i}.png", 40 * i)
    pre = Preprocess(PreprocessConfig((3, 16, 16)))
    ds = build_dataset(str(root), "eval", pre)
    assert len(ds) == 6
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    xb, _ = next(iter(make_loader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16)


def test_imagefolder_errors(tmp_path: Path) -> None:
    pre = Preprocess(PreprocessConfig((3, 16, 16)))
    empty = tmp_path / "empty"
    (empty / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders|holds no images"):
        build_dataset(str(empty), "eval", pre)
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(DataError, match="has no val/"):
        build_dataset(str(tmp_path / "nosplit"), "eval", pre)
    with pytest.raises(DataError, match="neither 'fashion-mnist'"):
        DataSpec.parse(str(tmp_path / "missing"))


def _image_cases(tmp: "Path") -> list[tuple[str, "Path"]]:
    """Generated files: every PIL mode a folder may hold, odd sizes, 16-bit and float depths, truncations and
    headers that lie about the size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"):
        for size in ((1, 1), (3, 500), (28, 28)):
            if mode == "I;16":
                im = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
            elif mode == "I":
                im = Image.fromarray(rng.integers(0, 65536, size[::-1]).astype(np.int32))
            elif mode == "F":
                im = Image.fromarray(rng.random(size[::-1], dtype=np.float32))
            else:
                im = Image.new(mode, size)
            ext = "tiff" if mode in ("CMYK", "F", "I") else "png"
            f = tmp / f"{mode.replace(';', '_')}_{size[0]}x{size[1]}.{ext}"
            im.save(f)
            out.append((f"{mode} {size}", f))
            data = f.read_bytes()
            for frac in (0.0, 0.1, 0.5, 0.9):
                t = tmp / f"trunc{int(frac * 10)}_{f.name}"
                t.write_bytes(data[: int(len(data) * frac)])
                out.append((f"{mode} {size} truncated to {frac}", t))
    big = tmp / "lies.png"  # a valid small PNG whose header claims 60000 x 60000
    Image.new("L", (4, 4)).save(big)
    b = bytearray(big.read_bytes())
    b[16:24] = (60000).to_bytes(4, "big") * 2
    big.write_bytes(bytes(b))
    out.append(("header claims 60000x60000", big))
    junk = tmp / "junk.jpg"
    junk.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out.append(("random bytes", junk))
    return out


def test_the_image_reader_decodes_or_says_one_line_for_any_file(tmp_path) -> None:
    """Property of read_image + the model's preprocessing over generated files: an image comes out as the grey or RGB
    tensor the model takes, in range (16-bit data scaled, not clipped), or one DataError line names the file -
    never another exception."""
    import torch

    from vitq.data import Preprocess, PreprocessConfig, pil_mode
    from vitq.data.folders import read_image
    from vitq.errors import DataError

    decoded = refused = 0
    for what, f in _image_cases(tmp_path):
        try:
            im = read_image(f)
        except DataError as e:
            assert str(f) in str(e) and "\n" not in str(e), (what, e)
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from None
        for channels in (1, 3):
            x = torch.from_numpy(__import__("numpy").asarray(im.convert(pil_mode(channels))).copy())
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
            cfg = PreprocessConfig(input_size=(channels, 28, 28), mean=(0.5,) * channels, std=(0.5,) * channels,
                                   interpolation="bilinear", crop_pct=1.0)
            y = Preprocess(cfg)(x)
            assert y.shape == (channels, 28, 28) and torch.isfinite(y).all() and -1.0 <= y.min() and y.max() <= 1.0, what
        if "I;16" in what and "truncated" not in what and "(28, 28)" in what:  # scaled: the spread survives
            assert im.getextrema()[1] > 200 and im.getextrema()[0] < 50, (what, im.getextrema())
        decoded += 1
    assert decoded >= 25 and refused >= 40, (decoded, refused)


def test_the_folder_readers_take_a_layout_or_say_one_line(tmp_path) -> None:
    """Property of the folder readers over generated layouts (an ImageNet root, a split itself, unlabeled images):
    empty folders, class folders without images, hidden and non-image files, nested folders, a file where a folder
    should be, a dangling symlink, a broken image - each builds a dataset whose items decode (a broken file being
    one DataError naming it), or is one DataError line; never another exception."""
    import itertools
    import os

    import numpy as np
    from PIL import Image

    from vitq.data import DataSpec, build_dataset, calibration_images, calibration_subset
    from vitq.errors import DataError

    def img(p, seed=0):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(p)

    def pre(x):
        return x.float()

    parts = {
        "class_with_image": lambda r: img(r / "a" / "1.png"),
        "class_empty": lambda r: (r / "b").mkdir(parents=True, exist_ok=True),
        "class_only_text": lambda r: ((r / "c").mkdir(parents=True, exist_ok=True), (r / "c" / "x.txt").write_text("x")),
        "hidden_image": lambda r: img(r / "a" / ".h.png"),
        "nested": lambda r: img(r / "a" / "deep" / "2.png", 1),
        "broken": lambda r: ((r / "a").mkdir(parents=True, exist_ok=True), (r / "a" / "bad.jpg").write_bytes(b"\xff\xd8junk")),
        "dangling_link": lambda r: ((r / "a").mkdir(parents=True, exist_ok=True),
                                    os.symlink(r / "nowhere.png", r / "a" / "link.png")),
        "file_not_folder": lambda r: (r.parent.mkdir(parents=True, exist_ok=True), r.write_text("not a folder")),
    }
    built = refused = 0
    names = list(parts)
    for k, combo in enumerate(itertools.chain.from_iterable(itertools.combinations(names, n) for n in (1, 2, 3))):
        if "file_not_folder" in combo and len(combo) > 1:
            continue
        base = tmp_path / f"case{k}"
        for layout in ("imagenet", "split", "unlabeled"):
            root = base / layout
            target = root / "train" if layout == "imagenet" else root
            for part in combo:
                parts[part](target)
            if layout == "imagenet" and "file_not_folder" not in combo:
                img(root / "val" / "a" / "v.png", 2)
            try:
                if layout == "unlabeled":
                    ds = calibration_images(root, pre)
                else:
                    ds = build_dataset(DataSpec.parse(str(root)), "train" if layout == "imagenet" else "eval", pre)
                for i in range(len(ds)):
                    try:
                        ds[i]
                    except DataError as e:
                        assert "\n" not in str(e) and ("bad.jpg" in str(e) or "link.png" in str(e)), (combo, layout, e)
                calibration_subset(ds, 1, 0, at_most=True)
                built += 1
            except DataError as e:
                assert "\n" not in str(e), (combo, layout, e)
                refused += 1
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{combo} {layout}: {type(e).__name__}: {e}") from None
    assert built > 50 and refused > 20, (built, refused)
