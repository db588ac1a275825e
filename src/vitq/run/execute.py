"""Executing runs: one seed (:func:`trial`: a fresh copy of the float model, the recipe, the evaluation) and a
whole :class:`~vitq.run.spec.RunSpec` (:func:`run`: model and data, calibration samples, mixed precision, the
float model's evaluation, the seed loop, the record). Every entry point - the CLI, ``vitq compare``,
``vitq reproduce``, ``vitq report``, the benches, Python - quantizes through :func:`quantize_copy` /
:func:`trial` and reports through :func:`vitq.run.record.make_record`.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor, nn

from .. import distributed
from ..adapters import ModelSource, get_adapter
from ..bits import Bits
from ..data import make_loader
from ..defaults import DEFAULT_KNN_BANK
from ..devices import resolve
from ..errors import ConfigError
from ..evaluate import evaluate, peak_rss_mb, reset_peak_rss
from ..passes import get_pass
from ..passes.quantize import manifest
from ..pipeline import CalibData, Context, calibration_tensor, refuse_quantized, run_recipe
from ..recipes import FAST_RECIPE, Recipe
from ..roles import Role
from ..state import state_of
from . import inputs
from .record import Trial, make_record, manifest_digest
from .spec import RunSpec

log = logging.getLogger("vitq.run")
Log = Callable[[str], None]


def float_parts(model: nn.Module) -> list[dict[str, str]]:
    """What the model's adapter keeps float by design (``Adapter.float_parts``), for the run record."""
    return [{"module": n, "why": why} for n, why in get_adapter(model).float_parts(model)]


def calib_count(calib: CalibData) -> int:
    """How many images a calibration set holds (a tensor, a Dataset, a DataLoader over one)."""
    if isinstance(calib, Tensor):
        return int(calib.shape[0])
    ds = getattr(calib, "dataset", calib)
    try:
        return len(ds)  # type: ignore[arg-type]
    except TypeError:
        return -1


def quantize_copy(model: nn.Module, recipe: "Recipe | str", bits: "Bits | str", calib: CalibData, seed: int, *,
                  batch_size: int = 64, device: Any = None, progress: bool = False) -> tuple[nn.Module, float, float]:
    """A quantized deep copy of the float ``model``: ``(copy, calibration seconds, peak RSS MB)``."""
    refuse_quantized(model)
    reset_peak_rss()
    qm = copy.deepcopy(model)
    t0 = time.perf_counter()
    run_recipe(qm, recipe, Context(calib=calib, bits=Bits.parse(bits), seed=seed, batch_size=batch_size, progress=progress,
                                   device=None if device is None else resolve(device)))
    return qm, time.perf_counter() - t0, peak_rss_mb()


Evaluator = Callable[[nn.Module, str], dict[str, Any]]


def trial(model: nn.Module, recipe: "Recipe | str", bits: "Bits | str", calib: CalibData, seed: int,
          eval_data: Iterable[Any], *, batch_size: int = 64, device: Any = None, progress: bool = False,
          sharded: bool = False, desc: Optional[str] = None, keep_model: bool = True,
          evaluator: Optional[Evaluator] = None) -> Trial:
    """One seed: :func:`quantize_copy`, then the copy evaluated on ``eval_data`` (``(images, labels)`` batches), or
    by ``evaluator(model, desc)`` (an encoder's k-NN and embedding agreement: :func:`features_evaluator`)."""
    qm, secs, rss = quantize_copy(model, recipe, bits, calib, seed, batch_size=batch_size, device=device,
                                  progress=progress)
    desc = desc or f"eval quantized (seed {seed})"
    res = evaluator(qm, desc) if evaluator is not None else evaluate(qm, eval_data, progress=progress, desc=desc,
                                                                        sharded=sharded)
    bad = int(res.get("nonfinite") or 0)
    if bad:  # a top-1 of NaN outputs is whatever argmax makes of them: say so rather than report it as an accuracy
        log.warning("%d of %d evaluation images gave NaN / inf outputs from the model quantized with %s at %s, so its "
                    "accuracy here measures nothing: the quantized arithmetic overflows; try wider activations or "
                    "another recipe", bad, res.get("n", 0), getattr(recipe, "name", recipe), bits)
    t = Trial(seed, qm, res, secs, calib_count(calib), max(rss, peak_rss_mb()), manifest_digest(qm))
    if not keep_model:
        t.model = None  # type: ignore[assignment]
    return t


