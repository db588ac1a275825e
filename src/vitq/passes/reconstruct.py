"""``reconstruct`` pass: unit-by-unit reconstruction (AdaRound / BRECQ / QDrop / I&S-ViT modes).

Every option of :class:`vitq.recon.ReconConfig` is a pass option; see ``docs/methods/reconstruction.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..recon.engine import RECON_DEFAULTS, ReconConfig, reconstruct
from .registry import register_pass

log = logging.getLogger(__name__)

PASS_INDEX_KEY = "vitq.recon.pass_index"


def pass_run_dir(ctx: Any, run_dir: Optional[str], kind: str) -> Optional[str]:
    """Each reconstruction pass of a recipe gets its own folder under ``run_dir`` (``00-reconstruct``, ...)."""
    extras = getattr(ctx, "extras", None)
    idx = 0
    if extras is not None:
        idx = extras.get(PASS_INDEX_KEY, 0)
        extras[PASS_INDEX_KEY] = idx + 1
    if not run_dir:
        return None
    return str(Path(run_dir) / f"{idx:02d}-{kind}")


@register_pass("reconstruct", check=lambda o: ReconConfig.from_options(**o), **RECON_DEFAULTS)
def reconstruct_pass(model: nn.Module, ctx: Any, **opts: Any) -> nn.Module:
    """Unit-by-unit reconstruction: AdaRound / LSQ / FP weights, QDrop, pluggable loss and slicing."""
    cfg = ReconConfig.from_options(**opts)
    cfg = cfg.with_(run_dir=pass_run_dir(ctx, cfg.run_dir, "reconstruct"))
    reconstruct(model, cfg, ctx, name="reconstruct")
    return model
