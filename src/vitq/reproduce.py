"""``vitq reproduce PROTOCOL --imagenet DIR --weights DIR``: a published ImageNet protocol, run.

A protocol (``protocols/*.yaml``, or a YAML file) is data: the models (timm names, their published FP
top-1), the bit-widths, the vitq recipes it runs and which paper row each is compared with, and the
papers' reported numbers (``reported: {method: {bits: {model: top1}}}``, copied from METHODS.md with
its sources). For every model x bits x recipe x seed: the model is built by timm from a local weight
file (never downloaded), calibrated on the recipe's number of images from ImageNet's train split (or
``--calib-data``), evaluated on ``val``, and printed beside the paper's number, with the rows of
methods vitq does not implement (the current highs) as context.

Shipped: ``ptq4vit-lineage`` (partially quantized: PTQ4ViT, RepQ-ViT, DopQ-ViT, OAS, QDrop, BasePTQ; W3A3,
W4A4, W6A6, W8A8) and ``fqvit-lineage`` (fully quantized: FQ-ViT, AOCQ, TSPTQ-ViT; W8A8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from . import distributed
from .bits import Bits
from .errors import ConfigError, DataError
from .recipes import list_recipes

PROTOCOL_DIR = Path(str(resources.files("vitq.protocols")))
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ProtocolModel:
    label: str
    timm: str
    fp: Optional[float] = None


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str = ""
    source: str = ""
    bits: tuple[str, ...] = ()
    models: tuple[ProtocolModel, ...] = ()
    recipes: tuple[tuple[str, str], ...] = ()  # (vitq recipe, the paper method it is compared with)
    reported: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)

    def paper(self, method: str, bits: str, model: str) -> Optional[float]:
        v = self.reported.get(method, {}).get(bits, {}).get(model)
        return None if v is None else float(v)

    def others(self) -> list[str]:
        """Reported methods no recipe of the protocol runs (context rows: the current highs)."""
        ours = {m for _, m in self.recipes}
        return [m for m in self.reported if m not in ours]


def list_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def load_protocol(name_or_path: str) -> Protocol:
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        p = PROTOCOL_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown protocol {name_or_path!r}: choose one of {', '.join(list_protocols())} "
                              "or pass a protocol YAML file")
    if not p.is_file():
        raise ConfigError(f"protocol file {p} does not exist: check the path")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"protocol {p} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    known = {"description", "source", "bits", "models", "recipes", "reported"}
    if not isinstance(d, dict) or set(d) - known:
        raise ConfigError(f"protocol {p}: a mapping with keys {sorted(known)} (unknown: {sorted(set(d or {}) - known)})")
    bits = tuple(str(Bits.parse(b)) for b in d.get("bits") or [])
    models = []
    for label, m in (d.get("models") or {}).items():
        if not isinstance(m, dict) or "timm" not in m or set(m) - {"timm", "fp"}:
            raise ConfigError(f"protocol {p}: model {label} must be {{timm: NAME, fp: TOP1}}")
        models.append(ProtocolModel(str(label), str(m["timm"]), None if m.get("fp") is None else float(m["fp"])))
    recipes = tuple((str(r), str(m)) for r, m in (d.get("recipes") or {}).items())
    unknown = [r for r, _ in recipes if r not in list_recipes() and not Path(r).is_file()]
    if unknown:
        raise ConfigError(f"protocol {p}: unknown recipe(s) {', '.join(unknown)}: see vitq list")
    if not bits or not models or not recipes:
        raise ConfigError(f"protocol {p} needs bits, models and recipes")
    reported = {str(k): {str(Bits.parse(b)): {str(m): float(v) for m, v in (row or {}).items()}
                         for b, row in (by_bits or {}).items()} for k, by_bits in (d.get("reported") or {}).items()}
    return Protocol(p.stem, " ".join(str(d.get("description", "")).split()), " ".join(str(d.get("source", "")).split()),
                    bits, tuple(models), recipes, reported)


def _pick(items: Iterable[Any], wanted: Optional[Sequence[str]], key: Any, what: str) -> list[Any]:
    items = list(items)
    if not wanted:
        return items
    out = []
    for w in wanted:
        hit = [i for i in items if w in key(i)]
        if not hit:
            names = sorted({k for i in items for k in key(i)})
            raise ConfigError(f"--{what} {w}: not in this protocol; choose from {', '.join(names)}")
        out += [h for h in hit if h not in out]
    return out


def find_weights(weights: "str | Path", name: str) -> Path:
    """``DIR/NAME.{safetensors,pth,pt,bin}`` or ``DIR/NAME/{model.safetensors,pytorch_model.bin}`` (also
    without a ``.tag`` suffix of the timm name)."""
    root = Path(weights)
    if not root.is_dir():
        raise DataError(f"weights folder {root} does not exist: pass --weights DIR with one file per model")
    names = dict.fromkeys([name, name.split(".")[0]])
    cands = [root / f"{n}{s}" for n in names for s in WEIGHT_SUFFIXES]
    cands += [root / n / f for n in names for f in ("model.safetensors", "pytorch_model.bin")]
    for c in cands:
        if c.is_file():
            return c
    raise DataError(f"no weights for {name} in {root}: expected {cands[0].name} (or .pth / .pt / .bin, or "
                    f"{name}/model.safetensors); download them once with timm on a machine with internet access")


def reproduce(protocol: Protocol, imagenet: "str | Path", weights: "str | Path", models: Optional[Sequence[str]] = None,
              recipes: Optional[Sequence[str]] = None, bits: Optional[Sequence[str]] = None,
              eval_size: Optional[int] = None, calib_size: Optional[int] = None, calib_data: Optional[str] = None,
              seeds: Sequence[int] = (0,), iters: Optional[int] = None, batch_size: int = 64, device: Any = None,
              workers: int = 0, progress: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Run the protocol (or the chosen part of it); one row per model x bits x recipe over the seeds: a run
    record (:mod:`vitq.run.record`) with the paper's numbers beside it."""
    from .data import DataSpec, make_loader
    from .devices import resolve
    from .evaluate import evaluate
    from .models import load_model
    from .recipes import edit_recipe
    from .run import inputs
    from .run.execute import calibration_samples, trial
    from .run.record import make_record

    dev = resolve(device)
    chosen_models = _pick(protocol.models, models, lambda m: (m.label, m.timm), "models")
    chosen_recipes = _pick(protocol.recipes, recipes, lambda r: (r[0],), "recipes")
    chosen_bits = _pick(protocol.bits, [str(Bits.parse(b)) for b in bits] if bits else None, lambda b: (b,), "bits")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed {' '.join(map(str, seeds))}: a seed is given twice: give each seed once")
    files = {m.label: find_weights(weights, m.timm) for m in chosen_models}  # every file checked before any work
    root = Path(imagenet)
    if not root.is_dir():
        raise DataError(f"ImageNet folder {root} does not exist: pass --imagenet DIR with train/ and val/ (or val/ "
                        "and --calib-data)")
    edited = {(r, b): edit_recipe(r, b, sets={"iters": iters} if iters else None)[0]
              for r, _ in chosen_recipes for b in chosen_bits}  # bad edits fail before any model is loaded
    rows: list[dict[str, Any]] = []
    for pm in chosen_models:
        model, _ = load_model(pm.timm, checkpoint=str(files[pm.label]))
        model = model.to(dev)
        choice = inputs.DataChoice(DataSpec.parse(str(root)))
        pre = inputs.preprocessing(model, choice)
        loader = inputs.eval_loader(model, choice, pre, eval_size, batch_size, workers, shard=True)
        fp = evaluate(model, loader, progress=progress, desc=f"{pm.label} fp", sharded=distributed.active())
        source = inputs.calibration_source(choice, pre, calib_data)
        log(f"{pm.label} ({pm.timm}, {files[pm.label].name}): FP top-1 {fp['top1']:.2f}"
            + ("" if pm.fp is None else f" (published {pm.fp:.2f})") + f" on {fp['n']} images")
        for b in chosen_bits:
            for recipe_name, method in chosen_recipes:
                recipe = edited[(recipe_name, b)]
                sets, n_cal, _ = calibration_samples(source, calib_size or recipe.calib_size, seeds, lambda _: None,
                                                     ceiling=False)
                trials = [trial(model, recipe, b, make_loader(sets[seed], batch_size=min(batch_size, n_cal),
                                                              num_workers=workers), seed, loader,
                                batch_size=batch_size, device=dev, progress=progress, sharded=distributed.active(),
                                desc=f"{pm.label} {recipe_name} {b}", keep_model=False) for seed in seeds]
                row = make_record(trials, fp, recipe.name, b, model=pm.timm)
                paper = protocol.paper(method, b, pm.label)
                row.update({"protocol": protocol.name, "label": pm.label, "timm": pm.timm, "recipe": recipe_name,
                            "method": method, "paper_top1": paper,
                            "paper_diff": None if paper is None else round(row["q_top1"] - paper, 2),
                            "paper_fp_top1": pm.fp,
                            "context": {m: protocol.paper(m, b, pm.label) for m in protocol.others()
                                        if protocol.paper(m, b, pm.label) is not None}})
                rows.append(row)
                ours = row["q_top1"]
                log(f"  {b} {recipe_name:<10} {ours:6.2f}" + ("" if paper is None else f"   {method} {paper:.2f} "
                                                               f"({ours - paper:+.2f})"))
    return rows