@dataclass
class RunResult:
    """What :func:`run` returns: the record (``vitq quantize --json``), the first seed's quantized model (whose
    state carries the run record a save keeps), every seed's trial, the float model's evaluation, and the
    inputs (model source, data choice, preprocessing, calibration samples)."""

    spec: RunSpec
    record: dict[str, Any]
    model: nn.Module
    trials: list[Trial]
    fp: Optional[dict[str, Any]]
    source: ModelSource
    data: inputs.DataChoice
    recipe: Recipe
    float_model: nn.Module
    eval_loader: Any

    @property
    def top1(self) -> float:
        return float(self.record["q_top1"])


def features_evaluator(eval_data: Iterable[Any], bank_data: Iterable[Any], progress: bool = False,
                       reference: Optional[dict[str, Any]] = None) -> Evaluator:
    """An encoder's evaluation (``task: features``): k-NN top-1 against the model's own embeddings of ``bank_data``,
    and, against ``reference`` (the float model's result), the embeddings' agreement."""
    from ..features import evaluate_features

    return lambda m, desc: evaluate_features(m, eval_data, bank_data, progress=progress, desc=desc, reference=reference)


def bank_loader(spec: RunSpec, choice: inputs.DataChoice, pre: Any) -> Any:
    """An encoder's k-NN memory bank: a seeded sample (seed 0, whatever the calibration seed, so every run of the
    data shares it) of up to ``spec.knn_bank`` labelled images of the data's train split."""
    from ..data import build_dataset, calibration_subset

    if distributed.active():
        raise ConfigError("an encoder's k-NN evaluation under torchrun is not supported yet: run it in one process")
    train: Any = build_dataset(choice.spec, "train", pre)
    return make_loader(calibration_subset(train, min(spec.knn_bank or DEFAULT_KNN_BANK, len(train)), 0), batch_size=spec.batch_size,
                       num_workers=spec.workers)


def evaluate_opened(spec: RunSpec, o: inputs.Opened, desc: str = "eval") -> dict[str, Any]:
    """``vitq eval``: a classifier's top-1 / top-5 / log-loss, or an encoder's k-NN top-1 (``task``)."""
    if inputs.task_of(o.model, spec.task, spec.knn_bank) == "features":
        return features_evaluator(o.loader, bank_loader(spec, o.choice, o.pre), spec.progress)(o.model, desc)
    return evaluate(o.model, o.loader, progress=spec.progress, desc=desc, sharded=distributed.active())


def check_exclusions(patterns: Iterable[str], model: nn.Module) -> None:
    """A module-name ``--exclude`` that matches no module of the model is a typo, not a no-op."""
    roles = {r.value for r in Role}
    names = [n for n, _ in model.named_modules()]
    for p in patterns:
        if p.upper() not in roles and not any(re.search(p, n) for n in names):
            raise ConfigError(f"--exclude {p!r} matches no module of the model (e.g. {names[1] if len(names) > 1 else ''!r}): "
                              "check the pattern, or give a role")


def default_notice(spec: RunSpec) -> Optional[str]:
    """One line when the default recipe (not asked for by name) will reconstruct: what it costs, and the fast one."""
    if not spec.default_recipe:
        return None
    steps = [pc for pc in spec.recipe_obj.passes if "iters" in get_pass(pc.name).options]
    if not steps:
        return None
    iters = max(int(pc.opts.to_dict()["iters"]) for pc in steps)
    return (f"recipe {spec.recipe_obj.name} (the default) at {spec.run_bits}: {len(steps)} reconstruction stage(s) of "
            f"{iters} iterations per block, for the last points of accuracy: minutes on a GPU (--device cuda), tens of "
            f"minutes for a small model and hours for a ViT-B on a CPU; --recipe {FAST_RECIPE} takes seconds")


