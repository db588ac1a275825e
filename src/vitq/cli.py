"""``vitq`` command line: argument parsing, printing, saving and export. What a run is and how it executes is
the run layer's (:mod:`vitq.run`): each command builds a :class:`~vitq.run.RunSpec` and calls it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

from .defaults import DEFAULT_MODEL, DEFAULT_RECIPE
from .errors import VitqError
from .export.deploy import RUNTIME_FORMATS
from .run.outputs import folder_lock, write_json, write_text

log = logging.getLogger("vitq")


def _add_compute_args(p: argparse.ArgumentParser) -> None:
    """Where and how a command computes and what it writes (every command that evaluates)."""
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or auto (a GPU where there is one) for calibration, reconstruction and "
                        "evaluation (default cpu)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader processes decoding image files (default 0: in the main process)")
    p.add_argument("--eval-size", type=int, help="evaluate on the first N images of the test/val split")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation / calibration batch size")
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="calibration sample / training seed; quantize takes several (--seed 0 1 2) to repeat the "
                        "calibration and report mean and std over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"reference model name, timm model name (with --checkpoint), a pickled model file "
                        f"(with --trust-pickle) or a vitq run folder (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="weights for a timm model name: .pth/.pt state dict or .safetensors")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a pickled nn.Module file (unpickling runs code from the file)")
    p.add_argument("--random-weights", action="store_true",
                   help="build a timm model with random weights (cost measurements only)")
    p.add_argument("--num-classes", type=int, help="classifier size of a timm model (default: from checkpoint)")
    p.add_argument("--data", default=None,
                   help="evaluation data (and calibration data without --calib-data): 'fashion-mnist', "
                        "'fashion-mnist:DIR', an ImageNet-layout root (train/<class>/, val/<class>/; val/ alone with "
                        "--calib-data) or a class-folder split itself (default: a run folder's recorded data, "
                        "Fashion-MNIST for a reference model; any other model needs --data)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="override the model's input size for preprocessing (as timm's validate script)")
    p.add_argument("--crop-pct", type=float, help="override the centre-crop fraction (timm's crop_pct)")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest"],
                   help="override the resize interpolation")
    p.add_argument("--task", choices=["auto", "classify", "features"], default="auto",
                   help="classify: top-1 of the model's head; features: an image encoder - k-NN top-1 (k 20, cosine) "
                        "with a bank of train-split images, and the embeddings' agreement with the float model "
                        "(default auto: features for a model without a classification head)")
    p.add_argument("--knn-bank", type=int, default=None, metavar="N",
                   help="encoders: train-split images in the k-NN memory bank (a seeded sample; default 10000)")
    _add_compute_args(p)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-size", type=int, help="number of calibration images (default: the recipe's)")
    p.add_argument("--calib-data", metavar="DIR",
                   help="calibrate on the images of this folder (flat or nested, no labels, any size / format / colour "
                        "mode; unreadable files are skipped and counted) instead of --data's train split")
    p.add_argument("--iters", type=int, metavar="N",
                   help="iterations per unit of the recipe's reconstruction passes (trade time for accuracy; "
                        "--set iters=N)")


def _add_recipe_args(p: argparse.ArgumentParser, one: bool = True) -> None:
    """What quantizes: recipe, bits, calibration data and the recipe's edits (quantize, report; compare: one=False)."""
    if one:
        p.add_argument("--recipe", default=None,
                       help=f"recipe name (see `vitq list`) or a recipe YAML file (default {DEFAULT_RECIPE}: the highest "
                            "accuracy we measured; calibration only at 6-8-bit activations, seconds; below that it "
                            "reconstructs, minutes to hours on a CPU; `--recipe repq` for seconds at any width)")
        p.add_argument("--bits", default="W8A8",
                       help="WxAy with x, y in 2..8, e.g. W8A8, W4A4, W4A8; quantize also takes auto / autoA4 (weight "
                            "bits per site under --budget, activations at 8 / 4 bits)")
        p.add_argument("--exclude", action="append", default=[], metavar="ROLE|REGEX",
                       help="leave sites in float: a role (e.g. HEAD_IN) or a module-name regex; repeatable")
    _add_calib_args(p)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="set_options",
                   help="set a pass option of the recipe (every pass that has it), e.g. --set loss=fisher_diag "
                        "--set slicing=half; repeatable; `vitq list` shows each pass's options")
    p.add_argument("--target", choices=["onnx", "none"],
                   help="quantize for a runtime: sites it has no integer kernel for (at A8 a log2 / log-sqrt2 / TanQ "
                        "post-Softmax) get the nearest integer form before calibration, so the simulated accuracy is "
                        "the deployed one (default: onnx with --export onnx, else none)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-top1-diff", type=float, default=None, metavar="POINTS",
                   help="parity check: fail when the export's top-1 differs from the simulated one by more (default 0.1)")
    p.add_argument("--emulate", default=None, choices=["exact", "uniform8"],
                   help="sites without an integer form (log2 / TanQ post-Softmax, ...): exact float emulation "
                        "(default) or 8-bit uniform post-Softmax (faster, a different quantizer)")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default=None,
                   help="onnx: the runtime --verify evaluates and times the file in (default onnxruntime; openvino "
                        "needs the openvino extra)")
    p.add_argument("--weight-dtype", choices=["auto", "uint8", "int8"], default=None,
                   help="onnx: the weight codes' container: auto (default: int8 where this CPU runs it exactly - "
                        "VNNI, AMX, ARM -, uint8 elsewhere), uint8 (exact on every CPU) or int8 (faster matmuls on "
                        "CPUs with AVX512-VNNI / AVX-VNNI / AMX and on ARM, but onnxruntime's AVX2 kernel saturates "
                        "it: wrong logits on x86 CPUs without VNNI)")


