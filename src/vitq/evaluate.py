"""Evaluation: top-1 / top-5 accuracy, per-site error, timings."""

from __future__ import annotations

import math
import resource
import time
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB: since the last :func:`reset_peak_rss` where Linux
    allows resetting it (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux ``clear_refs`` 5), so that the next
    :func:`peak_rss_mb` measures one run. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, progress: bool = False, desc: str = "eval",
             device: Optional[torch.device] = None) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of ``model`` over ``loader`` of ``(images, labels)``."""
    model.eval()
    n = c1 = c5 = 0
    t0 = time.perf_counter()
    it: Iterable[Any] = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, unit="batch", leave=False)
    for x, y in it:
        if device is not None:
            x, y = x.to(device), y.to(device)
        logits = model(x)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y.unsqueeze(-1)).any(-1).sum().item()
        n += len(y)
    dt = time.perf_counter() - t0
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "n": n, "seconds": dt}


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """Signal-to-quantization-noise ratio, dB."""
    noise = (ref - out).pow(2).mean().item()
    sig = ref.pow(2).mean().item()
    return float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