def calibration_samples(source: inputs.CalibrationSource, size: int, seeds: Sequence[int], say: Log,
                        ceiling: bool = True) -> tuple[dict[int, Any], int, list[str]]:
    """Each seed's calibration sample of ``size`` images, the size drawn and the unreadable files skipped.
    ``ceiling``: ``size`` is the recipe's own (not asked for): a smaller source is used whole."""
    n = size
    whole = ceiling and 0 < len(source) < n
    if whole:
        n = len(source)
    # the recipe's own size is a ceiling: a folder's unreadable files leave fewer images, not an error
    sets = {seed: source.sample(n, seed, at_most=ceiling) for seed in seeds}
    n = min(len(c) for c in sets.values())
    if whole:
        say(f"calibration images: the recipe takes up to {size}, the source has {n}: using all {n} "
            "(--calib-size N to choose)")
    skipped = sorted({f for c in sets.values() for f in getattr(c, "skipped", [])})
    scaled = sorted({f for c in sets.values() for f in getattr(c, "scaled", [])})
    if source.folder is not None:
        say(f"calibration images: {n} of the {len(source)} image files under {source.folder}"
            + (f" ({len(skipped)} unreadable, skipped: {', '.join(s.rsplit('/', 1)[-1] for s in skipped[:3])}"
               f"{', ...' if len(skipped) > 3 else ''})" if skipped else "")
            + (f"; {len(scaled)} of 16 bits per pixel, scaled to 8 bits" if scaled else ""))
    return sets, n, skipped


def quantize_first_seed(spec: RunSpec, opened: inputs.Opened, say: Log) -> tuple[nn.Module, float]:
    """The spec's first seed quantized on a copy of ``opened``'s float model, without an evaluation (what
    ``vitq report`` inspects): ``(quantized copy, calibration seconds)``."""
    seed = spec.seeds[0]
    source = inputs.calibration_source(opened.choice, opened.pre, spec.calib_data, opened.loader.dataset)
    sets, n, _ = calibration_samples(source, spec.calib_size_asked, [seed], say, ceiling=spec.calib_size is None)
    calib = make_loader(sets[seed], batch_size=min(spec.batch_size, n), num_workers=spec.workers)
    q, secs, _ = quantize_copy(opened.model, spec.recipe_obj, spec.run_bits, calib, seed, batch_size=spec.batch_size,
                               device=spec.device, progress=spec.progress)
    return q, secs


def mixed_precision(spec: RunSpec, model: nn.Module, recipe: Recipe, choice: inputs.DataChoice, pre: Any,
                    source: inputs.CalibrationSource, calib: Any, say: Log) -> tuple[Recipe, dict[str, Any]]:
    """``bits=auto``: per-site weight sensitivity on calibration-source images (a draw other than the calibration
    sample; never evaluation images), bits allocated under the budget: the mixed-precision recipe and its record."""
    from ..data import calibration_subset
    from ..insight.mixed import allocate, mixed_recipe, sensitivity_table

    seed = spec.seeds[0]
    n = min(spec.sensitivity_size, len(source))
    probe = calibration_subset(source.dataset, n, seed + 1)
    images = [b[0] if isinstance(b, (list, tuple)) else b for b in make_loader(probe, batch_size=spec.batch_size)]
    table = sensitivity_table(model, recipe, spec.run_bits.a, calibration_tensor(calib), images, seed=seed,
                              batch_size=spec.batch_size, progress=spec.progress)
    alloc = allocate(table, budget_bits=spec.budget, budget_mb=spec.budget_mb)
    mixed = mixed_recipe(recipe, model, alloc)
    counts = Counter(alloc["bits"].values())
    say(f"mixed precision: {len(alloc['bits'])} weight sites, "
        + ", ".join(f"{counts[k]} at {k}{'' if k == 'float' else ' bits'}" for k in ("3", "4", "6", "8", "float")
                    if counts[k])
        + f"; average {alloc['avg_bits']:.2f} bits ({alloc['weight_mb']:.3f} MB of weight codes), chosen by "
          f"{alloc['method']} over output KL measured on {table['images']} calibration-source images")
    return mixed, {"allocation": alloc, "sensitivity": table}


