"""Mixed precision under a budget: per-site weight bits chosen from measured sensitivity.

``vitq quantize --bits auto --budget 4.5`` (or ``autoA4``; ``--budget-mb``):

1. **Probe.** The recipe runs once at W8 with its activation bits - without its training passes
   (reconstruction), which would cost hours per probe - so that reparameterizations and searches
   shape the weights as they will. Then, with the activation sites off (at A4 their noise swamps one
   weight's change: measured, the single-site costs were not even monotone in the bits), for every
   weight site and every choice in :data:`CHOICES` (3, 4, 6, 8 bits or float) only that site's weight
   is quantized at that width (its quantizer re-calibrated from the weight), and the cost is the mean
   KL divergence of the model's output distribution from the float model's, on images of the
   *calibration* source - never the evaluation set, whose accuracy the result is judged by; no
   labels needed.
2. **Allocate.** Per site, the increase of that KL over the all-W8 probe is taken as additive over
   sites (the usual first-order assumption of HAWQ-style allocation) and the bit-widths are chosen by
   an exact multiple-choice knapsack (dynamic programme over the budget in units of the greatest common
   divisor of the sites' bit costs; were that more than :data:`MAX_UNITS` units, in :data:`RESOLUTION`
   steps with costs rounded up):
   the least total cost with ``sum(params_s * bits_s) <= budget * sum(params_s)`` (float weights cost
   32 bits). Exact, unlike a greedy pass, for the same cost table; the table is the approximation.
3. **Recipe.** The result is an ordinary recipe - the original with one ``weight`` override per
   site - that the user can read, edit and run again, and that exports like any other.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ..batches import batch_images, forward_logits
from ..bits import MIN_BITS, Bits, check_width
from ..devices import model_device
from ..errors import ConfigError
from ..nn import FakeQuant, disabled, fake_quants
from ..passes import get_pass
from ..passes.quantize import iter_slots
from ..pipeline import CalibData, Context, run_recipe
from ..recipes import PassConfig, Recipe, load_recipe

CHOICES: tuple[Optional[int], ...] = (3, 4, 6, 8, None)  # None: the weight stays float
FLOAT_BITS = 32
RESOLUTION = 20_000
MAX_UNITS = 200_000  # budget units the exact knapsack may use (one numpy row each)


def _trains(pc: PassConfig) -> bool:
    """A training pass (reconstruction): one with an iteration count."""
    return "iters" in get_pass(pc.name).options


def _training(recipe: Recipe) -> list[str]:
    return [pc.name for pc in recipe.passes if _trains(pc)]


def probe_recipe(recipe: Recipe) -> Recipe:
    """The recipe without its training passes (reconstruction): what the sensitivity probe runs."""
    return replace(recipe, name=f"{recipe.name}-probe", passes=tuple(pc for pc in recipe.passes if not _trains(pc)))


@dataclass(frozen=True)
class WeightSite:
    module: str
    role: str
    params: int


def weight_sites(model: nn.Module) -> list[tuple[WeightSite, nn.Module, FakeQuant]]:
    out = []
    for name, mod, slot, role, kind in iter_slots(model):
        fq = getattr(mod, slot)
        if kind == "weight" and isinstance(fq, FakeQuant):
            out.append((WeightSite(name, str(role), int(mod.weight.numel())), mod, fq))
    return out


def _kl(model: nn.Module, images: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, lp in zip(images, ref):
            lq = torch.log_softmax(forward_logits(model, x).float(), -1)
            tot += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            n += len(x)
    return tot / max(n, 1)


def sensitivity_table(model: nn.Module, recipe: "str | Recipe", act_bits: int, calib: CalibData,
                      images: Iterable[Tensor], choices: Sequence[Optional[int]] = CHOICES, seed: int = 0,
                      batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Quantize a copy of ``model`` with the recipe's probe at W8A``act_bits`` and measure, per weight
    site and choice, the KL of the outputs from the float model's when only that site's weight changes
    width. Returns ``{"sites": [{module, role, params, kl: {"3": .., "float": ..}}], "base_kl": ..}``."""
    recipe = load_recipe(recipe).at(Bits(8, act_bits))  # the probe's width: its when-rules and passes
    q = copy.deepcopy(model)
    device = model_device(model)
    run_recipe(q, probe_recipe(recipe), Context(calib=calib, bits=Bits(8, act_bits), seed=seed,
                                                batch_size=batch_size, device=device))
    q.eval()
    for fq in fake_quants(q, "act"):  # the weights' own effect: activation noise would swamp one weight's change
        fq.enabled = False
    xs = [batch_images(x).to(device) for x in images]
    if not xs:
        raise ConfigError("no images to measure sensitivity on: give at least one image")
    with disabled(q), torch.no_grad():
        ref = [torch.log_softmax(forward_logits(q, x).float(), -1) for x in xs]
    sites = weight_sites(q)
    for _, _, fq in sites:  # one weight site at a time: the others float
        fq.enabled = False
    base = _kl(q, xs, ref)  # 0 up to float rounding: every site off
    if not sites:
        raise ConfigError(f"recipe {recipe.name} quantizes no weight: mixed precision chooses weight bits, use a "
                          "recipe with weight rules")
    rows = []
    it: Iterable[Any] = sites
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(sites, desc="mixed precision: sensitivity", unit="site", leave=False)
    for ws, mod, fq in it:
        spec = fq.spec
        kl: dict[str, float] = {}
        for b in choices:
            if b is None:
                kl[_key(b)] = base
                continue
            fq.enabled = True
            fq.spec = replace(spec, bits=b)
            fq.calibrate_weight(mod.weight)
            kl[_key(b)] = _kl(q, xs, ref)
            fq.enabled = False
        fq.spec = spec
        fq.calibrate_weight(mod.weight)
        rows.append({"module": ws.module, "role": ws.role, "params": ws.params, "kl": kl})
    return {"base_kl": base, "act_bits": act_bits, "recipe": recipe.name,
            "probe_passes": [pc.name for pc in probe_recipe(recipe).passes], "skipped_passes": _training(recipe),
            "sites": rows, "images": sum(len(x) for x in xs)}


