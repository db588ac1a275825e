"""``RunSpec``: a run, specified once - built from CLI arguments or Python keywords, validated in its
constructor (one rule per value), recorded with the run's outputs.

Everything the arguments alone can tell is checked here, before any model or data is loaded: sizes,
seeds, bits (``WxAy`` or ``auto`` with its budget), the recipe and its edits (``exclude``, pass options,
``target``), the device, what the outputs need. The edited recipe is built once, here
(:attr:`RunSpec.recipe_obj`), by :func:`vitq.recipes.edit_recipe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from ..bits import Bits, parse_run_bits
from ..defaults import DEFAULT_BITS, DEFAULT_KNN_BANK, DEFAULT_MODEL, KNN_K
from ..devices import resolve
from ..errors import ConfigError
from ..recipes import DEFAULT_RECIPE, Recipe, edit_recipe, parse_assignments

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
TARGETS = ("onnx", "none")
TASKS = ("auto", "classify", "features")
EXPORTS = ("onnx", "openvino", "vitq")
#: pass options the CLI also takes as flags (``--iters N`` is ``--set iters=N``)
FLAG_OPTIONS = {"iters": "--iters", "max_cache_gb": "--max-cache-gb", "run_dir": "--resume-dir"}


def _positive(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{name} {v!r}: give a positive number")


@dataclass(frozen=True)
class RunSpec:
    """One quantization run. ``data=None``: the data a run folder recorded, Fashion-MNIST for a reference
    model, otherwise an error (never another data set than the model's). ``recipe=None``: the default
    recipe (:data:`vitq.recipes.DEFAULT_RECIPE`). ``bits``: ``WxAy`` or ``auto`` / ``autoA4`` with ``budget``
    (average weight bits) or ``budget_mb``. ``options``: pass options of the recipe (``--set``; ``--iters``,
    ``--max-cache-gb`` and ``--resume-dir`` are options too). ``seeds``: one run per calibration seed. ``task``:
    ``classify`` (top-1 of the model's head), ``features`` (an encoder: k-NN top-1 with a bank of ``knn_bank``
    train-split images, and the embeddings' agreement with the float model's), ``auto`` (features for a model
    without a classification head)."""

    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    trust_pickle: bool = False
    random_weights: bool = False
    num_classes: Optional[int] = None
    data: Optional[str] = None
    calib_data: Optional[str] = None
    calib_size: Optional[int] = None
    input_size: Optional[tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    recipe: Optional[str] = None
    bits: str = DEFAULT_BITS
    budget: Optional[float] = None
    budget_mb: Optional[float] = None
    sensitivity_size: int = 512
    exclude: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    target: Optional[str] = None
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"
    workers: int = 0
    batch_size: int = 64
    eval_size: Optional[int] = None
    skip_fp: bool = False
    task: str = "auto"
    knn_bank: Optional[int] = None  # None: DEFAULT_KNN_BANK (given: only with an encoder, checked at load)
    out: Optional[str] = None
    export: Optional[str] = None
    progress: bool = False
    _recipe: Recipe = field(init=False, repr=False, compare=False)
    _notes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        norm = {"exclude": tuple(self.exclude), "seeds": tuple(self.seeds),
                "input_size": None if self.input_size is None else tuple(self.input_size),
                "options": tuple(sorted(dict(self.options).items())) if isinstance(self.options, Mapping)
                else tuple(self.options), "bits": str(self.bits), "device": str(self.device)}
        for k, v in norm.items():
            object.__setattr__(self, k, v)
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a model name, folder or file, got {self.model!r}")
        for name in ("batch_size", "eval_size", "calib_size", "sensitivity_size", "knn_bank"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name), allow_none=name != "batch_size")
        if self.knn_bank is not None and self.knn_bank < KNN_K:
            raise ConfigError(f"--knn-bank {self.knn_bank}: the k-NN votes over the {KNN_K} nearest bank images, so the bank "
                              f"needs at least {KNN_K}: give {KNN_K} or more (default {DEFAULT_KNN_BANK})")
        if self.knn_bank is not None and self.task == "classify":
            raise ConfigError("--knn-bank sizes an encoder's k-NN memory bank and --task classify evaluates the model's "
                              "head: drop --knn-bank, or use --task features")
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"--num-classes {n!r}: give 0 (an encoder, timm's num_classes=0: no head) or more")
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task}: use one of {', '.join(TASKS)} (auto: features for a model without a "
                              "classification head)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers {self.workers!r}: give 0 (decode in the main process) or more worker processes")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"--seed {' '.join(map(str, self.seeds)) or '(none)'}: give one or more whole numbers "
                              "from 0 up")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seed {' '.join(map(str, self.seeds))}: a seed is given twice, so the spread over seeds "
                              "would be over identical runs: give each seed once")
        if self.input_size is not None and (len(self.input_size) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.input_size)):
            raise ConfigError(f"--input-size {self.input_size}: give three positive numbers C H W")
        if self.crop_pct is not None and not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise ConfigError(f"--crop-pct {self.crop_pct}: give a fraction in (0, 1]")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation {self.interpolation}: use one of {', '.join(INTERPOLATIONS)}")
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"--target {self.target}: use one of {', '.join(TARGETS)}")
        if self.export is not None and self.export not in EXPORTS:
            raise ConfigError(f"--export {self.export}: use one of {', '.join(EXPORTS)}")
        if self.export and not self.out:
            raise ConfigError(f"--export {self.export} writes into the --out folder: pass --out DIR")
        if self.out and len(self.seeds) > 1:
            raise ConfigError(f"--out saves one model but {len(self.seeds)} seeds were given: pass a single --seed with --out")
        if self.random_weights:
            from ..reference import is_reference

            if is_reference(self.model):
                raise ConfigError(f"--random-weights builds a timm architecture untrained; {self.model} is a reference "
                                  "model with trained weights: drop --random-weights (or name a timm model)")
        resolve(self.device)  # a missing GPU is one line now
        bits, auto = parse_run_bits(self.bits)
        self._check_budget(auto)
        recipe, notes = edit_recipe(self.recipe or DEFAULT_RECIPE, bits, self.exclude, dict(self.options),
                                    self.effective_target)
        object.__setattr__(self, "_recipe", recipe)
        object.__setattr__(self, "_notes", tuple(notes))

    def _check_budget(self, auto: bool) -> None:
        budgets = [f for f, v in (("--budget", self.budget), ("--budget-mb", self.budget_mb)) if v is not None]
        if not auto:
            if budgets:
                raise ConfigError(f"{budgets[0]} chooses bits per site: pass --bits auto (or autoA4)")
            return
        if len(budgets) != 1:
            raise ConfigError("--bits auto needs one budget: --budget BITS (average weight bits, e.g. 4.5) or --budget-mb MB")
        for flag, v in (("--budget", self.budget), ("--budget-mb", self.budget_mb)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{flag} {v!r}: give a finite number")
        if self.budget is not None and not 3 <= self.budget <= 32:
            raise ConfigError(f"--budget {self.budget}: average weight bits between 3 (all 3-bit) and 32 (all float)")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise ConfigError(f"--budget-mb {self.budget_mb}: give a positive size in megabytes")

    # -- what the spec decides -----------------------------------------------------------------------------
    @property
    def run_bits(self) -> Bits:
        """The bits the recipe runs at (``auto``: 8-bit weights until the per-site choice)."""
        return parse_run_bits(self.bits)[0]

    @property
    def auto_bits(self) -> bool:
        return parse_run_bits(self.bits)[1]

    @property
    def effective_target(self) -> Optional[str]:
        """``target``, or ``onnx`` when the run exports to onnx or OpenVINO (which reads the same graph) and no target
        is named (``None``: none)."""
        t = self.target or ("onnx" if self.export in ("onnx", "openvino") else None)
        return None if t == "none" else t

    @property
    def recipe_obj(self) -> Recipe:
        """The recipe the run executes: named or default, at its width, with its edits."""
        return self._recipe

    @property
    def target_notes(self) -> tuple[str, ...]:
        """One line per change the target made to the recipe."""
        return self._notes

    @property
    def default_recipe(self) -> bool:
        return self.recipe is None

    @property
    def calib_size_asked(self) -> int:
        """The number of calibration images asked for: ``calib_size``, or the recipe's (a ceiling then)."""
        return int(self.calib_size if self.calib_size is not None else self._recipe.calib_size)

    def option(self, key: str) -> Any:
        return dict(self.options).get(key)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON values (recorded with ``--out``, in resume records and result records)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            out[f.name] = dict(v) if f.name == "options" else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"run spec: unknown key(s) {sorted(unknown)}; allowed are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_cli(cls, args: Any, **extra: Any) -> "RunSpec":
        """A spec from an argparse namespace of ``vitq quantize`` / ``report`` / ``eval`` / ``export`` /
        ``compare``: the flags a command does not have take their defaults. ``--iters`` /
        ``--max-cache-gb`` / ``--resume-dir`` are pass options; given also with ``--set`` they are refused."""
        def get(key: str, default: Any = None) -> Any:
            v = getattr(args, key, None)
            return default if v is None else v

        sets = parse_assignments(get("set_options") or [])
        for key, flag in FLAG_OPTIONS.items():
            v = get({"run_dir": "resume_dir"}.get(key, key))
            if v is None:
                continue
            if key in sets:
                raise ConfigError(f"{key} given both as {flag} and with --set: use one of them")
            sets[key] = v
        kw: dict[str, Any] = dict(
            model=get("model", DEFAULT_MODEL), checkpoint=get("checkpoint"), trust_pickle=bool(get("trust_pickle")),
            random_weights=bool(get("random_weights")), num_classes=get("num_classes"), data=get("data"),
            calib_data=get("calib_data"), calib_size=get("calib_size"), input_size=get("input_size"),
            crop_pct=get("crop_pct"), interpolation=get("interpolation"), recipe=get("recipe"),
            bits=get("bits", DEFAULT_BITS), budget=get("budget"), budget_mb=get("budget_mb"),
            sensitivity_size=get("sensitivity_size", 512) if get("command") == "quantize" else 512,
            exclude=tuple(get("exclude") or ()), options=tuple(sorted(sets.items())), target=get("target"),
            seeds=tuple(get("seed", (0,))), device=get("device", "cpu"), workers=get("workers", 0),
            batch_size=get("batch_size", 64), eval_size=get("eval_size"), skip_fp=bool(get("skip_fp")),
            task=get("task", "auto"), knn_bank=get("knn_bank"),
            out=get("out") if get("command") == "quantize" else None, export=get("export"),
            progress=not get("no_progress", False))
        kw.update(extra)
        return cls(**kw)


__all__ = ["DEFAULT_MODEL", "RunSpec"]