def run(spec: Optional[RunSpec] = None, *, float_model: Optional[nn.Module] = None, say: Optional[Log] = None,
        **fields: Any) -> RunResult:
    """Execute ``spec`` (or ``RunSpec(**fields)``: ``vitq.run(model="fmnist-vit", recipe="repq", bits="W4A4")``):
    load the model (unless ``float_model`` is given: a float model in memory, ``spec.model`` then only names it)
    and its data, draw each seed's calibration sample, choose bits per site for ``auto``, evaluate the float model,
    quantize a copy per seed and evaluate it, and make the record. Under torchrun the evaluation is sharded and
    merged (equal to one process). ``say``: where progress lines go (default: the ``vitq.run`` logger)."""
    if spec is None:
        spec = RunSpec(**fields)
    elif fields:
        raise ConfigError(f"give a RunSpec or its fields, not both ({', '.join(sorted(fields))})")
    say = say or log.info
    if float_model is None:
        model, source = inputs.load(spec.model, spec.checkpoint, spec.trust_pickle, spec.random_weights,
                                    spec.num_classes, spec.device)
    else:
        model = float_model.to(resolve(spec.device))
        st = state_of(model)
        source = st.source if st is not None and st.source is not None else ModelSource("python", type(model).__name__)
    refuse_quantized(model, spec.model)
    check_exclusions(spec.exclude, model)
    for line in spec.target_notes:
        say(f"target {spec.effective_target}: {line}")
    choice = inputs.choose_data(spec.model, model, source, spec.data, spec.input_size, spec.crop_pct, spec.interpolation)
    pre = inputs.preprocessing(model, choice)
    loader = inputs.eval_loader(model, choice, pre, spec.eval_size, spec.batch_size, spec.workers, shard=True)
    csource = inputs.calibration_source(choice, pre, spec.calib_data, loader.dataset)
    sets, calib_size, skipped = calibration_samples(csource, spec.calib_size_asked, spec.seeds, say,
                                                    ceiling=spec.calib_size is None)
    recipe = spec.recipe_obj
    mixed = None
    if spec.auto_bits:
        recipe, mixed = mixed_precision(spec, model, recipe, choice, pre, csource, sets[spec.seeds[0]], say)
    sharded = distributed.active()
    features = inputs.task_of(model, spec.task, spec.knn_bank) == "features"
    evaluator: Optional[Evaluator] = None
    fp: Optional[dict[str, Any]]
    if features:
        bank = bank_loader(spec, choice, pre)
        fp = features_evaluator(loader, bank, spec.progress)(model, "eval fp")
        evaluator = features_evaluator(loader, bank, spec.progress, reference=fp)
        say(f"encoder (no classification head): k-NN top-1 (k 20, cosine, a bank of {fp['bank_size']} train images) "
            "and the embeddings' agreement with the float model")
    else:
        fp = None if spec.skip_fp else evaluate(model, loader, progress=spec.progress, desc="eval fp", sharded=sharded)
    trials = []
    for i, seed in enumerate(spec.seeds):
        calib = make_loader(sets[seed], batch_size=min(spec.batch_size, calib_size), num_workers=spec.workers)
        t = trial(model, recipe, spec.run_bits, calib, seed, loader, batch_size=spec.batch_size, device=spec.device,
                  progress=spec.progress, sharded=sharded, keep_model=i == 0, evaluator=evaluator)
        trials.append(t)
        if len(spec.seeds) > 1:
            say(f"  seed {seed}: quantized top-1 {t.res['top1']:.2f}%  (calib {t.calib_seconds:.1f}s)")
    qmodel = trials[0].model
    record = make_record(trials, fp, recipe.name, str(spec.run_bits), model=spec.model)
    record.update({
        "source": source.to_dict(), "data": str(choice.spec), "data_origin": choice.origin, "device": str(resolve(spec.device)),
        "preprocessing": inputs.preprocessing_record(pre),
        "calib_data": spec.calib_data, "calib_skipped": skipped, "mixed_precision": mixed,
        "fp_eval_seconds": None if fp is None else round(fp["seconds"], 2), "recipe_config": recipe.to_dict(),
        "manifest": manifest(qmodel), "float_parts": float_parts(qmodel)})
    st = state_of(qmodel)
    if st is not None:
        if st.reconstruction:
            record["reconstruction"] = st.reconstruction
        if st.source is None and source.kind != "python":
            st.source = source
        st.run = inputs.record_of(choice, pre, spec.calib_data, calib_size, spec.seeds, sets, spec.to_dict())
    return RunResult(spec, record, qmodel, trials, fp, source, choice, recipe, model, loader)


__all__ = ["Evaluator", "RunResult", "bank_loader", "calib_count", "evaluate_opened", "features_evaluator", "calibration_samples", "check_exclusions", "default_notice", "mixed_precision",
           "quantize_copy", "quantize_first_seed", "refuse_quantized", "run", "trial"]
