"""``vitq compare MODEL --recipes a,b,c --bits W4A4,W3A3 --seeds 0,1,2``: every recipe at every
bit-width and seed on one model, in one table.

The float model is evaluated once; each seed's calibration images are decoded once and shared by
every recipe and bit-width; the evaluation images are decoded once where they fit in memory. Each
row is a run record (:mod:`vitq.run.record`: mean +- std of the quantized top-1 over the seeds, the
pooled test against FP, seconds, peak RSS, the manifest digest - equal digests: the same sites
quantized the same way) plus ``vs_first``, the pooled test of the row against the first recipe at the
same bits (the seeds share the test images: :func:`vitq.evaluate.compare_pooled`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..batches import batch_images, batch_labels
from ..bits import Bits
from ..devices import model_device, resolve
from ..errors import ConfigError
from ..evaluate import Predictions, compare_paired, compare_pooled, evaluate
from ..pipeline import CalibData, calibration_tensor, refuse_quantized
from ..recipes import Recipe, edit_recipe, load_recipe, set_pass_options, split_pass_options
from . import inputs
from .execute import bank_loader, calibration_samples, features_evaluator, trial
from .record import make_record
from .spec import RunSpec

CACHE_BYTES = 1 << 30  # evaluation images kept decoded in memory up to this size
CalibSource = Callable[[int, int], CalibData]  # (number of images, seed) -> calibration data


def cache_batches(loader: Iterable[Any], max_bytes: int = CACHE_BYTES) -> Any:
    """The batches of ``loader`` as a list of ``(images, labels)`` (decoded once), or ``loader`` itself
    when they would take more than ``max_bytes``."""
    out: list[tuple[Tensor, Tensor]] = []
    size = 0
    for b in loader:
        x, y = batch_images(b), batch_labels(b)
        size += x.numel() * x.element_size()
        if size > max_bytes:
            return loader
        out.append((x, torch.as_tensor(y)))
    return out


def compare(model: nn.Module, eval_data: Iterable[Any], calib: "Mapping[int, CalibData] | CalibSource",
            recipes: Sequence["str | Recipe"], bits: Sequence["str | Bits"], batch_size: int = 64,
            device: Optional[torch.device] = None, target: Optional[str] = None,
            progress: bool = False, seeds: Optional[Sequence[int]] = None, model_name: Optional[str] = None,
            knn_bank: Optional[Iterable[Any]] = None) -> dict[str, Any]:
    """Quantize a copy of ``model`` with every recipe x bits x seed and evaluate it on ``eval_data``
    (``(images, labels)`` batches). ``calib``: seed -> calibration data (every recipe calibrates on
    it), or a function ``(n_images, seed) -> data`` with ``seeds`` (each recipe gets its own
    ``calib_size``). ``knn_bank``: ``model`` is an encoder, evaluated by k-NN against its own embeddings of these
    labelled batches, and by its embeddings' agreement with the float model's. Returns ``{"fp": {...}, "rows":
    [...], "runs": [...]}``; rows are run records in recipe order within each bit-width."""
    if callable(calib):
        if not seeds:
            raise ConfigError("compare with a calibration source needs seeds")
        source: CalibSource = calib
    else:
        fixed = dict(calib)
        seeds = list(fixed)
        source = lambda n, s: fixed[s]  # noqa: E731
    if not recipes or not bits or not seeds:
        raise ConfigError("compare needs at least one recipe, one bit-width and one seed")
    recipes_l = [load_recipe(r) for r in recipes]
    names = [r.name for r in recipes_l]
    if len(set(names)) != len(names):
        raise ConfigError(f"recipe given twice in {', '.join(names)}: list each once")
    bits_l = [Bits.parse(b) for b in bits]
    if len(set(map(str, bits_l))) != len(bits_l):
        raise ConfigError(f"bit-width given twice in {', '.join(map(str, bits_l))}: list each once")
    seeds = list(seeds)
    device = device if device is not None else model_device(model)
    data = cache_batches(eval_data)
    edited = {(r.name, str(b)): edit_recipe(r, b, target=target)[0] for r in recipes_l for b in bits_l}
    sizes = {r.calib_size for r in edited.values()}  # a recipe's size may follow the width (when)
    calib_t = {(n, s): calibration_tensor(source(n, s)) for n in sizes for s in seeds}
    evaluator = None
    if knn_bank is not None:
        bank = cache_batches(knn_bank)
        fp = features_evaluator(data, bank, progress)(model, "eval fp")
        evaluator = features_evaluator(data, bank, reference=fp)
    else:
        fp = evaluate(model, data, progress=progress, desc="eval fp")
    runs: list[dict[str, Any]] = []
    preds: dict[tuple[str, str, int], Predictions] = {}
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(recipes_l) * len(bits_l) * len(seeds), desc="compare", unit="run")
    for b in bits_l:
        for r in recipes_l:
            rr = edited[(r.name, str(b))]
            trials = []
            for s in seeds:
                t = trial(model, rr, b, calib_t[(rr.calib_size, s)], s, data, batch_size=batch_size, device=device,
                          desc=f"eval {r.name} {b} seed {s}", keep_model=False, evaluator=evaluator)
                trials.append(t)
                preds[(r.name, str(b), s)] = t.res["predictions"]
                runs.append({"recipe": r.name, "bits": str(b), "seed": s, "calib_size": t.calib_size,
                             "top1": round(t.res["top1"], 3), "nll": None if t.res["nll"] is None else round(t.res["nll"], 5),
                             "calib_seconds": round(t.calib_seconds, 2), "peak_rss_mb": round(t.peak_rss_mb, 1),
                             "digest": t.digest})
                if bar is not None:
                    bar.update(1)
            rows.append({**make_record(trials, fp, r.name, str(b), model=model_name), "recipe_run": rr.name})
    if bar is not None:
        bar.close()
    for row in rows:
        first = names[0]
        row["vs_first"] = None if row["recipe"] == first else compare_pooled(
            [(preds[(first, row["bits"], s)], preds[(row["recipe"], row["bits"], s)]) for s in seeds])
    rows.sort(key=lambda x: ([str(b) for b in bits_l].index(x["bits"]), names.index(x["recipe"])))
    return {"fp": {"top1": round(fp["top1"], 3), "nll": None if fp["nll"] is None else round(fp["nll"], 5),
                   "images": fp["n"]},
            "recipes": names, "bits": [str(b) for b in bits_l], "seeds": seeds, "target": target,
            "rows": rows, "runs": runs}


def compare_spec(spec: RunSpec, recipes: Sequence[str], bits: Sequence[str], options: Optional[Mapping[str, Any]] = None,
                 say: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """``vitq compare MODEL --recipes ... --bits ...``: ``spec`` names the model, data, calibration (size, data,
    seeds), device and target; ``options`` are pass options given once for every recipe (each recipe takes those
    its passes have). Every recipe at every width is checked as its own :class:`RunSpec` before anything is
    loaded; the model and data are loaded once and :func:`compare` runs the grid. The result also names the data
    (``data``, ``data_origin``) and the calibration sizes drawn (``calib_sizes``)."""
    say = say or (lambda line: None)
    per = split_pass_options([load_recipe(n) for n in recipes], dict(options or {}))
    for i, n in enumerate(recipes):  # every run of the grid is a valid spec: one set of rules
        for b in bits:
            replace(spec, recipe=n, bits=b, options=tuple(sorted(per[i].items())))
    edited = [set_pass_options(load_recipe(n), per[i]) for i, n in enumerate(recipes)]
    if spec.calib_size is not None:  # one size for all: every recipe calibrates on the same images
        edited = [r.with_calib_size(spec.calib_size) for r in edited]
    o = inputs.open_spec(spec)
    refuse_quantized(o.model, spec.model)
    source = inputs.calibration_source(o.choice, o.pre, spec.calib_data, o.loader.dataset)
    sizes = sorted({r.at(b).calib_size for r in edited for b in bits})  # a size may follow the width (when)
    samples = {n: calibration_samples(source, n, spec.seeds, say, ceiling=spec.calib_size is None)[0] for n in sizes}
    features = inputs.task_of(o.model, spec.task, spec.knn_bank) == "features"
    res = compare(o.model, o.loader, lambda n, s: samples[n][s], edited, bits, batch_size=spec.batch_size,
                  device=resolve(spec.device), target=spec.effective_target, progress=spec.progress,
                  seeds=list(spec.seeds), model_name=spec.model,
                  knn_bank=bank_loader(spec, o.choice, o.pre) if features else None)
    return {"model": spec.model, "data": str(o.choice.spec), "data_origin": o.choice.origin,
            "calib_sizes": [len(next(iter(samples[n].values()))) for n in sizes], **res}


def compare_models(a: RunSpec, b: RunSpec, progress: bool = False) -> dict[str, Any]:
    """``vitq compare A B``: two models on the same images, the paired comparison. Without ``data`` both are
    evaluated on A's data (given, recorded by A's run folder, or a reference model's), and B must have recorded
    the same data or none; both must preprocess images alike. Returns ``{"a", "b"}`` (``evaluate``'s results),
    ``"comparison"`` (:class:`~vitq.evaluate.PairedComparison`) and the data ``"choice"``."""
    oa = inputs.open_spec(a)
    ob = inputs.open_spec(b, data=a.data if a.data is not None else str(oa.choice.spec))
    rb = inputs.recorded(ob.model)
    if a.data is None and rb is not None and rb.get("data") and str(rb["data"]) != str(oa.choice.spec):
        raise ConfigError(f"{a.model} was run on {oa.choice.spec} and {b.model} on {rb['data']}: pass --data to "
                          "compare them on the same images")
    if oa.pre.config != ob.pre.config:
        raise ConfigError(f"{a.model} and {b.model} preprocess images differently ({oa.pre.config} vs "
                          f"{ob.pre.config}): compare quantized versions of the same float model")
    ra = evaluate(oa.model, oa.loader, progress=progress, desc="eval A")
    rb_ = evaluate(ob.model, ob.loader, progress=progress, desc="eval B")
    return {"a": ra, "b": rb_, "comparison": compare_paired(ra["predictions"], rb_["predictions"]), "choice": oa.choice}


# ------------------------------------------------------------------------------------- rendering
def _pm(row: dict[str, Any]) -> str:
    return f"{row['q_top1']:.2f}" + ("" if row["q_top1_std"] is None else f" ± {row['q_top1_std']:.2f}")


def _vs(row: dict[str, Any]) -> str:
    v = row["vs_first"]
    if v is None:
        return "(reference)"
    p = "" if v["p_value"] is None else f" (p {v['p_value']:.3g})"
    return f"{v['diff']:+.2f}{p}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    first = result["recipes"][0]
    head = ["recipe", "bits", "calib", "FP top-1", f"top-1 (mean ± std, {len(result['seeds'])} seeds)", "drop",
            f"vs {first} (pooled p)", "log-loss", "calib s", "peak RSS MB", "manifest"]
    body = []
    for r in result["rows"]:
        body.append([r["recipe"], r["bits"], str(r["calib_size"]), f"{result['fp']['top1']:.2f}", _pm(r), f"{r['drop']:+.2f}", _vs(r),
                     "-" if r["q_nll"] is None else f"{r['q_nll']:.4f}", f"{r['calib_seconds']:.1f}",
                     f"{r['peak_rss_mb']:.0f}", r["digest"]])
    return head, body


def to_markdown(result: dict[str, Any]) -> str:
    head, body = table_rows(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def to_text(result: dict[str, Any]) -> str:
    head, body = table_rows(result)
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * x for x in w), *map(fmt, body)]) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["recipe", "bits", "seeds", "calib_size", "fp_top1", "top1_mean", "top1_std", "drop", "vs_first_diff", "vs_first_p",
                "nll", "calib_seconds", "peak_rss_mb", "manifest_digest", "top1_per_seed"])
    for r in result["rows"]:
        v = r["vs_first"] or {}
        w.writerow([r["recipe"], r["bits"], " ".join(map(str, r["seeds"])), r["calib_size"], result["fp"]["top1"], r["q_top1"],
                     "" if r["q_top1_std"] is None else r["q_top1_std"], r["drop"], v.get("diff", ""),
                     "" if v.get("p_value") is None else v["p_value"], "" if r["q_nll"] is None else r["q_nll"],
                     r["calib_seconds"], r["peak_rss_mb"], r["digest"], " ".join(str(x["q_top1"]) for x in r["per_seed"])])
    return buf.getvalue()


def plot(result: dict[str, Any], path: str) -> None:
    """Top-1 against bit-width, one line per recipe, +- std over seeds, the float model dashed."""
    from ..insight.report import pyplot

    plt = pyplot()
    bits = result["bits"]
    order = sorted(range(len(bits)), key=lambda i: (Bits.parse(bits[i]).w + Bits.parse(bits[i]).a,
                                                    Bits.parse(bits[i]).w))
    xs = list(range(len(order)))
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(xs) + 0.02 * len(result["recipes"]), 4.2))
    n = len(result["recipes"])
    for k, name in enumerate(result["recipes"]):
        rows = {r["bits"]: r for r in result["rows"] if r["recipe"] == name}
        ys = [rows[bits[i]]["q_top1"] for i in order]
        es = [rows[bits[i]]["q_top1_std"] or 0.0 for i in order]
        off = (k - (n - 1) / 2) * 0.06  # a small horizontal offset so error bars do not overlap
        ax.errorbar([x + off for x in xs], ys, yerr=es, marker="o", capsize=3, lw=1.4, ms=4, label=name)
    ax.axhline(result["fp"]["top1"], color="k", ls="--", lw=1, label=f"float {result['fp']['top1']:.2f}")
    ax.set_xticks(xs)
    ax.set_xticklabels([bits[i] for i in order])
    ax.set_ylabel("top-1 %")
    ax.set_title(f"mean ± std over {len(result['seeds'])} seed(s), {result['fp']['images']} images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
