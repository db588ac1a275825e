"""The one result format: a quantization run's figures over its seeds, as ``vitq quantize --json`` writes
them, as every ``vitq compare`` row, every ``vitq reproduce`` row and every bench row carry them.

A record describes one recipe at one bit-width on one model and data, over one or more calibration seeds:

* identity: ``schema``, ``model``, ``recipe``, ``bits``, ``calib_size``, ``eval_size``, ``seeds`` (``seed``:
  the first), ``digest`` (of the first seed's manifest; ``differs by seed`` when they differ);
* figures: ``fp_top1`` / ``fp_nll`` (None without the float model), ``q_top1`` (the mean over seeds),
  ``q_top1_std`` (None for one seed), ``q_top5`` (one seed only), ``q_nll`` (mean), ``drop``;
* tests: ``vs_fp`` (one seed: the paired test against FP, :class:`vitq.evaluate.PairedComparison`),
  ``vs_fp_pooled`` (the mean over seeds against FP, one test: :func:`vitq.evaluate.compare_pooled`);
  ``per_seed``: each seed's top-1, log-loss, seconds and own paired test;
* costs: ``calib_seconds`` (mean), ``eval_seconds``, ``peak_rss_mb`` (the largest);
* ``task``: ``classify``, or ``features`` for an encoder (then top-1 is k-NN top-1, ``knn`` says how, and
  ``emb_cosine_mean`` / ``emb_cosine_p5`` / ``emb_sqnr_db`` are the embeddings' agreement with the float model's).

Callers add their own fields beside these (the CLI: source, data, manifest; compare: ``vs_first``; reproduce:
the paper's numbers; benches: their variant), never other names for these.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from ..evaluate import compare_paired, compare_pooled
from ..features import KNN_K, KNN_TEMPERATURE
from ..passes.quantize import manifest

RESULT_SCHEMA = "vitq.result/1"
#: an encoder's fields (``task: features``): the embeddings' agreement with the float model's, mean over seeds
EMBEDDING_FIELDS = ("emb_cosine_mean", "emb_cosine_p5", "emb_sqnr_db")
#: fields that depend on the machine and the moment, not on what was measured
TIMING_FIELDS = ("calib_seconds", "eval_seconds", "fp_eval_seconds", "peak_rss_mb")


def manifest_digest(model: nn.Module) -> str:
    """First 12 hex digits of the sha256 of the model's manifest (sites, quantizers, bits, granularity)."""
    return hashlib.sha256(json.dumps(manifest(model), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Trial:
    """One seed of a run: the quantized copy, its evaluation (``evaluate``'s dict, predictions included), the
    seconds calibration took, the images it calibrated on, the peak RSS and the manifest digest."""

    seed: int
    model: nn.Module
    res: dict[str, Any]
    calib_seconds: float
    calib_size: int
    peak_rss_mb: float
    digest: str


def _r(v: Optional[float], nd: int) -> Optional[float]:
    return None if v is None else round(float(v), nd)


def make_record(trials: Sequence[Trial], fp: Optional[dict[str, Any]], recipe: str, bits: str,
                model: Optional[str] = None) -> dict[str, Any]:
    """The record of ``trials`` (one per seed, same recipe and bits) against the float model's evaluation ``fp``
    (None: not evaluated)."""
    if not trials:
        raise ValueError("a record needs at least one trial")
    top1 = [t.res["top1"] for t in trials]
    nll = [t.res["nll"] for t in trials]
    mean = statistics.fmean(top1)
    one = len(trials) == 1
    first = trials[0]
    digests = {t.digest for t in trials}
    fp_pred = None if fp is None else fp["predictions"]
    per_seed = [{"seed": t.seed, "q_top1": _r(t.res["top1"], 2), "q_top5": _r(t.res["top5"], 2), "q_nll": _r(t.res["nll"], 5),
                 "calib_seconds": round(t.calib_seconds, 2),
                 "vs_fp": None if fp_pred is None else compare_paired(fp_pred, t.res["predictions"]).to_dict(),
                 **{k: t.res[k] for k in EMBEDDING_FIELDS if k in t.res}}
                for t in trials]
    features = "features" in first.res
    emb = {k: round(statistics.fmean(p[k] for p in per_seed), 6) for k in EMBEDDING_FIELDS if k in per_seed[0]}
    return {"task": "features" if features else "classify",
            **({"knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE, "bank": first.res.get("bank_size")}, **emb}
               if features else {}),
        "schema": RESULT_SCHEMA, "model": model, "recipe": recipe, "bits": str(bits),
        "calib_size": first.calib_size, "eval_size": first.res["n"], "seeds": [t.seed for t in trials], "seed": first.seed,
        "fp_top1": None if fp is None else _r(fp["top1"], 2), "fp_top5": None if fp is None else _r(fp["top5"], 2),
        "fp_nll": None if fp is None else _r(fp["nll"], 5),
        "q_top1": round(mean, 2), "q_top1_std": None if one else round(statistics.stdev(top1), 3),
        "q_top5": _r(first.res["top5"], 2) if one else None,
        "q_nll": None if None in nll else round(statistics.fmean(nll), 5),
        "drop": None if fp is None else round(fp["top1"] - mean, 2),
        "digest": first.digest if len(digests) == 1 else "differs by seed",
        "vs_fp": per_seed[0]["vs_fp"] if one else None,
        "vs_fp_pooled": None if fp_pred is None else compare_pooled([(fp_pred, t.res["predictions"]) for t in trials]),
        "per_seed": per_seed,
        "calib_seconds": round(statistics.fmean(t.calib_seconds for t in trials), 2),
        "eval_seconds": round(sum(t.res["seconds"] for t in trials), 2),
        "peak_rss_mb": round(max(t.peak_rss_mb for t in trials), 1),
    }


def measured(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the fields that depend on the machine and the moment (seconds, memory): what two
    runs of the same spec must agree on."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMING_FIELDS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    keys = ("schema", "task", "knn", *EMBEDDING_FIELDS, "recipe", "bits", "calib_size", "eval_size", "seeds", "seed", "fp_top1", "fp_top5", "fp_nll",
            "q_top1", "q_top1_std", "q_top5", "q_nll", "drop", "digest", "vs_fp", "vs_fp_pooled", "per_seed")
    return {k: strip(record.get(k)) for k in keys}


__all__ = ["RESULT_SCHEMA", "TIMING_FIELDS", "Trial", "make_record", "manifest_digest", "measured"]