def check_export_args(args: argparse.Namespace, fmt: Optional[str], verifies: bool) -> None:
    """The export flags, before anything is loaded or quantized: ``fmt`` is the file the command will write (None:
    none, ``vitq`` or ``onnx``), ``verifies`` whether it checks that file's parity. A flag that would change nothing
    is refused (it was silently ignored)."""
    from .errors import ConfigError

    d = getattr(args, "max_top1_diff", None)
    if d is not None and not (math.isfinite(d) and d >= 0):
        raise ConfigError(f"--max-top1-diff {d}: give the points of top-1 the parity check allows, a number >= 0")
    how = "pass --verify" if args.command == "export" else "pass --out DIR --export onnx"
    if d is not None and not verifies:
        raise ConfigError(f"--max-top1-diff {d} is the parity check's limit, and this command checks no file: {how}, "
                          "or drop --max-top1-diff")
    rt = getattr(args, "runtime", None)
    if rt is not None and fmt == "openvino":
        raise ConfigError(f"--runtime {rt}: the OpenVINO form runs in OpenVINO (its --verify too): drop --runtime, or "
                          "export --format onnx to verify in onnxruntime or OpenVINO")
    if rt is not None and not (verifies and fmt == "onnx"):
        raise ConfigError(f"--runtime {rt} is the runtime an ONNX file is verified in, and this command verifies "
                          + ("no ONNX file" if fmt != "onnx" else "nothing") + f": {how}, or drop --runtime")
    em = getattr(args, "emulate", None)
    if em is not None and fmt is None:
        raise ConfigError(f"--emulate {em} decides how an export holds sites without an integer form, and this command "
                          "exports nothing: pass --out DIR --export onnx, or drop --emulate")
    wd = getattr(args, "weight_dtype", None)
    if wd is not None and fmt not in RUNTIME_FORMATS:
        raise ConfigError(f"--weight-dtype {wd} sets the weight container of an ONNX / OpenVINO file, and this command writes "
                          + ("none" if fmt is None else f"a {fmt} export") + ": pass --export onnx (vitq export: --format "
                          "onnx), or drop --weight-dtype")


