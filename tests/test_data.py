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
