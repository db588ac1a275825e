"""``reconstruct`` pass: unit-by-unit reconstruction (AdaRound / BRECQ / QDrop / I&S-ViT modes).

Every option of :class:`vitq.recon.ReconConfig` is a pass option; see ``docs/methods/reconstruction.md``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..recipes import PassConfig, Recipe
from ..recon.engine import RECON_DEFAULTS, ReconConfig, reconstruct
from .registry import get_pass, register_pass

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


@register_pass("reconstruct", **RECON_DEFAULTS)
def reconstruct_pass(model: nn.Module, ctx: Any, **opts: Any) -> nn.Module:
    """Unit-by-unit reconstruction: AdaRound / LSQ / FP weights, QDrop, pluggable loss and slicing."""
    cfg = ReconConfig.from_options(**opts)
    cfg = cfg.with_(run_dir=pass_run_dir(ctx, cfg.run_dir, "reconstruct"))
    reconstruct(model, cfg, ctx, name="reconstruct")
    return model


def override_pass_options(recipe: Recipe, **opts: Any) -> Recipe:
    """A copy of ``recipe`` where every pass that has option ``k`` gets value ``v`` (``None`` values
    are skipped). The CLI's ``--iters`` / ``--max-cache-gb`` / ``--resume-dir`` use this."""
    todo = {k: v for k, v in opts.items() if v is not None}
    if not todo:
        return recipe
    from ..errors import ConfigError

    if "iters" in todo and (not isinstance(todo["iters"], int) or todo["iters"] < 0):
        raise ConfigError(f"--iters {todo['iters']} must be an integer >= 0 (0 = calibration only)")
    if "max_cache_gb" in todo and float(todo["max_cache_gb"]) < 0:
        raise ConfigError(f"--max-cache-gb {todo['max_cache_gb']} must be >= 0 (0 streams every cache from disk)")
    passes = []
    for pc in recipe.passes:
        allowed = get_pass(pc.name).options
        new = dict(pc.options)
        new.update({k: v for k, v in todo.items() if k in allowed})
        passes.append(PassConfig(pc.name, tuple(sorted(new.items()))))
    if not any(k in get_pass(pc.name).options for pc in recipe.passes for k in todo):
        raise ConfigError(f"recipe {recipe.name} has no reconstruction pass, so {', '.join(sorted(todo))} cannot "
                          "apply: use a reconstruction recipe (brecq, qdrop, oas) or drop the option")
    return replace(recipe, passes=tuple(passes))