def _limit(args: argparse.Namespace) -> float:
    from .export.deploy import DEFAULT_MAX_TOP1_DIFF

    d = getattr(args, "max_top1_diff", None)
    return DEFAULT_MAX_TOP1_DIFF if d is None else float(d)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of Vision Transformers.")
    ap.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a quantized model, evaluate FP vs quantized top-1")
    _add_model_args(q)
    _add_recipe_args(q)
    q.add_argument("--out", help="save the quantized model (safetensors + vitq.json, with the run's data) and results here")
    q.add_argument("--overwrite", action="store_true", help="replace a saved quantization already in --out")
    q.add_argument("--budget", type=float, metavar="BITS",
                   help="with --bits auto: average weight bits the per-site choice of 3 / 4 / 6 / 8 bits / float may use")
    q.add_argument("--budget-mb", type=float, metavar="MB",
                   help="with --bits auto: megabytes (1e6 bytes) of weight codes instead of --budget")
    q.add_argument("--sensitivity-size", type=int, default=512, metavar="N",
                   help="with --bits auto: images of the calibration source the per-site sensitivity is measured on "
                        "(default 512; never the evaluation images)")
    q.add_argument("--recipe-out", metavar="FILE",
                   help="with --bits auto: write the chosen mixed-precision recipe here (default: recipe.yaml in --out)")
    q.add_argument("--skip-fp", action="store_true", help="do not evaluate the float model")
    q.add_argument("--max-cache-gb", type=float, metavar="GB",
                   help="memory budget of reconstruction caches; larger caches stream from disk")
    q.add_argument("--resume-dir", metavar="DIR",
                   help="save reconstruction state here after every unit; rerun with the same arguments to resume")
    q.add_argument("--export", choices=["onnx", "openvino", "vitq"], metavar="FORMAT",
                   help="also write a deployment export into the --out folder (onnx: QDQ graph for onnxruntime, "
                        "model.onnx; openvino: OpenVINO IR, openvino/model.xml; vitq: packed integer weights, "
                        "packed/), verified against the simulated model on the evaluation images")
    _add_export_args(q)

    e = sub.add_parser("eval", help="evaluate a model (float, or a vitq run folder on its recorded data) on a dataset")
    _add_model_args(e)

    x = sub.add_parser("export", help="lower a vitq quantize --out folder to a deployment format (onnx) and verify it; "
                                          "a float MODEL (not a run folder) exports as the float ONNX baseline (--out DIR)")
    _add_model_args(x)
    x.add_argument("--format", default="onnx", choices=["onnx", "openvino", "vitq"],
                   help="onnx: QDQ graph for onnxruntime (default); openvino: OpenVINO IR (model.xml + model.bin) "
                        "on its INT8 kernels (the openvino extra); vitq: packed integer weight codes")
    x.add_argument("--out", help="folder for the exported file and export.json (default: the run folder; "
                                 "for openvino its openvino/ subfolder, for vitq its packed/ subfolder)")
    x.add_argument("--verify", action="store_true",
                   help="evaluate the export in its runtime beside the simulated model on the run's data (parity check)")
    _add_export_args(x)

    c = sub.add_parser("compare", help="recipes x bits x seeds on one model in one table (--recipes), or a paired "
                                       "comparison of two models on the same images (MODEL MODEL_B)")
    _add_model_args(c)
    c.add_argument("model_b", nargs="?", help="the second model of a paired comparison: same forms as MODEL (e.g. two "
                                              "`vitq quantize --out` folders)")
    c.add_argument("--checkpoint-b", help="weights for MODEL_B when it is a timm model name")
    c.add_argument("--recipes", metavar="R1,R2,..", help="compare these recipes on MODEL (the first is the reference "
                                                         "each row is tested against)")
    c.add_argument("--bits", default="W4A4", metavar="WxAy,..", help="bit-widths for --recipes (default W4A4)")
    c.add_argument("--seeds", metavar="S1,S2,..", help="calibration seeds for --recipes (default: --seed)")
    _add_recipe_args(c, one=False)
    for flag, what in (("--md", "the table as markdown"), ("--csv", "the table as CSV"), ("--png", "top-1 against bits")):
        c.add_argument(flag, metavar="FILE", help=f"write {what}")

    rp = sub.add_parser("report", help="HTML report of a quantized model: per-site error and sensitivity, "
                                       "distributions with the quantizer's levels, manifest")
    _add_model_args(rp)
    _add_recipe_args(rp)
    rp.add_argument("--out", required=True, metavar="DIR", help="folder for report.html, report.json and the PNGs")
    rp.add_argument("--sensitivity-size", type=int, default=1000, metavar="N",
                    help="evaluation images for the one-site-at-a-time sensitivity (default 1000)")
    rp.add_argument("--error-images", type=int, default=64, metavar="N",
                    help="evaluation images for the per-site error and the distributions (default 64)")

    r = sub.add_parser("reproduce", help="run a published ImageNet protocol and print our rows beside the papers'")
    r.add_argument("protocol", help="a shipped protocol (ptq4vit-lineage, fqvit-lineage; see vitq list) or a YAML file")
    r.add_argument("--imagenet", required=True, metavar="DIR", help="ImageNet folder: train/<class>/ and val/<class>/")
    r.add_argument("--weights", required=True, metavar="DIR",
                   help="one weight file per model: DIR/<timm name>.safetensors (or .pth / .pt / .bin)")
    r.add_argument("--models", nargs="+", metavar="M", help="a part of the protocol's models (ViT-S, deit_small_patch16_224, ...)")
    r.add_argument("--recipes", nargs="+", metavar="R", help="a part of its recipes")
    r.add_argument("--bits", nargs="+", metavar="WxAy", help="a part of its bit-widths")
    r.add_argument("--md", help="write the table as markdown to this file")
    _add_calib_args(r)
    _add_compute_args(r)

    sub.add_parser("list", help="list recipes, quantizers, reference models, protocols and supported model types")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import distributed

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)  # everything the arguments alone can tell, before any loading
        if distributed.launched() and args.command in ("quantize", "eval", "reproduce"):
            if args.command in ("quantize", "eval"):
                _spec(args)  # the run's values checked before the ranks join: a bad one is said once, by rank 0
            _start_distributed(args)
        if args.command == "list":
            return cmd_list()
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "reproduce":
            return cmd_reproduce(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_quantize(args)
    except VitqError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: the original message is the last line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        if distributed.launched() and not distributed.active() and os.environ.get("RANK", "0") != "0":
            return e.exit_code  # refused before the ranks joined: every rank read the same arguments; rank 0 says it
        tag = f" (rank {distributed.rank()})" if distributed.active() else ""
        print(f"vitq: error{tag}: {msg}", file=sys.stderr)
        if distributed.active():
            sys.stderr.flush()
            os._exit(e.exit_code)  # the other ranks may wait in a collective: torchrun stops them when one exits
        return e.exit_code
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130
    finally:
        if distributed.active():
            distributed.shutdown()


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what the arguments alone show to be wrong about outputs and flags a command ignores, before any
    model or data is loaded (the run's own values are checked by RunSpec, also before loading)."""
    from .bits import parse_run_bits
    from .defaults import DEFAULT_BITS
    from .errors import ConfigError
    from .run.outputs import check_output_dir, check_output_file

    if args.command == "eval" and getattr(args, "seed", [0]) != [0]:
        raise ConfigError("eval does not calibrate, so --seed changes nothing: drop it (quantize takes --seed)")
    for flag in ("json", "md", "csv", "png", "recipe_out"):
        path = getattr(args, flag, None)
        if path:
            check_output_file(f"--{flag.replace('_', '-')}", path)
    if getattr(args, "png", None):
        from .insight.report import pyplot

        pyplot()  # a missing matplotlib is one line now, not after the whole comparison
    if getattr(args, "resume_dir", None):
        check_output_dir("--resume-dir", args.resume_dir)
    out = getattr(args, "out", None)
    if out and args.command in ("quantize", "report", "export"):
        check_output_dir("--out", out)
        if args.command == "quantize" and (Path(out) / "vitq.json").is_file() and not args.overwrite:
            raise ConfigError(f"--out {out} already holds a saved quantization: pass --overwrite to replace it, or "
                              "another folder")
    if getattr(args, "recipe_out", None) and Path(args.recipe_out).is_dir():
        raise ConfigError(f"--recipe-out {args.recipe_out} is a folder: give a file name (e.g. mixed.yaml)")
    if getattr(args, "recipe_out", None) and not parse_run_bits(getattr(args, "bits", None) or DEFAULT_BITS)[1]:
        raise ConfigError(f"--recipe-out {args.recipe_out} writes the mixed-precision recipe --bits auto chooses, and "
                          f"--bits {args.bits or DEFAULT_BITS} chooses none: pass --bits auto (or autoA4), or drop --recipe-out")


def _start_distributed(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group, one device per rank, output from rank 0 only."""
    from . import distributed
    from .devices import resolve

    args.device = str(distributed.init_from_env(resolve(args.device)))
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        args.no_progress = True


# ----------------------------------------------------------------------------------------------
def cmd_list() -> int:
    from .adapters import supported_models
    from .passes import all_passes
    from .quantizers import QUANTIZERS
    from .recipes import list_recipes, load_recipe
    from .reference import list_reference_models, reference_fp_top1
    from .reproduce import list_protocols, load_protocol

    print("recipes:")
    for r in list_recipes():
        desc = " ".join(load_recipe(r).description.split())
        print(f"  {r:<12} {desc[:100]}{'...' if len(desc) > 100 else ''}")
    print("quantizers:\n  " + ", ".join(sorted(QUANTIZERS)))
    print("passes (options and defaults; a recipe's pass options can be changed with quantize --set OPTION=VALUE):")
    for name, info in sorted(all_passes().items()):
        opts = " ".join(f"{k}={v}" for k, v in info.options.items())
        print(f"  {name:<16} {info.doc}")
        print(textwrap.fill(opts, width=110, initial_indent=" " * 19, subsequent_indent=" " * 19,
                            break_on_hyphens=False))
    print("protocols (vitq reproduce PROTOCOL --imagenet DIR --weights DIR):")
    for name in list_protocols():
        pr = load_protocol(name)
        print(f"  {name:<16} {', '.join(pr.bits)}; {', '.join(r for r, _ in pr.recipes)}; "
              f"{', '.join(m.label for m in pr.models)}")
    print("reference models (Fashion-MNIST, FP test top-1):")
    for n in list_reference_models():
        acc = reference_fp_top1(n)
        print(f"  {n:<22} {'-' if acc is None else f'{acc:.2f}'}")
    print("supported model types:")
    for s in supported_models():
        print(f"  {s}")
    return 0


def _spec(args: argparse.Namespace, **extra: Any) -> Any:
    from .run import RunSpec

    return RunSpec.from_cli(args, **extra)


def _open(spec: Any, shard: bool = False) -> Any:
    """The spec's model and the data it is evaluated on (recorded by a run folder unless given)."""
    from .run.inputs import open_spec

    return open_spec(spec, shard=shard)


def _data_line(origin: str) -> str:
    return {"given": "", "recorded": " (the data the run recorded)", "reference": " (the reference models' data)"}[origin]


def cmd_eval(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluate import peak_rss_mb
    from .run.execute import evaluate_opened

    spec = _spec(args)
    o = _open(spec, shard=True)
    res = evaluate_opened(spec, o)
    out = {"model": args.model, "source": o.source.to_dict(), "data": str(o.choice.spec), "data_origin": o.choice.origin,
           "task": "features" if "features" in res else "classify", "top1": round(res["top1"], 2), "top5": round(res["top5"], 2), "eval_size": res["n"],
           "eval_seconds": round(res["seconds"], 2), "nll": None if res["nll"] is None else round(res["nll"], 5),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    nll = "" if out["nll"] is None else f"  test log-loss {out['nll']:.4f}"
    knn = "k-NN " if out["task"] == "features" else ""
    print(f"{args.model}: {knn}top-1 {out['top1']:.2f}%  {knn}top-5 {out['top5']:.2f}%{nll}  on {res['n']} images of "
          f"{o.choice.spec}{_data_line(o.choice.origin)} ({out['eval_seconds']:.1f}s)")
    if distributed.is_main():
        write_json(args.json, out)
    return 0


def _csv_list(text: Optional[str], what: str) -> list[str]:
    from .errors import ConfigError

    items = [t.strip() for t in (text or "").replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what} is empty: give a comma-separated list")
    return items


def cmd_compare_recipes(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .recipes import parse_assignments
    from .run.compare import compare_spec, plot, to_csv, to_markdown, to_text

    if args.model_b:
        raise ConfigError("give either MODEL_B (compare two models) or --recipes (compare recipes on MODEL), not both")
    try:
        seeds = [int(s) for s in _csv_list(args.seeds, "--seeds")] if args.seeds else list(args.seed)
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    sets = parse_assignments(args.set_options)
    if args.iters is not None:
        sets["iters"] = args.iters
    names, bits = _csv_list(args.recipes, "--recipes"), _csv_list(args.bits, "--bits")
    given = [str(x) for x in seeds]
    for what, items in (("--recipes", names), ("--bits", [b.upper() for b in bits]),
                        ("--seeds" if args.seeds else "--seed", given)):
        twice = sorted({i for i in items if items.count(i) > 1})
        if twice:  # two identical rows: a comparison of a run with itself
            raise ConfigError(f"{what} {(' ' if what == '--seed' else ',').join(items)}: {', '.join(twice)} is given "
                              "twice: list each once")
    spec = _spec(args, recipe=names[0], bits=bits[0], seeds=tuple(seeds), options=())
    res = compare_spec(spec, names, bits, sets, say=print)
    print(f"{args.model} on {res['fp']['images']} images of {res['data']}{_data_line(res['data_origin'])}, "
          f"{'/'.join(map(str, res['calib_sizes']))} calibration images, seeds {', '.join(map(str, seeds))}: "
          f"FP top-1 {res['fp']['top1']:.2f}%")
    print(to_text(res))
    for path, render in ((args.md, to_markdown), (args.csv, to_csv)):
        if path:
            write_text(path, render(res))
    if args.png:
        plot(res, args.png)
    write_json(args.json, res)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .run.compare import compare_models

    if args.recipes:
        return cmd_compare_recipes(args)
    if not args.model_b:
        raise ConfigError("compare needs MODEL_B (two models) or --recipes R1,R2 (recipes on MODEL)")
    res = compare_models(_spec(args), _spec(args, model=args.model_b, checkpoint=args.checkpoint_b),
                         progress=not args.no_progress)
    ra, rb, cmp, choice = res["a"], res["b"], res["comparison"], res["choice"]
    print(f"A {args.model}: top-1 {ra['top1']:.2f}%\nB {args.model_b}: top-1 {rb['top1']:.2f}%  "
          f"(on {ra['n']} images of {choice.spec}{_data_line(choice.origin)})")
    print(cmp.summary("A", "B"))
    write_json(args.json, {"model_a": args.model, "model_b": args.model_b, "data": str(choice.spec), **cmp.to_dict(),
                           "significant_5pct": cmp.significant()})
    return 0


def _export_and_verify(model: Any, out: Path, fmt: str, args: argparse.Namespace, loader: Any = None,
                       embeddings: bool = False) -> dict[str, Any]:
    from .export.deploy import DEFAULT_EMULATE, export, verify

    rep = export(model, out, fmt, emulate=args.emulate or DEFAULT_EMULATE, weight_dtype=getattr(args, "weight_dtype", None))
    low = rep["lowering"]
    if fmt == "vitq":
        print(f"exported {out / rep['file']} ({rep['bytes'] / 1e6:.2f} MB, {rep['bytes'] / rep['float32_state_bytes']:.3f}x "
              f"the float32 state): {rep['packed_weights']} weights as packed integer codes")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(low["counts"].items()))
        if fmt == "openvino":
            print(f"exported {out / rep['file']} + model.bin ({rep['bytes'] / 1e6:.2f} MB, OpenVINO {rep['openvino']}, "
                  f"{rep['weight_dtype']} weights): sites {counts}; {rep['fake_quantize']} activation quantizers as "
                  f"FakeQuantize ({rep['merged_projections']} fused q / k / v projections, {rep['hoisted']} moved onto "
                  "the op computing their values)")
        else:
            from .export.onnx import INTEGER_OPS

            kernels = {k: v for k, v in rep.get("runtime_ops", {}).items() if k in INTEGER_OPS}
            wd = rep["weight_dtype"] + (f" weights, {rep['weight_dtype_why'].split(',')[0]}"
                                        if rep.get("weight_dtype_why", "").startswith("auto") else " weights")
            print(f"exported {out / rep['file']} ({rep['bytes'] / 1e6:.2f} MB, {wd}): sites {counts}; integer kernels "
                  f"after onnxruntime's fusions: {', '.join(f'{v} {k}' for k, v in kernels.items()) or 'none'}")
        for fb in low["fallbacks"]:
            print(f"  fallback {fb['site']} ({fb['role']}): {fb['note']}")
    runtime = getattr(args, "runtime", None)
    if loader is not None:
        v = verify(model, out, loader, fmt, max_top1_diff=_limit(args), progress=not args.no_progress,
                   embeddings=embeddings, runtime=runtime)
        rep["verify"] = v
        if embeddings:
            print(f"  verified on {v['images']} images: {v['format']} embeddings against the simulated ones, cosine "
                  f"{v['embedding_cosine_mean']:.6f} mean, {v['embedding_cosine_min']:.6f} smallest, max |diff| "
                  f"{v['max_abs_diff']:.3g}")
        else:
            print(f"  verified on {v['images']} images: {v['format']} top-1 {v['exported_top1']:.2f}% vs simulated "
                  f"{v['simulated_top1']:.2f}% ({v['top1_diff']:+.2f}), predictions agree on {v['agreement']:.2f}%, "
                  f"max |logit diff| {v['max_logit_diff']:.3g} (mean {v['mean_logit_diff']:.3g})")
        _print_default_precision(v)
        if fmt in RUNTIME_FORMATS:
            _print_speed(model, out, runtime, rep, fmt)
    return rep


def _print_default_precision(v: dict[str, Any]) -> None:
    """--verify where the runtime computes float operations below f32 by default (OpenVINO: bf16 with AMX /
    AVX512-BF16, f16 on ARM): the check above ran in f32; what the default gives, and a warning outside the limit."""
    d = v.get("default_precision")
    if not d:
        return
    p = d["precision"]
    if "embedding_cosine_min" in d:
        got = (f"embedding cosine {d['embedding_cosine_mean']:.6f} mean, {d['embedding_cosine_min']:.6f} smallest "
               f"(limit {v['min_cosine']})")
    else:
        got = f"top-1 {d['exported_top1']:.2f}% ({d['top1_diff']:+.2f}, limit {v['max_top1_diff']})"
    print(f"  (the check ran in f32; in OpenVINO's default {p} on this CPU: {got})")
    if not d["within_limit"]:
        log.warning("in OpenVINO's default %s on this CPU the file is outside the parity limit (%s): compile it with "
                    "{'INFERENCE_PRECISION_HINT': 'f32'} for the verified f32 result; see docs/deploy.md", p, got)


def _print_speed(model: Any, out: Path, runtime: Optional[str], rep: dict[str, Any], fmt: str = "onnx") -> None:
    """--verify's timing: the file against the float ONNX of the same model, same runtime, this host."""
    from .export.deploy import time_against_float
    from .export.onnx import cpu_flags

    sp = time_against_float(model, out, runtime, fmt=fmt)
    rep["speed"] = sp
    flags = cpu_flags() or set()
    isa = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in flags), "no x86 SIMD flags read")
    line = (f"  speed: {sp['quantized_ips']:.1f} images/s against the float ONNX's {sp['float_ips']:.1f} "
            f"({sp['speedup']:.2f}x) in {sp['runtime']}, batch {sp['batch']}, {sp['threads']} threads, this CPU ({isa})")
    print(line)
    if sp["speedup"] <= 1.0:
        from .export.onnx import u8s8_exact

        exact, why = u8s8_exact()
        if sp.get("float_precision") == "bf16":
            cause = ("OpenVINO runs the float file in bf16 on this CPU (AMX / AVX512-BF16), nearly as fast as INT8 "
                     "(DeiT-S: the OpenVINO form 1.11x / 1.00x its bf16 float at batch 1 / 32, bench/results/deploy.md)")
        elif exact:
            cause = ("this CPU has an integer dot product, so the model is small enough that per-operator overhead, "
                     "not arithmetic, sets its speed (larger ViTs gain: DeiT-S 2.1x in onnxruntime, "
                     "bench/results/deploy.md)")
        else:
            cause = f"integer kernels pay on CPUs with a u8 x s8 dot product (VNNI, AMX, ARM), and this one is {why}"
        log.warning("the quantized file is not faster than the float one here (%.2fx in %s): %s; see docs/deploy.md",
                    sp["speedup"], sp["runtime"], cause)


def _export_float(args: argparse.Namespace) -> int:
    """``vitq export MODEL --format onnx --out DIR`` of a float model (not a run folder): the baseline file, with the
    conventions of a quantized export, to time and score beside it."""
    import copy

    from .errors import ConfigError
    from .export.deploy import export_float, verify
    from .pipeline import quantize
    from .recipes import load_recipe
    from .run.inputs import load, task_of

    if args.format not in RUNTIME_FORMATS:
        raise ConfigError(f"{args.model} is a float model (not a vitq quantize --out folder): the {args.format} format "
                          "stores quantized weights; export it with --format onnx or openvino (the float baseline), or "
                          "quantize it first (vitq quantize MODEL ... --out DIR)")
    if not args.out:
        raise ConfigError(f"{args.model} is a float model: pass --out DIR for its {args.format} file (a run folder's "
                          "export goes into the run folder)")
    spec = _spec(args)
    if args.verify:
        o = _open(spec)
        model, loader, embeddings = o.model, o.loader, task_of(o.model, spec.task, spec.knn_bank) == "features"
    else:
        model, _ = load(spec.model, checkpoint=spec.checkpoint, trust_pickle=spec.trust_pickle,
                        random_weights=spec.random_weights, num_classes=spec.num_classes, device=spec.device)
        loader, embeddings = None, False
    out = Path(args.out)
    rep = export_float(model, out, fmt=args.format)
    print(f"exported the float model {args.model} to {out / rep['file']} ({rep['bytes'] / 1e6:.2f} MB, no quantized "
          "site: the baseline for a quantized file)")
    if loader is not None:
        fp = quantize(copy.deepcopy(model), load_recipe("fp"), "W8A8", calib_data=None)
        v = verify(fp, out, loader, args.format, max_top1_diff=_limit(args), progress=not args.no_progress,
                   embeddings=embeddings, runtime=getattr(args, "runtime", None))
        rep["verify"] = v
        what = (f"embedding cosine {v['embedding_cosine_min']:.6f} smallest" if embeddings else
                f"top-1 {v['exported_top1']:.2f}% vs PyTorch {v['simulated_top1']:.2f}% ({v['top1_diff']:+.2f})")
        print(f"  verified on {v['images']} images: {v['format']} {what}")
        _print_default_precision(v)
    write_json(args.json, rep)
    return 0


def _subdir(fmt: str) -> str:
    """Where a format goes inside a run folder (the packed format would replace the run's own files)."""
    return {"vitq": "packed", "openvino": "openvino"}.get(fmt, "")


def cmd_export(args: argparse.Namespace) -> int:
    from .run import is_run_folder
    from .run.inputs import load

    check_export_args(args, args.format, bool(args.verify))
    if not is_run_folder(args.model):
        return _export_float(args)
    spec = _spec(args)
    embeddings = False
    if args.verify:
        from .run.inputs import task_of

        o = _open(spec)
        model, loader = o.model, o.loader
        embeddings = task_of(model, spec.task, spec.knn_bank) == "features"
        print(f"verifying on {o.choice.spec}{_data_line(o.choice.origin)}")
    else:
        model, _ = load(spec.model, trust_pickle=spec.trust_pickle, device=spec.device)
        loader = None
    rep = _export_and_verify(model, Path(args.out) if args.out else Path(args.model) / _subdir(args.format), args.format,
                             args, loader, embeddings)
    write_json(args.json, rep)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import distributed
    from .reproduce import load_protocol, render, reproduce

    protocol = load_protocol(args.protocol)
    rows = reproduce(protocol, args.imagenet, args.weights, models=args.models, recipes=args.recipes, bits=args.bits,
                     eval_size=args.eval_size, calib_size=args.calib_size, calib_data=args.calib_data,
                     seeds=list(args.seed), iters=args.iters, batch_size=args.batch_size,
                     device=args.device, workers=args.workers, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    table = render(rows, protocol)
    print("\n" + table)
    write_json(args.json, {"protocol": protocol.name, "rows": rows})
    if args.md:
        write_text(args.md, table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import copy

    from .errors import DataError
    from .evaluate import evaluate
    from .insight import first_batches, most_sensitive
    from .insight.report import ReportInputs, write_report
    from .nn import disabled
    from .pipeline import prepare
    from .run import is_run_folder
    from .run.execute import quantize_first_seed
    from .state import state_of

    for flag, v in (("--sensitivity-size", args.sensitivity_size), ("--error-images", args.error_images)):
        if v <= 0:
            raise DataError(f"{flag} must be positive, got {v}: pass a number of images >= 1")
    spec = _spec(args)
    seed = spec.seeds[0]
    o = _open(spec)
    from .run.inputs import task_of

    features = task_of(o.model, spec.task, spec.knn_bank) == "features"
    progress = spec.progress
    before = None
    recipe: Any
    if is_run_folder(args.model):  # already quantized: report it as it is
        q, st = o.model, state_of(o.model)
        assert st is not None and st.bits is not None and st.recipe is not None  # an export is a quantized model
        recipe, bits = st.recipe, st.bits
        calib_seconds = None
    else:
        recipe, bits = spec.recipe_obj, spec.run_bits
        before = prepare(copy.deepcopy(o.model), recipe, bits)  # the float model's sites, before any folding
        q, secs = quantize_first_seed(spec, o, print)
        calib_seconds = round(secs, 2)
    metric = "k-NN top-1" if features else "top-1"
    if features:  # an encoder: k-NN top-1 against its own embeddings of the train split, and the agreement
        from .run.compare import cache_batches
        from .run.execute import bank_loader, features_evaluator

        bank = cache_batches(bank_loader(spec, o.choice, o.pre))
        data = cache_batches(o.loader)
        with disabled(q):
            fp = features_evaluator(data, bank, progress)(q, "eval fp")
        res = features_evaluator(data, bank, progress, reference=fp)(q, "eval quantized")
    else:
        with disabled(q):
            fp = evaluate(q, o.loader, progress=progress, desc="eval fp")
        res = evaluate(q, o.loader, progress=progress, desc="eval quantized")
    batches = first_batches(o.loader, args.sensitivity_size)
    meta = {"model": args.model, "data": str(o.choice.spec), "recipe": recipe.name, "bits": str(bits), "seed": seed,
            f"FP {metric}": round(fp["top1"], 2), f"quantized {metric}": round(res["top1"], 2),
            "drop (points)": round(fp["top1"] - res["top1"], 2), "evaluation images": res["n"]}
    if features:
        meta.update({"k-NN bank images": res["bank_size"], "embedding cosine (mean)": res["emb_cosine_mean"],
                     "embedding cosine (5th percentile)": res["emb_cosine_p5"], "embedding SQNR dB": res["emb_sqnr_db"]})
    meta.update({"sensitivity images": sum(len(x) for x, _ in batches), "calibration seconds": calib_seconds,
                 "source": o.source.to_dict().get("name")})
    path = write_report(q, batches, args.out, ReportInputs(meta=meta, recipe=recipe.to_dict(), before=before),
                        error_images=args.error_images, progress=progress, features=features)
    rep = json.loads((path.parent / "report.json").read_text())
    worst = most_sensitive(rep["sites"])[:5]
    print(f"{args.model} {recipe.name} {bits}: FP {metric} {fp['top1']:.2f}%  quantized {res['top1']:.2f}%  "
          f"({res['n']} images of {o.choice.spec}{_data_line(o.choice.origin)})"
          + (f"; embeddings: cosine {res['emb_cosine_mean']:.4f} (p5 {res['emb_cosine_p5']:.4f}), "
             f"SQNR {res['emb_sqnr_db']:.1f} dB" if features else ""))
    print("most sensitive sites (only that site quantized): " + "; ".join(
        (f"{r['site']} SQNR {r['emb_sqnr_db']:.1f} dB, cosine {r['emb_cosine_mean']:.4f}" if features else
         f"{r['site']} {r['d_top1']:+.2f} pt" + ("" if r["d_nll"] is None else f", {r['d_nll']:+.4f} nats"))
        for r in worst))
    print(f"report: {path}")
    write_json(args.json, {k: v for k, v in rep.items() if k != "recipe"})
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import distributed
    from .run import check_resume, default_notice, run

    spec = _spec(args)  # every value checked, the recipe built and edited: before anything is loaded
    check_export_args(args, spec.export, spec.export is not None)
    if spec.export in RUNTIME_FORMATS:
        from .export.onnx import require

        for pkg in ("onnx", "onnxruntime", "onnxscript"):
            require(pkg)  # a missing package is one line now, not after calibration
        if spec.export == "openvino":
            from .export.openvino import require_openvino

            require_openvino("--export openvino")
    if spec.option("run_dir"):
        check_resume(spec, str(spec.option("run_dir")))
    notice = default_notice(spec)
    if notice:
        print(notice, flush=True)
    with contextlib.ExitStack() as held:
        if os.environ.get("RANK", "0") == "0":  # the process that writes (rank 0 under torchrun) holds the folders
            for flag, folder in (("--out", args.out), ("--resume-dir", spec.option("run_dir"))):
                if folder:
                    held.enter_context(folder_lock(flag, str(folder)))
        result = run(spec, say=lambda line: print(line, flush=True))
        rec = result.record
        _print_result(args.model, result)
        if not distributed.is_main():
            return 0  # rank 0 writes the files (and verifies the export on the whole test set)
        if args.out:
            _save(args, result)
        write_json(args.json, rec)
    return 0


def _group_float_parts(parts: list[dict[str, str]]) -> list[tuple[str, list[str]]]:
    """The run record's ``float_parts`` grouped by reason, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for p in parts:
        groups.setdefault(p["why"], []).append(p["module"])
    return list(groups.items())


def _print_result(name: str, result: Any) -> None:
    rec = result.record
    n_q = sum(1 for m in rec["manifest"] if m["quantizer"] != "float")
    several = len(rec["seeds"]) > 1
    fp_txt = "-" if rec["fp_top1"] is None else f"{rec['fp_top1']:.2f}"
    drop_txt = "" if rec["drop"] is None else f"  (drop {rec['drop']:+.2f})"
    q_txt = (f"{rec['q_top1']:.2f} ± {rec['q_top1_std']:.2f}% (mean ± std over {len(rec['seeds'])} seeds)" if several
             else f"{rec['q_top1']:.2f}%")
    what = "k-NN top-1" if rec["task"] == "features" else "top-1"
    print(f"{name} {rec['recipe']} {rec['bits']}: FP {what} {fp_txt}%  quantized {what} {q_txt}{drop_txt}  "
          f"[{n_q}/{len(rec['manifest'])} sites quantized, calib {rec['per_seed'][0]['calib_seconds']:.1f}s, "
          f"{rec['eval_size']} eval images of {rec['data']}{'' if rec['data_origin'] == 'given' else ' (' + rec['data_origin'] + ')'}, "
          f"peak RSS {rec['peak_rss_mb']:.0f} MB]")
    parts = rec.get("float_parts") or []
    for why, names in _group_float_parts(parts):
        print(f"  float by design: {names[0]}" + (f" and {len(names) - 1} more like it" if len(names) > 1 else "")
              + f" ({why})")
    if rec["task"] == "features":
        print(f"  embeddings against the float model's: cosine {rec['emb_cosine_mean']:.4f} mean, "
              f"{rec['emb_cosine_p5']:.4f} at the 5th percentile; SQNR {rec['emb_sqnr_db']:.1f} dB")
    if result.fp is not None:
        from .evaluate import compare_paired

        for t in result.trials:
            tag = "quantized" if not several else f"seed {t.seed}"
            print(textwrap.indent(compare_paired(result.fp["predictions"], t.res["predictions"]).summary("FP", tag), "  "))
    pl = rec.get("vs_fp_pooled")
    if several and pl:
        p_txt = "" if pl["p_value"] is None else f" (pooled p = {pl['p_value']:.3g})"
        nll_txt = "" if pl["nll_p"] is None else f"; test log-loss {pl['nll_diff']:+.4f} nats (pooled p = {pl['nll_p']:.3g})"
        print(f"  mean over {pl['seeds']} seeds, quantized - FP: {pl['diff']:+.2f} points{p_txt}{nll_txt}; "
              "one test over the seeds, which share the test images")


def _save(args: argparse.Namespace, result: Any) -> None:
    """--out: the quantized model (its run record sealed with it), result.json, a mixed-precision recipe, the export."""
    from .export import save_quantized

    rec = result.record
    out = save_quantized(result.model, args.out, result.source if result.source.kind != "export" else None,
                         extra={"result": {k: v for k, v in rec.items() if k not in ("manifest", "recipe_config")}})
    (Path(out) / "result.json").write_text(json.dumps(rec, indent=2) + "\n")
    if rec.get("mixed_precision") is not None:
        from .insight.mixed import recipe_yaml

        path = Path(args.recipe_out) if args.recipe_out else Path(out) / "recipe.yaml"
        path.write_text(recipe_yaml(result.recipe))
        print(f"mixed-precision recipe: {path} (vitq quantize --recipe {path} --bits {rec['bits']} runs it again)")
    print(f"saved to {out}")
    if args.export:
        from . import distributed
        from .run.inputs import eval_loader

        full = result.eval_loader
        if distributed.active():  # the export is verified on the whole test set
            full = eval_loader(result.model, result.data, _pre(result), result.spec.eval_size, result.spec.batch_size,
                               result.spec.workers)
        rep = _export_and_verify(result.model, Path(out) / _subdir(args.export), args.export, args, full,
                                 embeddings=rec["task"] == "features")
        rec["export"] = {k: rep[k] for k in ("format", "file", "bytes", "lowering", "runtime_ops", "verify") if k in rep}


def _pre(result: Any) -> Any:
    from .run.inputs import preprocessing

    return preprocessing(result.float_model, result.data)


if __name__ == "__main__":
    raise SystemExit(main())
