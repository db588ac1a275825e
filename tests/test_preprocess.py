"""Preprocessing from the model's own library: timm's create_transform, a Hugging Face image
processor; the reference models' inputs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vit

import vitq
from vitq.data import Preprocess, PreprocessConfig
from vitq.errors import DataError
from vitq.models import transforms


def images():
    """Non-square images in the modes users have: RGB, grey, RGBA, palette; and a small one."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    rgb = Image.fromarray(torch.randint(0, 256, (300, 450, 3), generator=g, dtype=torch.uint8).numpy())
    tall = Image.fromarray(torch.randint(0, 256, (401, 233, 3), generator=g, dtype=torch.uint8).numpy())
    return {"rgb 450x300": rgb, "rgb 233x401": tall, "grey": rgb.convert("L"), "rgba": rgb.convert("RGBA"),
            "palette": rgb.convert("P"), "small": rgb.resize((50, 37))}


def timm_reference(model, img, **args):
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config(args=args, model=model))(img.convert("RGB"))


@pytest.mark.parametrize("cfg", [
    {},  # timm's defaults for the architecture: 224, bicubic, crop_pct 0.9
    {"crop_pct": 0.875, "interpolation": "bilinear"},
    {"crop_pct": 1.0, "interpolation": "bicubic", "crop_mode": "squash"},
    {"crop_pct": 0.95, "interpolation": "bilinear", "crop_mode": "border", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {"input_size": (3, 160, 160), "crop_pct": 0.8, "interpolation": "nearest"},
])
def test_timm_inputs_equal_timms_own_transform(cfg) -> None:
    import timm

    size = cfg.get("input_size", (3, 224, 224))[1]
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=size)
    m.pretrained_cfg = {**m.pretrained_cfg, **cfg}
    tf = transforms(m)
    assert tf.source == "timm.data.create_transform"
    for name, img in images().items():
        ours, ref = tf.image(img), timm_reference(m, img)
        assert ours.shape == (3, size, size), name
        assert torch.equal(ours, ref), name


def test_timm_overrides_are_validates_and_match_timm_validate() -> None:
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    img = images()["rgb 450x300"]
    tf = transforms(m, crop_pct=1.0, interpolation="bilinear")
    assert torch.equal(tf.image(img), timm_reference(m, img, crop_pct=1.0, interpolation="bilinear"))
    with pytest.raises(DataError, match="built for 224x224"):
        transforms(m, input_size=(3, 256, 256))  # a fixed-size ViT cannot take it
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, dynamic_img_size=True)
    tf = transforms(dyn, input_size=(3, 256, 256))
    assert torch.equal(tf.image(img), timm_reference(dyn, img, input_size=(3, 256, 256)))
    with pytest.raises(DataError, match="crop-pct 1.5"):
        transforms(m, crop_pct=1.5)
    with pytest.raises(DataError, match="channels"):
        transforms(m, input_size=(1, 224, 224))


def test_reference_models_keep_their_inputs(fmnist_dir) -> None:
    """Fashion-MNIST batches reach the reference models exactly as before: (x / 255 - mean) / std."""
    from vitq.data import build_dataset, make_loader

    model = vitq.load_model("fmnist-vit")[0]
    tf = transforms(model)
    assert tf.config.input_size == (1, 28, 28)
    x, _ = next(iter(make_loader(build_dataset(f"fashion-mnist:{fmnist_dir}", "eval", tf), batch_size=16)))
    from vitq.data import FashionMNIST

    raw = FashionMNIST(fmnist_dir, "test").images[:16].float() / 255.0
    mean, std = tf.config.mean[0], tf.config.std[0]
    assert torch.equal(x, (raw - mean) / std)


def test_tensor_preprocess_follows_timms_resize_then_crop() -> None:
    """Image tensors: shorter side to size / crop_pct, centre crop (what timm does to PIL images)."""
    import timm
    from torchvision.transforms.functional import pil_to_tensor

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    m.pretrained_cfg = {**m.pretrained_cfg, "interpolation": "bilinear"}
    tf = transforms(m)
    img = images()["rgb 450x300"]
    ours, ref = tf.tensor(pil_to_tensor(img)), tf.image(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02  # torch's and PIL's antialiased resize differ slightly
    squash = Preprocess(PreprocessConfig((3, 224, 224), crop_pct=1.0, crop_mode="squash"))
    assert squash(pil_to_tensor(img)).shape == (3, 224, 224)


def test_hf_inputs_equal_its_image_processor(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor

    from vitq.reference import WEIGHTS_DIR

    folder = WEIGHTS_DIR / "fmnist-vit-hf"
    model = vitq.load_model(f"hf:{folder}")[0]
    tf = transforms(model)
    assert tf.source.startswith("transformers ")
    proc = AutoImageProcessor.from_pretrained(str(folder))
    for name, img in images().items():
        ref = proc(images=img.convert("L"), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(tf.image(img), ref), name
    with pytest.raises(DataError, match="preprocessor_config.json"):
        transforms(model, crop_pct=0.9)


def test_a_model_without_its_library_transform_uses_vitqs(tmp_path: Path) -> None:
    """The base adapter's transform (torchvision) for families without one: same shape, normalised."""
    from vitq.adapters import get_adapter
    from vitq.adapters.base import Adapter

    m = tiny_vit()
    cfg = get_adapter(m).data_config(m)
    fn, name = Adapter.image_transform(get_adapter(m), m, cfg)
    assert "torchvision" in name and fn(images()["rgb 450x300"]).shape == (3, 16, 16)
