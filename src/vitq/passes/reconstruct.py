"""``reconstruct`` pass: unit-by-unit reconstruction (AdaRound / BRECQ / QDrop / I&S-ViT modes).

Every option of :class:`vitq.recon.ReconConfig` is a pass option (the config *is* the pass's
options class); see ``docs/methods/reconstruction.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..recon.engine import ReconConfig, reconstruct
from .registry import register_pass

log = logging.getLogger(__name__)


def pass_run_dir(ctx: Any, run_dir: Optional[str], kind: str) -> Optional[str]:
    """Each reconstruction pass of a recipe gets its own folder under ``run_dir`` (``00-reconstruct``, ...)."""
    idx = 0
    if ctx is not None:
        idx = ctx.recon_passes
        ctx.recon_passes = idx + 1
    if not run_dir:
        return None
    return str(Path(run_dir) / f"{idx:02d}-{kind}")


@register_pass("reconstruct", ReconConfig)
def reconstruct_pass(model: nn.Module, ctx: Any, opts: ReconConfig = ReconConfig()) -> nn.Module:
    """Unit-by-unit reconstruction: AdaRound / LSQ / FP weights, QDrop, pluggable loss and slicing."""
    cfg = opts.with_(run_dir=pass_run_dir(ctx, opts.run_dir, "reconstruct"))
    reconstruct(model, cfg, ctx, name="reconstruct")
    return model