def _key(b: Optional[int]) -> str:
    return "float" if b is None else str(b)


def _bits_of(key: str) -> int:
    return FLOAT_BITS if key == "float" else int(key)


def allocate(table: dict[str, Any], budget_bits: Optional[float] = None, budget_mb: Optional[float] = None,
             resolution: int = RESOLUTION) -> dict[str, Any]:
    """Exact multiple-choice knapsack over the sensitivity table: per site one choice, least total KL
    increase, total weight bits within the budget (``budget_bits``: average bits per weight; ``budget_mb``:
    megabytes of weight codes, 1e6 bytes). Returns the assignment and its predicted cost."""
    if (budget_bits is None) == (budget_mb is None):
        raise ConfigError("mixed precision needs one budget: --budget BITS (average weight bits) or --budget-mb MB")
    sites = table["sites"]
    total_params = sum(s["params"] for s in sites)
    cap_bits = budget_bits * total_params if budget_bits is not None else float(budget_mb) * 8e6  # type: ignore[arg-type]
    min_bits = min(_bits_of(k) for k in sites[0]["kl"]) if sites else MIN_BITS
    if cap_bits < min_bits * total_params - 1e-6:
        what = f"--budget {budget_bits}" if budget_bits is not None else f"--budget-mb {budget_mb}"
        raise ConfigError(f"{what} is below the smallest choice ({min_bits} bits for every weight = "
                          f"{min_bits * total_params / 8e6:.3f} MB): raise the budget")
    keys_per_site = [list(s["kl"]) for s in sites]
    raw = [[s["params"] * _bits_of(k) for k in keys] for s, keys in zip(sites, keys_per_site)]
    g = 0
    for row in raw:
        for c in row:
            g = math.gcd(g, int(c))
    if cap_bits / max(g, 1) <= MAX_UNITS:  # whole units of the costs' gcd: the knapsack is exact
        unit, cap = float(g), int(math.floor(cap_bits / g + 1e-9))
        costs = [[int(c // g) for c in row] for row in raw]
    else:  # costs rounded up to 1/resolution of the budget: never over it, optimal within that step
        unit, cap = cap_bits / resolution, resolution
        costs = [[math.ceil(c / unit - 1e-9) for c in row] for row in raw]
    base = table["base_kl"]
    best = np.zeros(cap + 1)  # best[c]: least cost of the sites so far within c units
    back = []
    for s, keys, cs in zip(sites, keys_per_site, costs):
        new = np.full(cap + 1, np.inf)
        choice = np.full(cap + 1, -1, dtype=np.int64)
        for j, (k, w) in enumerate(zip(keys, cs)):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + (s["kl"][k] - base)
            better = cand < new
            new[better], choice[better] = cand[better], j
        best = new
        back.append(choice)
    c = cap
    if not np.isfinite(best[c]):
        raise ConfigError("no bit-width assignment fits the budget: raise it")
    pick: dict[str, str] = {}
    for i in range(len(sites) - 1, -1, -1):
        j = int(back[i][c])
        pick[sites[i]["module"]] = keys_per_site[i][j]
        c -= costs[i][j]
    used = sum(s["params"] * _bits_of(pick[s["module"]]) for s in sites)
    return {"bits": {s["module"]: pick[s["module"]] for s in sites}, "avg_bits": used / total_params,
            "weight_mb": used / 8e6, "predicted_kl": base + sum(s["kl"][pick[s["module"]]] - base for s in sites),
            "budget_bits": budget_bits, "budget_mb": budget_mb, "method": "exact multiple-choice knapsack"}


def mixed_recipe(recipe: "str | Recipe", model: nn.Module, assignment: dict[str, Any], name: Optional[str] = None) -> Recipe:
    """``recipe`` with one ``weight`` override per site of ``assignment["bits"]`` (module -> "3".."8" | "float"):
    the site's own rule at that width, or float. ``model``: the float model (wrapped or not), for the roles."""
    from ..pipeline import wrap

    recipe = load_recipe(recipe)
    w = wrap(copy.deepcopy(model))
    roles = {n: role for n, _, _, role, kind in iter_slots(w) if kind == "weight"}
    extra = []
    for module, key in assignment["bits"].items():
        if module not in roles:
            raise ConfigError(f"mixed precision: {module} has no weight site in this model")
        rule = recipe.rule_for("weight", roles[module], module)
        if rule is None:
            continue
        b = None if key == "float" else check_width(int(key), f"mixed precision: bits for {module}")
        extra.append(("weight", f"^{re.escape(module)}$", None if b is None else replace(rule, bits=b)))
    budget = (f"{assignment['budget_bits']} average weight bits" if assignment.get("budget_bits") is not None
              else f"{assignment['budget_mb']} MB of weight codes")
    desc = (f"{recipe.name} with per-site weight bits chosen by vitq for {budget} (average "
            f"{assignment['avg_bits']:.3f} bits, {assignment['weight_mb']:.3f} MB): {assignment['method']} over the "
            f"measured output-KL of each site at 3 / 4 / 6 / 8 bits / float. {recipe.description}")
    return replace(recipe.with_overrides(extra), name=name or f"{recipe.name}-mixed", description=" ".join(desc.split()))


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a YAML file :func:`vitq.recipes.load_recipe` reads back to the same recipe."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=110, allow_unicode=True)
