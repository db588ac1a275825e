"""Shared fixtures: tiny timm models made here (random weights), a tiny Fashion-MNIST folder."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import vitq  # noqa: F401  (registers quantizers and adapters)

# pytest-xdist (pyproject's addopts: one worker per core): one torch thread per worker, so the workers share
# the cores instead of oversubscribing them; alone, at most 2 threads (the CPUs CI runs on)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _WORKERS > 1 else max(1, min(2, torch.get_num_threads())))


def tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                qkv_bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


def tiny_deit(**kw):
    from timm.models.deit import VisionTransformerDistilled

    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformerDistilled(**args).eval()


def tiny_swin(**kw):
    from timm.models.swin_transformer import SwinTransformer

    args = dict(img_size=32, patch_size=2, in_chans=3, num_classes=5, window_size=4, embed_dim=16,
                depths=(2, 2), num_heads=(2, 4))
    args.update(kw)
    torch.manual_seed(0)
    return SwinTransformer(**args).eval()


def unfuse(model: torch.nn.Module) -> torch.nn.Module:
    """Make timm use its explicit (non-SDPA) attention path, the order of operations we copy."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


@pytest.fixture
def images16():
    torch.manual_seed(1)
    return torch.randn(8, 3, 16, 16)


@pytest.fixture
def images32():
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32)


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-format folder with 64 train and 32 test random images."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 255, (64, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte", rng.integers(0, 10, (64,)))
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 255, (32, 28, 28)), gz=False)
    write_idx(d / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (32,)), gz=False)
    return d


@pytest.fixture
def pickled_vit(tmp_path: Path) -> Path:
    """A tiny 1-channel 28x28 ViT pickled to a file (for ``--trust-pickle`` CLI tests)."""
    p = tmp_path / "tiny_vit.pt"
    m = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    m.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0,
                        "interpolation": "bilinear"}
    torch.save(m, p)
    return p


def has_reference_weights(name: str) -> bool:
    from vitq.reference import weights_path

    return weights_path(name).is_file()


def has_fashion_mnist() -> bool:
    from vitq.data import DEBIAN_FASHION_MNIST

    return (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file()
