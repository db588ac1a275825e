"""The benchmark suite's shared plumbing: reference models and data, rows, and the one report writer.

Every benchmark is a module run from the repository root as ``python -m bench.NAME`` (one-off studies:
``python -m bench.studies.NAME``). A benchmark row is a run record (``vitq.run.record``: the format of ``vitq quantize
--json``) of one run of the library's run layer (``vitq.run.compare``, ``vitq.run.trial``) on a fresh copy of a
reference model, calibrated on a seeded sample of the Fashion-MNIST train split and evaluated on its test split.
Results are written only through this module:

* :func:`save_rows` merges rows into ``bench/results/NAME.json`` keyed by their identity (under a lock,
  atomically; several processes may share a file, and an interrupted benchmark continues where it
  stopped), stamping each newly measured row with the machine;
* :func:`md_table` and :func:`write_md` render the Markdown next to it (atomically), and
  :func:`machine_line` names the host, its ISA, torch and the threads the figures were measured with;
* :func:`pyplot` is matplotlib's headless pyplot (the ``report`` extra) for the PNGs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]

from vitq.bits import Bits  # noqa: E402
from vitq.data import (  # noqa: E402
    DataSpec,
    Preprocess,
    build_dataset,
    calibration_subset,
    eval_subset,
    make_loader,
    stack_images,
)
from vitq.defaults import DEFAULT_KNN_BANK  # noqa: E402
from vitq.evaluate import evaluate, peak_rss_mb, reset_peak_rss  # noqa: E402
from vitq.features import agreement, evaluate_features  # noqa: E402
from vitq.models import data_config  # noqa: E402
from vitq.pipeline import Context, run_passes, run_recipe  # noqa: E402
from vitq.recipes import list_recipes, load_recipe, override_pass_options  # noqa: E402
from vitq.reference import load_reference, weights_path  # noqa: E402
from vitq.run import Trial, make_record, trial  # noqa: E402
from vitq.run.compare import cache_batches  # noqa: E402
from vitq.run.inputs import task_of  # noqa: E402
from vitq.state import state_of  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = ["fmnist-vit", "fmnist-vit-outlier", "fmnist-deit", "fmnist-deit-outlier", "fmnist-swin", "fmnist-swin-outlier"]
log = logging.getLogger("bench")
#: experimental compositions (bench/recipes/NAME.yaml): measured by the benches, not shipped with the package
BENCH_RECIPES = ROOT / "bench" / "recipes"


def bench_recipe(name: str) -> Optional[str]:
    """``bench/recipes/NAME.yaml`` as a recipe source for ``load_recipe``, or None when NAME is not one."""
    p = BENCH_RECIPES / f"{name}.yaml"
    return str(p) if p.is_file() else None


def setup(threads: int = 1) -> None:
    # tiny models are op-overhead bound: on the shared 2-core box a second intra-op thread only spins
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("vitq.passes", "vitq.pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """(usable, missing) reference models: weights present and training finished."""
    ok, missing = [], []
    for n in names:
        base = n.removesuffix("-outlier")
        if not weights_path(base).is_file():
            missing.append(n)
            continue
        try:
            load_reference(n)
            ok.append(n)
        except Exception as e:  # still training, or no outlier scales yet
            log.warning("skipping %s: %s", n, e)
            missing.append(n)
    return ok, missing


class FashionData:
    """Fashion-MNIST as one reference model sees it (its own preprocessing): the train split, from which
    ``calib(n)`` draws the seeded calibration sample (memoised per size), and the first ``eval_size``
    test images (all 10 000 when None) as ``eval_loader`` or, for benches that compare logits, as
    tensors (``eval_tensors()``). Shared by the benches that quantize whole reference models (recon*,
    granularity, significance, aocq, dopq, run_bench, fqvit_collapse)."""

    def __init__(self, model: torch.nn.Module, eval_size: Optional[int] = None, seed: int = 0,
                 eval_batch_size: int = 256) -> None:
        pre = Preprocess(data_config(model))
        spec = DataSpec.parse("fashion-mnist")
        self.train = build_dataset(spec, "train", pre)
        self.eval_set = eval_subset(build_dataset(spec, "eval", pre), eval_size)
        self.eval_loader = make_loader(self.eval_set, batch_size=eval_batch_size)
        self.seed = seed
        self._calib: dict[int, torch.Tensor] = {}
        self._eval: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def calib(self, n: int) -> torch.Tensor:
        if n not in self._calib:
            self._calib[n] = stack_images(calibration_subset(self.train, n, self.seed))[0]
        return self._calib[n]

    def eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eval is None:
            self._eval = stack_images(self.eval_set)
        return self._eval


class Judge:
    """How a bench that evaluates outside ``vitq.run`` scores one reference model: top-1 of its head, or (an
    encoder) k-NN top-1 with the model's own embeddings of 10 000 train images as the bank (``vitq eval``'s
    protocol); with a ``reference`` result also the embeddings' agreement with it (``emb_cosine_mean`` /
    ``emb_cosine_p5`` / ``emb_sqnr_db``). ``versus``: an export's embeddings against the simulated model's."""

    def __init__(self, model: Any, data: FashionData) -> None:
        self.data = data
        self.encoder = task_of(model) == "features"
        self.bank = cache_batches(make_loader(calibration_subset(data.train, min(DEFAULT_KNN_BANK, len(data.train)), 0),
                                             batch_size=256)) if self.encoder else None

    def __call__(self, model: Any, reference: "dict[str, Any] | None" = None) -> dict[str, Any]:
        if self.bank is not None:
            return evaluate_features(model, self.data.eval_loader, self.bank, reference=reference)
        return evaluate(model, self.data.eval_loader)

    def versus(self, sim: dict[str, Any], res: dict[str, Any], key: str) -> dict[str, Any]:
        """An export's embeddings against the simulated model's (encoders only)."""
        if not self.encoder:
            return {}
        a = agreement(sim["features"], res["features"])
        return {f"{key}_cos_mean": a["emb_cosine_mean"], f"{key}_cos_p5": a["emb_cosine_p5"]}


class Data:
    """One calibration sample (tensor ``calib``) and the evaluation loader of one reference model."""

    def __init__(self, model: torch.nn.Module, calib_size: int = 1024, eval_size: Optional[int] = None,
                 seed: int = 0, batch_size: int = 256) -> None:
        fd = FashionData(model, eval_size, seed, eval_batch_size=batch_size)
        self.calib = fd.calib(calib_size)
        self.eval_loader = fd.eval_loader


def quantize_row(name: str, model: torch.nn.Module, data: Data, recipe: str, bits: str,
                 overrides: Optional[dict[str, Any]] = None, seed: int = 0,
                 extra: Optional[Callable[[torch.nn.Module], dict[str, Any]]] = None,
                 fp: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Quantize a copy of ``model`` with ``recipe`` at ``bits`` and evaluate it: one run record
    (:mod:`vitq.run.record`, the format of ``vitq quantize --json``) with the bench's fields beside it. With ``fp``
    (the float model's ``evaluate`` on ``data.eval_loader``) the record holds ``fp_top1``, ``drop`` and ``vs_fp``,
    the paired comparison quantized - FP on the same images (its 95 % interval is the test set's sampling error of
    the drop; it says nothing of another calibration seed)."""
    r = scaled_recipe(recipe, overrides, bits)
    t = trial(model, r, bits, data.calib, seed, data.eval_loader, batch_size=64)
    row = bench_record(name, t, fp, r.name, bits, overrides)
    if extra is not None:
        row.update(extra(t.model))
    return row


