"""Python API misuse: one VitqError line naming the problem and the fix, never an error from deep in torch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import vitq
from vitq.errors import VitqError

X = torch.randn(8, 3, 16, 16)

CASES = {
    "model as a string": (lambda: vitq.quantize("fmnist-vit", "minmax", "W8A8", calib_data=X), "load it first"),
    "model None": (lambda: vitq.quantize(None, "minmax", "W8A8", calib_data=X), "takes an nn.Module, got NoneType"),
    "not a ViT": (lambda: vitq.quantize(torch.nn.Linear(3, 3), "minmax", "W8A8", calib_data=X), "unsupported model type"),
    "recipe 123": (lambda: vitq.quantize(tiny_vit(), 123, "W8A8", calib_data=X), "recipe must be a recipe name"),
    "calib_data a string": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data="images"),
                            "calib_data is the string 'images'"),
    "calib_data numpy": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X.numpy()), "got ndarray"),
    "seed a string": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X, seed="x"), "seed must be an integer"),
    "batch_size 0": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X, batch_size=0), "batch_size must be >= 1"),
    "one channel": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(4, 1, 16, 16)),
                    r"1 channel\(s\), the model takes 3"),
    "wrong size": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(4, 3, 20, 20)),
                   "are 20x20, the model takes 16x16"),
    "uint8 images": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X.to(torch.uint8)),
                     "are uint8: vitq takes preprocessed float images"),
    "float16 images": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X.half()),
                       "are float16, the model's weights float32"),
    "bits 44": (lambda: vitq.quantize(tiny_vit(), "minmax", 44, calib_data=X), "malformed bit-width 44"),
    "unknown target": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X, target="tflite"), "unknown target"),
    "unknown device": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X, device="tpu"), "unknown device"),
    "empty calibration": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.zeros(0, 3, 16, 16)),
                          "calibration set is empty"),
    "NaN images": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.full((4, 3, 16, 16), float("nan"))),
                   "NaN values reached quantization site"),
    "3-d tensor": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(3, 16, 16)), "must be N,C,H,W"),
    "one-pass iterator": (lambda: vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=iter([X[:4].to(torch.uint8)])),
                          "are uint8"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_api_misuse_is_one_clear_error(name: str) -> None:
    fn, pattern = CASES[name]
    with pytest.raises(VitqError, match=pattern) as e:
        fn()
    assert "\n" not in str(e.value).strip()


def test_a_one_pass_iterator_still_calibrates_on_every_batch() -> None:
    a = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=iter([X[:4], X[4:]]))
    b = vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=X, batch_size=4)
    with torch.no_grad():
        assert torch.equal(a(X), b(X))  # the first batch was checked, and not lost to the check
