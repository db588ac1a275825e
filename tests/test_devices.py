"""--device and device=: the chosen device everywhere, one-line errors for a device that is not there."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import vitq
from vitq.devices import available, resolve
from vitq.errors import ConfigError

NO_GPU = not torch.cuda.is_available()


def test_resolve() -> None:
    assert resolve(None) == resolve("cpu") == resolve("CPU") == torch.device("cpu")
    assert resolve("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve("meta")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        resolve("cuda:1")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        vitq.quantize(tiny_vit(), "minmax", "W8A8", calib_data=torch.randn(4, 3, 16, 16), device="cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        vitq.run_recipe(tiny_vit(), "minmax", vitq.Context(calib=torch.randn(4, 3, 16, 16), bits=vitq.Bits(8, 8),
                                                            device="cuda"))
    from vitq.cli import main

    assert main(["quantize", "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU is visible" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("device", available())
@pytest.mark.parametrize("recipe", ["repq", "qdrop"])
def test_quantize_on_each_device_equals_cpu(device: str, recipe: str) -> None:
    """Calibration and reconstruction on ``device`` give the CPU's model (within float tolerance)."""
    from vitq.recipes import load_recipe, override_pass_options

    r = load_recipe(recipe)
    if recipe == "qdrop":
        r = override_pass_options(r, iters=4)
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(16, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    ref = vitq.quantize(tiny_vit(), r, "W4A8", calib_data=calib, device="cpu")
    q = vitq.quantize(tiny_vit(), r, "W4A8", calib_data=calib, device=device)
    assert all(p.device.type == torch.device(device).type for p in q.parameters())
    with torch.no_grad():
        a, b = ref(x), q(x.to(device)).cpu()
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item()), (a - b).abs().max()