def bench_record(name: str, t: Trial, fp: Optional[dict[str, Any]], recipe: str, bits: str,
                 overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A run record of one trial, with the bench's fields: the overrides, and the reconstruction's slicing,
    units and iterations."""
    st = None if t.model is None else state_of(t.model)
    rec = (st.reconstruction if st is not None else None) or []
    row = make_record([t], fp, recipe, bits, model=name)
    row.update({"overrides": overrides or {},
                "slicing": rec[-1]["slicing"] if rec else None,
                "blocks_per_unit": rec[-1]["blocks_per_unit"] if rec else None,
                "units": rec[-1]["units"] if rec else None,
                "iters": rec[-1]["config"]["iters"] if rec else 0,
                "oas": rec[-1].get("oas") if rec else None})
    return row


def fp_top1(model: torch.nn.Module, data: Data) -> float:
    return round(evaluate(model, data.eval_loader)["top1"], 2)


def load_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_file():
        return list(json.loads(path.read_text()).get("rows", []))
    return []


ROW_KEY = ("part", "model", "bits", "recipe", "slicing", "mode", "iters", "lr_scale")


def _key(r: dict[str, Any], key: Sequence[str] = ROW_KEY) -> str:
    return json.dumps([r.get(k) for k in key])


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s ``.lock`` sibling: benchmark processes that read, merge and
    rewrite one results or cache file take it so that none loses another's update."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_rows(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any], key: Sequence[str] = ROW_KEY,
              sort: bool = False, indent: int = 2) -> None:
    """Merge ``rows`` into the file (several benchmark processes may share it), under a lock; a row
    replaces the file's row with the same ``key`` fields; ``sort`` orders the rows by those fields.

    A row this process measured (no ``machine`` field yet, and its key is new to the file or its top-1
    differs from the file's row) is stamped with this machine (:func:`machine_meta`'s ``machine`` and ``cpu_capability``); rows
    passed back unchanged keep whatever they had, so re-rendering cached rows on another host does not
    claim them. The file's meta names the machine of the latest process that measured a row."""
    here = machine_meta()
    with file_lock(path):
        old_meta: dict[str, Any] = {}
        merged: dict[str, dict[str, Any]] = {}
        if path.is_file():
            d = json.loads(path.read_text())
            old_meta = d.get("meta", {})
            merged = {_key(r, key): r for r in d.get("rows", [])}
        measured = 0
        for r in rows:
            old = merged.get(_key(r, key))
            if "machine" not in r and (old is None or old.get("q_top1") != r.get("q_top1")):
                r.update(machine=here["machine"], cpu_capability=here["cpu_capability"])
                measured += 1
        merged.update({_key(r, key): r for r in rows})
        out = sorted(merged.values(), key=lambda r: [str(r.get(k)) for k in key]) if sort else list(merged.values())
        if "missing_models" in old_meta and "missing_models" in meta:  # missing = missing in every process
            meta = {**meta, "missing_models": sorted(set(old_meta["missing_models"]) & set(meta["missing_models"]))}
        meta = {**old_meta, **meta, **(here if measured or not old_meta else {})}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": out}, indent=indent) + "\n")
        tmp.replace(path)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table as lines; ``align`` is one letter per column, ``l`` or ``r`` (default: the first
    column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError(f"md_table: {len(headers)} headers, align {align!r}, row lengths {sorted({len(r) for r in rows})}")
    return ["| " + " | ".join(map(str, headers)) + " |",
            "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows)]


def machine_line(meta: dict[str, Any]) -> str:
    """``Machine: ...`` for a results page, from :func:`machine_meta`'s fields."""
    isa = f" ({meta['cpu_capability']})" if meta.get("cpu_capability") else ""
    return f"Machine: {meta.get('machine', 'unknown')}{isa}, torch {meta.get('torch', '?')}, {meta.get('threads', '?')} thread(s)."


def write_md(path: Path, text: "str | Sequence[str]", echo: bool = False) -> None:
    """Write a results page atomically (temporary file + rename); lines are joined with newlines."""
    body = text if isinstance(text, str) else "\n".join(text)
    body = body if body.endswith("\n") else body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body)
    tmp.replace(path)
    if echo:
        print(body, end="")


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write a results file atomically (temporary file + rename), ending in a newline."""
    write_md(path, json.dumps(obj, indent=indent))


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (the ``report`` extra)."""
    from vitq.insight.report import pyplot as _pyplot

    return _pyplot()


def machine_meta() -> dict[str, Any]:
    """Where a row was measured. Reconstruction runs are bit-reproducible on one machine but not across
    CPUs (different SIMD paths round differently and 100+ optimizer steps amplify it), so record the CPU."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": f"{platform.machine()} {cpu}".strip(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def has_recipe(name: str) -> bool:
    return name in list_recipes()


def calibrate_once(model: torch.nn.Module, recipe: str, bits: str, data: Data,
                   seed: int = 0) -> tuple[torch.nn.Module, float, float]:
    """Prepare + the recipe's leading ``calibrate`` pass only: (model, seconds, peak RSS MB). Rows that
    share a recipe's quantizer set-up start from a deep copy of this and add these seconds."""
    from dataclasses import replace

    r = load_recipe(recipe)
    if not r.passes or r.passes[0].name != "calibrate":
        raise ValueError(f"recipe {recipe} does not start with a calibrate pass")
    reset_peak_rss()
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    run_recipe(q, replace(r, passes=r.passes[:1]), Context(calib=data.calib, bits=Bits.parse(bits), seed=seed,
                                                           batch_size=64))
    return q, time.perf_counter() - t0, peak_rss_mb()


def run_rest(calibrated: torch.nn.Module, recipe: str, bits: str, data: Data, overrides: Optional[dict[str, Any]] = None,
             seed: int = 0) -> tuple[torch.nn.Module, float, float]:
    """The recipe's passes after ``calibrate`` on a deep copy of ``calibrated``: (model, seconds, peak RSS MB)."""
    r = scaled_recipe(recipe, overrides, bits)
    reset_peak_rss()
    q = copy.deepcopy(calibrated)
    ctx = Context(calib=data.calib, bits=Bits.parse(bits), seed=seed, batch_size=64)
    t0 = time.perf_counter()
    run_passes(q, r.passes[1:], ctx)
    return q, time.perf_counter() - t0, peak_rss_mb()


def same_setup(a: str, b: str) -> bool:
    """Do two recipes insert and calibrate the same quantizers (so one calibration serves both)?"""
    ra, rb = load_recipe(a), load_recipe(b)
    return (ra.rules == rb.rules and ra.overrides == rb.overrides and ra.passes[:1] == rb.passes[:1]
            and ra.calib_size == rb.calib_size)


LR_OPTIONS = ("lr_round", "lr_act", "lr_weight")
#: the oas recipe with short-run validation by the plain smallest-KL rule, as the benches ran it before
#: the guard existed (every candidate 50 iterations per unit, KL of the logits on 128 held-out images)
OAS_VALIDATE: dict[str, Any] = {"select": "validate", "val_iters": 50, "val_images": 128, "prefer": None}
#: what the benches' rows named ``oas`` / ``oas-repq`` measure: selection by the outlier proxy, the
#: recipes' default until 2026-11-28 (bench/studies/oas_guard.py measures the guarded validation, the default now)
OAS_BENCH_SELECT: dict[str, Any] = {"select": "proxy"}


def scaled_recipe(recipe: str, overrides: Optional[dict[str, Any]] = None, bits: Optional[str] = None) -> Any:
    """``recipe`` with ``overrides`` applied to every pass that has the option; the special key
    ``lr_scale`` multiplies each reconstruction pass's own learning rates (BRECQ's two passes keep
    their ratio), for runs with far fewer iterations than the published 20k. An ``oas`` pass selects
    by the proxy unless the overrides name ``select`` (OAS_BENCH_SELECT), and an explicit
    ``prefer: None`` is kept (the plain validation rule)."""
    from dataclasses import replace

    from vitq.passes import get_pass
    from vitq.recipes import PassConfig, set_pass_options

    ov = dict(overrides or {})
    scale = float(ov.pop("lr_scale", 1.0))
    r = load_recipe(recipe) if bits is None else load_recipe(recipe).at(bits)  # the passes of that width (when)
    if any(pc.name == "oas" for pc in r.passes):
        # keep each bench row measuring the selection rule it was named for (OAS_BENCH_SELECT, OAS_VALIDATE):
        # the recipes' defaults changed on 2026-11-28; ``prefer: None`` (the plain rule) must be set, not skipped
        pinned = {**OAS_BENCH_SELECT, **{k: v for k, v in ov.items() if k in ("select", "prefer")}}
        r = set_pass_options(r, pinned)
        ov = {k: v for k, v in ov.items() if k not in pinned}
    if ov:
        r = override_pass_options(r, **ov)
    if scale != 1.0:
        passes = []
        for pc in r.passes:
            allowed = get_pass(pc.name).options
            opts = dict(pc.options)
            for k in LR_OPTIONS:
                if k in allowed:
                    opts[k] = float(opts.get(k, allowed[k])) * scale
            passes.append(PassConfig.make(pc.name, opts, f"bench recipe {recipe}"))
        r = replace(r, passes=tuple(passes))
    return r