def render(rows: Sequence[dict[str, Any]], protocol: Protocol) -> str:
    """A markdown table: ours beside the papers' numbers, per bits, plus the context rows."""
    lines = [f"# vitq reproduce {protocol.name}", "", protocol.description, "", f"Reported numbers: {protocol.source}", ""]
    for b in dict.fromkeys(r["bits"] for r in rows):
        mine = [r for r in rows if r["bits"] == b]
        models = list(dict.fromkeys(r["label"] for r in mine))
        lines += [f"## {b}", "", "| recipe (vs paper row) | " + " | ".join(models) + " |",
                  "|---|" + "---:|" * len(models)]
        fp = {r["label"]: r for r in mine}
        lines.append("| FP (ours / published) | " + " | ".join(
            f"{fp[m]['fp_top1']:.2f} / {fp[m]['paper_fp_top1'] if fp[m]['paper_fp_top1'] is not None else '-'}"
            for m in models) + " |")
        for recipe in dict.fromkeys(r["recipe"] for r in mine):
            cells = []
            for m in models:
                r = next((x for x in mine if x["recipe"] == recipe and x["label"] == m), None)
                if r is None:
                    cells.append("")
                elif r["paper_top1"] is None:
                    cells.append(f"{r['q_top1']:.2f} / -")
                else:
                    cells.append(f"{r['q_top1']:.2f} / {r['paper_top1']:.2f} ({r['paper_diff']:+.2f})")
            method = next(x["method"] for x in mine if x["recipe"] == recipe)
            lines.append(f"| {recipe} ({method}) | " + " | ".join(cells) + " |")
        for other in protocol.others():
            vals = [protocol.paper(other, b, m) for m in models]
            if any(v is not None for v in vals):
                lines.append(f"| *{other}* | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


__all__ = ["PROTOCOL_DIR", "Protocol", "ProtocolModel", "find_weights", "list_protocols", "load_protocol", "render",
           "reproduce"]
