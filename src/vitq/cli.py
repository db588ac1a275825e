"""``vitq`` command line: thin - parse, build the recipe and context, call the library."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import VitqError

log = logging.getLogger("vitq")

DEFAULT_MODEL = "fmnist-vit"
DEFAULT_DATA = "fashion-mnist"
#: the recipe when --recipe is not given: the composition that scores highest at every width
#: (bench/results/best.md); calibration only (seconds) at 6-8-bit activations, reconstruction below
#: (tens of minutes on a CPU for a reference model, hours for a DeiT-Small: a notice says so)
DEFAULT_RECIPE = "best"
#: the recipe the notice offers when the default would reconstruct: calibration only, seconds
FAST_RECIPE = "repq"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"reference model name, timm model name (with --checkpoint), a pickled model file "
                        f"(with --trust-pickle) or a vitq export folder (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="weights for a timm model name: .pth/.pt state dict or .safetensors")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a pickled nn.Module file (unpickling runs code from the file)")
    p.add_argument("--random-weights", action="store_true",
                   help="build a timm model with random weights (cost measurements only)")
    p.add_argument("--num-classes", type=int, help="classifier size of a timm model (default: from checkpoint)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="evaluation data (and calibration data without --calib-data): 'fashion-mnist', "
                        "'fashion-mnist:DIR', an ImageNet-layout root (train/<class>/, val/<class>/; val/ alone with "
                        f"--calib-data) or a class-folder split itself (default {DEFAULT_DATA})")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or auto (a GPU where there is one) for calibration, reconstruction and "
                        "evaluation (default cpu)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader processes decoding image files (default 0: in the main process)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="override the model's input size for preprocessing (as timm's validate script)")
    p.add_argument("--crop-pct", type=float, help="override the centre-crop fraction (timm's crop_pct)")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest"],
                   help="override the resize interpolation")
    p.add_argument("--eval-size", type=int, help="evaluate on the first N images of the test/val split")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation / calibration batch size")
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="calibration sample / training seed; quantize takes several (--seed 0 1 2) to repeat the "
                        "calibration and report mean and std over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """What quantizes: recipe, bits, calibration data and the recipe's edits (quantize, report)."""
    p.add_argument("--recipe", default=None,
                   help=f"recipe name (see `vitq list`) or a recipe YAML file (default {DEFAULT_RECIPE}: the highest "
                        "accuracy we measured; calibration only at 6-8-bit activations, seconds; below that it "
                        "reconstructs, minutes to hours on a CPU; `--recipe repq` for seconds at any width)")
    p.add_argument("--bits", default="W8A8",
                   help="WxAy with x, y in 2..8, e.g. W8A8, W4A4, W4A8; quantize also takes auto / autoA4 (weight bits "
                        "per site under --budget, activations at 8 / 4 bits)")
    p.add_argument("--calib-size", type=int, help="number of calibration images (default: the recipe's)")
    p.add_argument("--calib-data", metavar="DIR",
                   help="calibrate on the images of this folder (flat or nested, no labels, any size / format / colour "
                        "mode; unreadable files are skipped and counted) instead of --data's train split")
    p.add_argument("--exclude", action="append", default=[], metavar="ROLE|REGEX",
                   help="leave sites in float: a role (e.g. HEAD_IN) or a module-name regex; repeatable")
    p.add_argument("--iters", type=int, metavar="N",
                   help="iterations per unit of the recipe's reconstruction passes (trade time for accuracy)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="set_options",
                   help="set a pass option of the recipe (every pass that has it), e.g. --set loss=fisher_diag "
                        "--set slicing=half; repeatable; `vitq list` shows each pass's options")
    p.add_argument("--target", choices=["onnx", "none"],
                   help="quantize for a runtime: sites it has no integer kernel for (at A8 a log2 / log-sqrt2 / TanQ "
                        "post-Softmax) get the nearest integer form before calibration, so the simulated accuracy is "
                        "the deployed one (default: onnx with --export onnx, else none)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-top1-diff", type=float, default=0.1, metavar="POINTS",
                   help="parity check: fail when the export's top-1 differs from the simulated one by more (default 0.1)")
    p.add_argument("--emulate", default="exact", choices=["exact", "uniform8"],
                   help="sites without an integer form (log2 / TanQ post-Softmax, ...): exact float emulation "
                        "(default) or 8-bit uniform post-Softmax (faster, a different quantizer)")
    p.add_argument("--weight-dtype", choices=["uint8", "int8"], default=None,
                   help="onnx: the weight codes' container: uint8 (default; exact on every CPU) or int8 (faster "
                        "matmuls on CPUs with AVX512-VNNI / AVX-VNNI / AMX and on ARM, but onnxruntime's AVX2 "
                        "kernel saturates it: wrong logits on x86 CPUs without VNNI)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of Vision Transformers.")
    ap.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a quantized model, evaluate FP vs quantized top-1")
    _add_model_args(q)
    _add_recipe_args(q)
    q.add_argument("--out", help="save the quantized model (safetensors + vitq.json) and results here")
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

    q.add_argument("--export", choices=["onnx", "vitq"], metavar="FORMAT",
                   help="also write a deployment export into the --out folder (onnx: QDQ graph for onnxruntime, "
                        "model.onnx; vitq: packed integer weights, packed/), verified against the simulated model "
                        "on the evaluation images")
    _add_export_args(q)

    e = sub.add_parser("eval", help="evaluate a model (float, or a vitq export folder) on a dataset")
    _add_model_args(e)

    x = sub.add_parser("export", help="lower a vitq quantize --out folder to a deployment format (onnx) and verify it")
    _add_model_args(x)
    x.add_argument("--format", default="onnx", choices=["onnx", "vitq"],
                   help="onnx: QDQ graph for onnxruntime (default); vitq: packed integer weight codes")
    x.add_argument("--out", help="folder for the exported file and export.json (default: the run folder; "
                                 "for vitq its packed/ subfolder)")
    x.add_argument("--verify", action="store_true",
                   help="evaluate the export in its runtime beside the simulated model on --data (parity check)")
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
    c.add_argument("--calib-size", type=int, help="calibration images (default: each recipe's)")
    c.add_argument("--calib-data", metavar="DIR", help="calibrate on the images of this folder")
    c.add_argument("--iters", type=int, metavar="N", help="reconstruction iterations per unit")
    c.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="set_options",
                   help="set a pass option in every recipe that has it")
    c.add_argument("--target", choices=["onnx", "none"], help="quantize for a runtime (see quantize --target)")
    c.add_argument("--md", metavar="FILE", help="write the table as markdown")
    c.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    c.add_argument("--png", metavar="FILE", help="plot top-1 against bits per recipe")

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
    r.add_argument("--eval-size", type=int, help="evaluate on the first N val images (default all)")
    r.add_argument("--calib-size", type=int, help="calibration images (default: each recipe's)")
    r.add_argument("--calib-data", metavar="DIR", help="calibrate on this image folder instead of train/")
    r.add_argument("--iters", type=int, metavar="N", help="reconstruction iterations per unit (default: the recipe's)")
    r.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto")
    r.add_argument("--workers", type=int, default=0, metavar="N")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", help="write the rows as JSON to this file")
    r.add_argument("--md", help="write the table as markdown to this file")
    r.add_argument("-v", "--verbose", action="store_true")

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
    """Refuse what the arguments alone show to be wrong (sizes, output paths, flags a command ignores),
    before any model or data is loaded: one line each, never after hours of work."""
    from .errors import ConfigError

    for flag, key in (("--batch-size", "batch_size"), ("--eval-size", "eval_size"), ("--num-classes", "num_classes"),
                      ("--calib-size", "calib_size"), ("--iters", "iters")):
        v = getattr(args, key, None)
        if v is not None and v <= 0:
            raise ConfigError(f"{flag} {v}: give a positive number")
    if getattr(args, "workers", 0) < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 (decode in the main process) or more worker processes")
    if args.command == "eval" and getattr(args, "seed", [0]) != [0]:
        raise ConfigError("eval does not calibrate, so --seed changes nothing: drop it (quantize takes --seed)")
    for flag in ("json", "md", "csv", "png", "recipe_out"):
        path = getattr(args, flag, None)
        if path:
            _check_output_file(f"--{flag.replace('_', '-')}", path)
    if getattr(args, "resume_dir", None):
        _check_output_dir("--resume-dir", args.resume_dir)
        _check_resume_args(args)
    out = getattr(args, "out", None)
    if out and args.command in ("quantize", "report", "export"):
        _check_output_dir("--out", out)
        if args.command == "quantize" and (Path(out) / "vitq.json").is_file() and not args.overwrite:
            raise ConfigError(f"--out {out} already holds a saved quantization: pass --overwrite to replace it, or "
                              "another folder")
    exclude = getattr(args, "exclude", None) or []
    from .roles import Role

    roles = {r.value for r in Role}
    for e in exclude:
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", e) and e not in roles:
            raise ConfigError(f"--exclude {e}: no such role; roles are {', '.join(sorted(roles))} (or give a "
                              "module-name regex, e.g. 'blocks\\.0\\.')")


def _check_exclusions(patterns: list[str], model: Any) -> None:
    """A module-name --exclude that matches no module of the model is a typo, not a no-op."""
    from .errors import ConfigError
    from .roles import Role

    roles = {r.value for r in Role}
    names = [n for n, _ in model.named_modules()]
    for p in patterns:
        if p.upper() not in roles and not any(re.search(p, n) for n in names):
            raise ConfigError(f"--exclude {p!r} matches no module of the model (e.g. {names[1] if len(names) > 1 else ''!r}): "
                              "check the pattern, or give a role")


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_output_file(flag: str, path: str) -> None:
    from .errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file name")
    base = _first_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so nothing can be written under it: choose another path")
    try:  # the one honest test of writability (root ignores permission bits; /proc refuses everyone)
        import tempfile

        with tempfile.NamedTemporaryFile(dir=base, prefix=".vitq-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {base} ({e.strerror}): choose a path you can write to") from None


#: the quantize arguments that decide what a reconstruction computes (not where output goes, nor how it is shown)
RESUME_ARGS = ("model", "checkpoint", "random_weights", "num_classes", "data", "input_size", "crop_pct", "interpolation",
               "batch_size", "seed", "recipe", "bits", "calib_size", "calib_data", "exclude", "iters", "set_options",
               "target", "export", "budget", "budget_mb", "sensitivity_size")
RESUME_RECORD = "vitq-args.json"


def _file_identity(path: str) -> Any:
    """A file argument as the resume record keeps it: resolved path, size and modification time (a recipe
    file: its content), so a replaced file is noticed; other values as given."""
    p = Path(path)
    if not p.is_file():
        return path
    if p.suffix in (".yaml", ".yml"):
        import hashlib

        return {"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_resume_args(args: argparse.Namespace) -> None:
    """--resume-dir keeps the arguments of the run that made it (vitq-args.json); once the folder holds saved
    state, a later run with other arguments is refused here, before any loading or calibration, naming what
    differs (the reconstruction's own fingerprint check would only notice after calibration)."""
    from .errors import ConfigError

    here = {k: getattr(args, k, None) for k in RESUME_ARGS}
    for k in ("model", "checkpoint", "recipe", "data", "calib_data"):
        v = here[k]
        if isinstance(v, str):
            here[k] = _file_identity(v)
    here = json.loads(json.dumps(here, default=str))
    rec = Path(args.resume_dir) / RESUME_RECORD
    holds_state = any(p.name != RESUME_RECORD and not p.name.endswith(".tmp") for p in rec.parent.iterdir())
    if rec.is_file() and holds_state:  # without saved state there is nothing to mix up: the record is rewritten
        from .checkpoints import read_record

        old = read_record(rec, "delete that --resume-dir folder to start over, or pass another --resume-dir")
        diff = [k for k in RESUME_ARGS if old.get(k) != here[k]]
        if diff:
            shown = ", ".join(_describe(k, old.get(k), here[k]) for k in diff[:3])
            raise ConfigError(f"--resume-dir {args.resume_dir} holds a run made with {shown}: rerun with its arguments "
                              "to resume, or pass another --resume-dir")
        return
    tmp = rec.with_name(rec.name + ".tmp")
    tmp.write_text(json.dumps(here, indent=1) + "\n")
    tmp.replace(rec)


def _describe(key: str, old: Any, new: Any) -> str:
    flag = "MODEL" if key == "model" else f"--{key.replace('_', '-')}"
    if isinstance(old, dict) and isinstance(new, dict) and old.get("path") == new.get("path"):
        return f"{flag} {old.get('path')} as it was then (the file has changed since)"
    return f"{flag} {_shown(old)} (now {_shown(new)})"


def _shown(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("path", v))
    if isinstance(v, list):
        return " ".join(map(str, v)) or "(none)"
    return "(none)" if v is None else str(v)


def _check_output_dir(flag: str, path: str) -> None:
    from .errors import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file: give a folder (it is created if missing)")
    base = _first_existing(p)
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so no folder can be made under it: choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)  # made now, so a bad place fails before the work, not after
        _check_output_file(flag, str(p / "x"))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create or write the folder ({e.strerror}): choose a folder you can "
                          "write to") from None


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
    import textwrap

    from .adapters import supported_models
    from .passes import all_passes
    from .quantizers import QUANTIZERS
    from .recipes import list_recipes, load_recipe
    from .reference import list_reference_models, reference_fp_top1

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
    from .reproduce import list_protocols, load_protocol

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


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .devices import resolve
    from .models import ModelSource, load_model

    device = resolve(getattr(args, "device", None))  # a missing GPU is one line, before any loading
    p = Path(args.model)
    if p.is_dir() and (p / "vitq.json").is_file():
        from .export import load_quantized

        return load_quantized(p, trust_pickle=args.trust_pickle).to(device), ModelSource("export", str(p))
    model, source = load_model(args.model, checkpoint=args.checkpoint, trust_pickle=args.trust_pickle,
                               random_weights=args.random_weights, num_classes=args.num_classes)
    return model.to(device), source


def _eval_loader(args: argparse.Namespace, model: Any, shard: bool = False) -> Any:
    from . import distributed
    from .adapters import get_adapter
    from .data import DataSpec, build_dataset, check_classes, eval_subset, make_loader
    from .models import transforms

    spec = DataSpec.parse(args.data)
    pre = transforms(model, args.input_size, args.crop_pct, args.interpolation)
    full = build_dataset(spec, "eval", pre)
    check_classes(full, get_adapter(model).num_outputs(model))  # before any image is decoded
    ds = eval_subset(full, args.eval_size)
    if shard:  # torchrun: this rank's block of the test set; evaluate(sharded=True) merges them
        ds = distributed.shard(ds, args.batch_size)
    return spec, pre, make_loader(ds, batch_size=args.batch_size, num_workers=args.workers)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluate import evaluate, peak_rss_mb

    model, source = _load(args)
    _, _, loader = _eval_loader(args, model, shard=True)
    res = evaluate(model, loader, progress=not args.no_progress, sharded=distributed.active())
    out = {"model": args.model, "source": source.to_dict(), "data": args.data, "top1": round(res["top1"], 2),
           "top5": round(res["top5"], 2), "eval_size": res["n"], "eval_seconds": round(res["seconds"], 2),
           "nll": None if res["nll"] is None else round(res["nll"], 5),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    nll = "" if out["nll"] is None else f"  test log-loss {out['nll']:.4f}"
    print(f"{args.model}: top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%{nll}  on {res['n']} images "
          f"({out['eval_seconds']:.1f}s)")
    if distributed.is_main():
        _write_json(args.json, out)
    return 0


def _csv_list(text: Optional[str], what: str) -> list[str]:
    from .errors import ConfigError

    items = [t.strip() for t in (text or "").replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what} is empty: give a comma-separated list")
    return items


def cmd_compare_recipes(args: argparse.Namespace) -> int:
    from .bits import Bits
    from .devices import resolve
    from .errors import ConfigError
    from .insight.compare import compare, plot, to_csv, to_markdown, to_text
    from .recipes import load_recipe, parse_assignments, set_pass_options

    if args.model_b:
        raise ConfigError("give either MODEL_B (compare two models) or --recipes (compare recipes on MODEL), not both")
    bits = [Bits.parse(b) for b in _csv_list(args.bits, "--bits")]
    try:
        seeds = [int(s) for s in _csv_list(args.seeds, "--seeds")] if args.seeds else list(dict.fromkeys(args.seed))
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {args.seeds}: a seed is given twice")
    from .passes import get_pass

    sets = parse_assignments(args.set_options)
    if args.iters is not None:
        sets["iters"] = args.iters
    recipes, used = [], set()
    for name in _csv_list(args.recipes, "--recipes"):
        r = load_recipe(name)
        mine = {k: v for k, v in sets.items() if any(k in get_pass(pc.name).options for pc in r.all_passes())}
        used |= set(mine)
        recipes.append(set_pass_options(r, mine))  # each recipe takes the options its passes have
    if set(sets) - used:
        raise ConfigError(f"no recipe of --recipes has a pass with option(s) {', '.join(sorted(set(sets) - used))}: "
                          "`vitq list` shows each pass's options")
    for flag, path in (("--md", args.md), ("--csv", args.csv), ("--png", args.png), ("--json", args.json)):
        if path and Path(path).is_dir():
            raise ConfigError(f"{flag} {path} is a folder: give a file name")

    if args.calib_size is not None:  # one size for all: every recipe calibrates on the same images
        recipes = [r.with_calib_size(_calib_size(args, r)) for r in recipes]
    sizes = sorted({r.at(b).calib_size for r in recipes for b in bits})  # a size may follow the width (when)
    model, _ = _load(args)
    spec, pre, loader = _eval_loader(args, model)
    calib_sets = {n: _calibration_sets(args, spec, pre, n, seeds, loader.dataset)[0] for n in sizes}  # bad sizes fail here
    res = compare(model, loader, lambda n, s: calib_sets[n][s], recipes, bits, batch_size=args.batch_size,
                  device=resolve(args.device), target=None if args.target in (None, "none") else args.target,
                  progress=not args.no_progress, seeds=seeds)
    print(f"{args.model} on {res['fp']['images']} images of {spec}, {'/'.join(map(str, sizes))} calibration images, "
          f"seeds {', '.join(map(str, seeds))}: FP top-1 {res['fp']['top1']:.2f}%")
    print(to_text(res))
    if args.md:
        Path(args.md).write_text(to_markdown(res))
    if args.csv:
        Path(args.csv).write_text(to_csv(res))
    if args.png:
        plot(res, args.png)
    _write_json(args.json, {"model": args.model, "data": str(spec), **res})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .evaluate import compare_paired, evaluate

    if args.recipes:
        return cmd_compare_recipes(args)
    if not args.model_b:
        raise ConfigError("compare needs MODEL_B (two models) or --recipes R1,R2 (recipes on MODEL)")
    model_a, _ = _load(args)
    args_b = copy.copy(args)
    args_b.model, args_b.checkpoint = args.model_b, args.checkpoint_b
    model_b, _ = _load(args_b)
    _, pre_a, loader_a = _eval_loader(args, model_a)
    _, pre_b, loader_b = _eval_loader(args_b, model_b)
    if pre_a.config != pre_b.config:
        raise ConfigError(f"{args.model} and {args.model_b} preprocess images differently ({pre_a.config} vs "
                          f"{pre_b.config}): compare quantized versions of the same float model")
    progress = not args.no_progress
    ra = evaluate(model_a, loader_a, progress=progress, desc="eval A")
    rb = evaluate(model_b, loader_b, progress=progress, desc="eval B")
    cmp = compare_paired(ra["predictions"], rb["predictions"])
    print(f"A {args.model}: top-1 {ra['top1']:.2f}%\nB {args.model_b}: top-1 {rb['top1']:.2f}%")
    print(cmp.summary("A", "B"))
    _write_json(args.json, {"model_a": args.model, "model_b": args.model_b, "data": args.data, **cmp.to_dict(),
                            "significant_5pct": cmp.significant()})
    return 0


def _export_and_verify(model: Any, out: Path, fmt: str, args: argparse.Namespace, loader: Any = None) -> dict[str, Any]:
    from .export.deploy import export, verify

    rep = export(model, out, fmt, emulate=args.emulate, weight_dtype=getattr(args, "weight_dtype", None))
    low = rep["lowering"]
    if fmt == "vitq":
        print(f"exported {out / rep['file']} ({rep['bytes'] / 1e6:.2f} MB, {rep['bytes'] / rep['float32_state_bytes']:.3f}x "
              f"the float32 state): {rep['packed_weights']} weights as packed integer codes")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(low["counts"].items()))
        kernels = {k: v for k, v in rep.get("runtime_ops", {}).items() if k in _integer_ops()}
        print(f"exported {out / rep['file']} ({rep['bytes'] / 1e6:.2f} MB, {rep['weight_dtype']} weights): sites {counts}; "
              f"integer kernels after onnxruntime's fusions: {', '.join(f'{v} {k}' for k, v in kernels.items()) or 'none'}")
        for fb in low["fallbacks"]:
            print(f"  fallback {fb['site']} ({fb['role']}): {fb['note']}")
    if loader is not None:
        v = verify(model, out, loader, fmt, max_top1_diff=args.max_top1_diff, progress=not args.no_progress)
        rep["verify"] = v
        print(f"  verified on {v['images']} images: {fmt} top-1 {v['exported_top1']:.2f}% vs simulated "
              f"{v['simulated_top1']:.2f}% ({v['top1_diff']:+.2f}), predictions agree on {v['agreement']:.2f}%, "
              f"max |logit diff| {v['max_logit_diff']:.3g} (mean {v['mean_logit_diff']:.3g})")
    return rep


def _subdir(fmt: str) -> str:
    """Where a format goes inside a run folder (the packed format would replace the run's own files)."""
    return "packed" if fmt == "vitq" else ""


def _integer_ops() -> tuple[str, ...]:
    from .export.onnx import INTEGER_OPS

    return INTEGER_OPS


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    p = Path(args.model)
    if not (p.is_dir() and (p / "vitq.json").is_file()):
        raise ConfigError(f"{args.model} is not a vitq quantize --out folder: export the folder a quantization saved "
                          "(vitq quantize MODEL ... --out DIR), or use vitq quantize --export")
    model, _ = _load(args)
    loader = _eval_loader(args, model)[2] if args.verify else None
    rep = _export_and_verify(model, Path(args.out) if args.out else p / _subdir(args.format), args.format, args, loader)
    _write_json(args.json, rep)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import distributed
    from .reproduce import load_protocol, render, reproduce

    protocol = load_protocol(args.protocol)
    rows = reproduce(protocol, args.imagenet, args.weights, models=args.models, recipes=args.recipes, bits=args.bits,
                     eval_size=args.eval_size, calib_size=args.calib_size, calib_data=args.calib_data,
                     seeds=list(dict.fromkeys(args.seed)), iters=args.iters, batch_size=args.batch_size,
                     device=args.device, workers=args.workers, progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    table = render(rows, protocol)
    print("\n" + table)
    _write_json(args.json, {"protocol": protocol.name, "rows": rows})
    if args.md:
        Path(args.md).write_text(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bits import Bits
    from .data import make_loader
    from .devices import resolve
    from .errors import DataError
    from .evaluate import evaluate
    from .insight import first_batches, most_sensitive
    from .insight.report import ReportInputs, write_report
    from .nn import disabled
    from .pipeline import Context, prepare, run_recipe
    from .state import state_of

    for flag, v in (("--sensitivity-size", args.sensitivity_size), ("--error-images", args.error_images)):
        if v <= 0:
            raise DataError(f"{flag} must be positive, got {v}: pass a number of images >= 1")
    device = resolve(args.device)
    seed = args.seed[0]
    p = Path(args.model)
    exported = p.is_dir() and (p / "vitq.json").is_file()
    if not exported:
        bits = Bits.parse(args.bits)
        recipe = _recipe_from_args(args, bits)
        calib_size = _calib_size(args, recipe)
    model, source = _load(args)
    spec, pre, eval_loader = _eval_loader(args, model)
    progress = not args.no_progress
    before = None
    if exported:  # already quantized: report it as it is
        q, st = model, state_of(model)
        assert st is not None and st.bits is not None  # an export is a quantized model
        recipe, bits = st.recipe, st.bits
        calib_seconds = None
    else:
        calib_sets, _ = _calibration_sets(args, spec, pre, calib_size, [seed], eval_loader.dataset)
        calib_size = len(calib_sets[seed])
        before = prepare(copy.deepcopy(model), recipe, bits)  # the float model's sites, before any folding
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        run_recipe(q, recipe, Context(calib=make_loader(calib_sets[seed], batch_size=min(args.batch_size, calib_size),
                                                         num_workers=args.workers),
                                      bits=bits, seed=seed, batch_size=args.batch_size, progress=progress, device=device))
        calib_seconds = round(time.perf_counter() - t0, 2)
    with disabled(q):
        fp = evaluate(q, eval_loader, progress=progress, desc="eval fp")
    res = evaluate(q, eval_loader, progress=progress, desc="eval quantized")
    batches = first_batches(eval_loader, args.sensitivity_size)
    meta = {"model": args.model, "data": str(spec), "recipe": recipe.name, "bits": str(bits), "seed": seed,
            "FP top-1": round(fp["top1"], 2), "quantized top-1": round(res["top1"], 2),
            "drop (points)": round(fp["top1"] - res["top1"], 2), "evaluation images": res["n"],
            "sensitivity images": sum(len(x) for x, _ in batches), "calibration seconds": calib_seconds,
            "source": source.to_dict().get("name")}
    path = write_report(q, batches, args.out, ReportInputs(meta=meta, recipe=recipe.to_dict(), before=before),
                        error_images=args.error_images, progress=progress)
    rep = json.loads((path.parent / "report.json").read_text())
    worst = most_sensitive(rep["sites"])[:5]
    print(f"{args.model} {recipe.name} {bits}: FP top-1 {fp['top1']:.2f}%  quantized {res['top1']:.2f}%  "
          f"({res['n']} images)")
    print("most sensitive sites (only that site quantized): " + "; ".join(
        f"{r['site']} {r['d_top1']:+.2f} pt" + ("" if r["d_nll"] is None else f", {r['d_nll']:+.4f} nats")
        for r in worst))
    print(f"report: {path}")
    _write_json(args.json, {k: v for k, v in rep.items() if k != "recipe"})
    return 0


def _check_mixed_args(args: argparse.Namespace, auto: bool) -> None:
    from .errors import ConfigError

    budgets = [f for f, v in (("--budget", args.budget), ("--budget-mb", args.budget_mb)) if v is not None]
    if not auto:
        if budgets or args.recipe_out:
            raise ConfigError(f"{(budgets or ['--recipe-out'])[0]} chooses bits per site: pass --bits auto (or autoA4)")
        return
    if len(budgets) != 1:
        raise ConfigError("--bits auto needs one budget: --budget BITS (average weight bits, e.g. 4.5) or --budget-mb MB")
    if args.budget is not None and not 3 <= args.budget <= 32:
        raise ConfigError(f"--budget {args.budget}: average weight bits between 3 (all 3-bit) and 32 (all float)")
    if args.budget_mb is not None and args.budget_mb <= 0:
        raise ConfigError(f"--budget-mb {args.budget_mb}: give a positive size in megabytes")
    if args.sensitivity_size <= 0:
        raise ConfigError(f"--sensitivity-size {args.sensitivity_size}: give a number of images >= 1")
    if args.recipe_out and Path(args.recipe_out).is_dir():
        raise ConfigError(f"--recipe-out {args.recipe_out} is a folder: give a file name (e.g. mixed.yaml)")


def _mixed_precision(args: argparse.Namespace, model: Any, recipe: Any, act_bits: int, spec: Any, pre: Any,
                     calib: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """--bits auto: measure per-site weight sensitivity on calibration-source images, allocate bits under
    the budget, and return the mixed-precision recipe (written to --recipe-out) with its record."""
    from collections import Counter

    from .data import build_dataset, calibration_images, calibration_subset, make_loader
    from .insight.compare import calibration_tensor
    from .insight.mixed import allocate, mixed_recipe, recipe_yaml, sensitivity_table

    source: Any = calibration_images(args.calib_data, pre) if args.calib_data else build_dataset(spec, "train", pre)
    n = min(args.sensitivity_size, len(source))
    probe = calibration_subset(source, n, seed + 1)  # another draw than the calibration sample; never eval images
    images = [b[0] if isinstance(b, (list, tuple)) else b for b in make_loader(probe, batch_size=args.batch_size)]
    table = sensitivity_table(model, recipe, act_bits, calibration_tensor(calib), images, seed=seed,
                              batch_size=args.batch_size, progress=not args.no_progress)
    alloc = allocate(table, budget_bits=args.budget, budget_mb=args.budget_mb)
    mixed = mixed_recipe(recipe, model, alloc)
    counts = Counter(alloc["bits"].values())
    print(f"mixed precision: {len(alloc['bits'])} weight sites, "
          + ", ".join(f"{counts[k]} at {k}{'' if k == 'float' else ' bits'}" for k in ("3", "4", "6", "8", "float")
                      if counts[k])
          + f"; average {alloc['avg_bits']:.2f} bits ({alloc['weight_mb']:.3f} MB of weight codes), chosen by "
            f"{alloc['method']} over output KL measured on {table['images']} calibration-source images")
    if args.recipe_out:
        Path(args.recipe_out).write_text(recipe_yaml(mixed))
        print(f"mixed-precision recipe: {args.recipe_out}")
    return mixed, {"allocation": alloc, "sensitivity": table}


def _exclusions(patterns: list[str]) -> list[tuple[str, str, None]]:
    from .roles import Role

    out: list[tuple[str, str, None]] = []
    roles = {r.value for r in Role}
    for p in patterns:
        if p.upper() in roles:
            out.append(("role", p.upper(), None))
        else:
            out.append(("*", p, None))
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from . import distributed
    from .bits import Bits
    from .data import make_loader
    from .devices import resolve
    from .evaluate import compare_paired, compare_pooled, evaluate, peak_rss_mb
    from .export import save_quantized
    from .insight.mixed import parse_auto_bits
    from .pipeline import Context, manifest, run_recipe
    from .state import state_of

    auto_a = parse_auto_bits(args.bits)
    bits = Bits(8, auto_a) if auto_a is not None else Bits.parse(args.bits)  # cheap inputs first, before loading
    _check_mixed_args(args, auto_a is not None)
    device = resolve(args.device)
    recipe = _recipe_from_args(args, bits)
    calib_size = _calib_size(args, recipe)

    seeds = list(dict.fromkeys(args.seed))
    if args.export and not args.out:
        from .errors import ConfigError

        raise ConfigError(f"--export {args.export} writes into the --out folder: pass --out DIR")
    if args.export == "onnx":
        from .export.onnx import require

        for pkg in ("onnx", "onnxruntime", "onnxscript"):
            require(pkg)  # a missing package is one line now, not after calibration
    if args.out and len(seeds) > 1:
        from .errors import ConfigError

        raise ConfigError(f"--out saves one model but {len(seeds)} seeds were given: pass a single --seed with --out")

    model, source = _load(args)
    _check_exclusions(args.exclude, model)
    spec, pre, eval_loader = _eval_loader(args, model, shard=True)
    sharded = distributed.active()
    progress = not args.no_progress
    calib_sets, skipped = _calibration_sets(args, spec, pre, calib_size, seeds, eval_loader.dataset)
    calib_size = len(calib_sets[seeds[0]])  # what it calibrates on (a recipe's size is a ceiling)
    mixed = None
    if auto_a is not None:
        recipe, mixed = _mixed_precision(args, model, recipe, auto_a, spec, pre, calib_sets[seeds[0]], seeds[0])

    fp = None
    if not args.skip_fp:
        fp = evaluate(model, eval_loader, progress=progress, desc="eval fp", sharded=sharded)
    runs: list[dict[str, Any]] = []
    qmodel: Any = None
    for seed in seeds:
        calib_loader = make_loader(calib_sets[seed], batch_size=min(args.batch_size, calib_size),
                                   num_workers=args.workers)
        qm = copy.deepcopy(model)
        t0 = time.perf_counter()
        ctx = Context(calib=calib_loader, bits=bits, seed=seed, batch_size=args.batch_size, progress=progress,
                      device=device)
        run_recipe(qm, recipe, ctx)
        secs = time.perf_counter() - t0
        res = evaluate(qm, eval_loader, progress=progress, desc=f"eval quantized (seed {seed})", sharded=sharded)
        runs.append({"seed": seed, "res": res, "calib_seconds": secs,
                     "vs_fp": None if fp is None else compare_paired(fp["predictions"], res["predictions"])})
        if qmodel is None:
            qmodel = qm  # the first seed's model gives the manifest and the export
        if len(seeds) > 1:
            print(f"  seed {seed}: quantized top-1 {res['top1']:.2f}%  (calib {secs:.1f}s)")
    q, vs_fp, calib_seconds = runs[0]["res"], runs[0]["vs_fp"], runs[0]["calib_seconds"]
    top1s = [r["res"]["top1"] for r in runs]
    q_top1 = sum(top1s) / len(top1s)
    q_std = statistics.stdev(top1s) if len(top1s) > 1 else None

    result: dict[str, Any] = {
        "model": args.model, "source": source.to_dict(), "data": str(spec), "recipe": recipe.name,
        "bits": str(bits), "calib_size": calib_size, "eval_size": q["n"], "seed": seeds[0],
        "fp_top1": None if fp is None else round(fp["top1"], 2), "q_top1": round(q_top1, 2),
        "fp_top5": None if fp is None else round(fp["top5"], 2), "q_top5": round(q["top5"], 2),
        "drop": None if fp is None else round(fp["top1"] - q_top1, 2),
        "calib_seconds": round(calib_seconds, 2), "eval_seconds": round(q["seconds"], 2),
        "fp_eval_seconds": None if fp is None else round(fp["seconds"], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "device": str(device),
        "preprocessing": {**asdict(pre.config), "transform": pre.source},
        "calib_data": args.calib_data, "calib_skipped": skipped, "mixed_precision": mixed,
        "vs_fp": None if vs_fp is None else vs_fp.to_dict(), "recipe_config": recipe.to_dict(), "manifest": manifest(qmodel),
    }
    if len(seeds) > 1:
        # top-level numbers are over all seeds: mean top-1 and calibration time; each seed's own test vs FP
        result.update(seeds=seeds, q_top1_std=round(q_std or 0.0, 3), q_top5=None, vs_fp=None,
                      calib_seconds=round(sum(r["calib_seconds"] for r in runs) / len(runs), 2), per_seed=[
            {"seed": r["seed"], "q_top1": round(r["res"]["top1"], 2), "q_top5": round(r["res"]["top5"], 2),
             "calib_seconds": round(r["calib_seconds"], 2),
             "vs_fp": None if r["vs_fp"] is None else r["vs_fp"].to_dict()} for r in runs])
        if fp is not None:  # the mean over seeds against FP, tested once (the seeds share the test images)
            result["vs_fp_pooled"] = compare_pooled([(fp["predictions"], r["res"]["predictions"]) for r in runs])
    st = state_of(qmodel)
    if st is not None and st.reconstruction:
        result["reconstruction"] = st.reconstruction
    n_q = sum(1 for m in result["manifest"] if m["quantizer"] != "float")
    fp_txt = "-" if fp is None else f"{fp['top1']:.2f}"
    drop_txt = "" if fp is None else f"  (drop {fp['top1'] - q_top1:+.2f})"
    q_txt = f"{q_top1:.2f}%" if q_std is None else f"{q_top1:.2f} ± {q_std:.2f}% (mean ± std over {len(seeds)} seeds)"
    print(f"{args.model} {recipe.name} {bits}: FP top-1 {fp_txt}%  quantized top-1 {q_txt}{drop_txt}  "
          f"[{n_q}/{len(result['manifest'])} sites quantized, calib {calib_seconds:.1f}s, "
          f"{q['n']} eval images, peak RSS {result['peak_rss_mb']:.0f} MB]")
    for r in runs:
        if r["vs_fp"] is not None:
            tag = "quantized" if len(runs) == 1 else f"seed {r['seed']}"
            print(textwrap.indent(r["vs_fp"].summary("FP", tag), "  "))
    if result.get("vs_fp_pooled"):
        pl = result["vs_fp_pooled"]
        p_txt = "" if pl["p_value"] is None else f" (pooled p = {pl['p_value']:.3g})"
        nll_txt = "" if pl["nll_p"] is None else f"; test log-loss {pl['nll_diff']:+.4f} nats (pooled p = {pl['nll_p']:.3g})"
        print(f"  mean over {pl['seeds']} seeds, quantized - FP: {pl['diff']:+.2f} points{p_txt}{nll_txt}; "
              "one test over the seeds, which share the test images")
    if not distributed.is_main():
        return 0  # rank 0 writes the files (and verifies the export on the whole test set)
    if args.out:
        out = save_quantized(qmodel, args.out, source, extra={"result": {k: v for k, v in result.items()
                                                                         if k not in ("manifest", "recipe_config")}})
        (Path(out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if mixed is not None and not args.recipe_out:
            from .insight.mixed import recipe_yaml

            (Path(out) / "recipe.yaml").write_text(recipe_yaml(recipe))
            print(f"mixed-precision recipe: {Path(out) / 'recipe.yaml'} (vitq quantize --recipe {Path(out) / 'recipe.yaml'} "
                  f"--bits {bits} runs it again)")
        print(f"saved to {out}")
        if args.export:
            st = state_of(qmodel)
            if st is not None and st.source is None and source.kind != "export":
                st.source = source
            full = _eval_loader(args, qmodel)[2] if sharded else eval_loader
            rep = _export_and_verify(qmodel, Path(out) / _subdir(args.export), args.export, args, full)
            result["export"] = {k: rep[k] for k in ("format", "file", "bytes", "lowering", "runtime_ops", "verify")
                                if k in rep}
    _write_json(args.json, result)
    return 0


def _recipe_from_args(args: argparse.Namespace, bits: Any) -> Any:
    """The recipe quantize / report run: --recipe, --exclude, --set, --iters / --max-cache-gb /
    --resume-dir, then --target (or --export onnx)."""
    from .errors import ConfigError
    from .recipes import load_recipe, override_pass_options, parse_assignments, set_pass_options

    recipe = load_recipe(args.recipe or DEFAULT_RECIPE).at(bits)  # width-conditional rules first: --exclude,
    if args.recipe is None:                                          # --target and --set win over them
        _default_notice(recipe, bits, args)
    excl = _exclusions(args.exclude)
    recipe = recipe.with_overrides([e for e in excl if e[0] != "role"])
    role_excl = [e[1] for e in excl if e[0] == "role"]
    if role_excl:
        recipe = _exclude_roles(recipe, role_excl)
    flags = {"iters": args.iters, "max_cache_gb": getattr(args, "max_cache_gb", None),
             "run_dir": getattr(args, "resume_dir", None)}
    sets = parse_assignments(args.set_options)
    both = sorted(k for k, v in flags.items() if v is not None and k in sets)
    if both:
        raise ConfigError(f"{', '.join(both)} given both as a flag and with --set: use one of them")
    recipe = override_pass_options(set_pass_options(recipe, sets), **flags)
    target = args.target or ("onnx" if getattr(args, "export", None) == "onnx" else "none")
    if target != "none":
        from .recipes import for_target

        recipe, changes = for_target(recipe, bits, target)
        for line in changes:
            print(f"target {target}: {line}")
    return recipe


def _default_notice(recipe: Any, bits: Any, args: argparse.Namespace) -> None:
    """One line when the default recipe (not asked for by name) will reconstruct: what it costs, and the fast one."""
    from .passes import get_pass
    from .recipes import parse_assignments

    steps = [pc for pc in recipe.passes if "iters" in get_pass(pc.name).options]
    if not steps:
        return
    given = args.iters if args.iters is not None else parse_assignments(args.set_options).get("iters")
    iters = int(given) if given is not None else max(int(pc.opts.iters) for pc in steps)
    print(f"recipe {recipe.name} (the default) at {bits}: {len(steps)} reconstruction stage(s) of {iters} iterations per "
          f"block, for the last points of accuracy: minutes on a GPU (--device cuda), tens of minutes for a small model "
          f"and hours for a ViT-B on a CPU; --recipe {FAST_RECIPE} takes seconds",
          flush=True)


def _calib_size(args: argparse.Namespace, recipe: Any) -> int:
    calib_size = args.calib_size if args.calib_size is not None else recipe.calib_size
    if calib_size <= 0:
        from .errors import DataError

        raise DataError(f"calibration size must be positive, got {calib_size}: pass --calib-size N with N >= 1")
    return int(calib_size)


def _calibration_sets(args: argparse.Namespace, spec: Any, pre: Any, calib_size: int, seeds: list[int],
                      eval_data: Any = None) -> tuple[dict[int, Any], list[str]]:
    """Each seed's calibration sample (from --calib-data or --data's train split; bad sizes fail here)
    and the unreadable files skipped; --data's train split must have the evaluation split's classes."""
    from .data import build_dataset, calibration_images, calibration_subset, check_classes, folder_classes

    train: Any = calibration_images(args.calib_data, pre) if args.calib_data else build_dataset(spec, "train", pre)
    if not args.calib_data and eval_data is not None:
        check_classes(eval_data, None, train)
    if getattr(args, "calib_size", None) is None and 0 < len(train) < calib_size:
        # the recipe's own size (best: 1024) is a ceiling, not a demand: a user's few dozen images calibrate it
        print(f"calibration images: the recipe takes up to {calib_size}, the source has {len(train)}: using all "
              f"{len(train)} (--calib-size N to choose)")
        calib_size = len(train)
    calib_sets = {seed: calibration_subset(train, calib_size, seed) for seed in seeds}
    skipped = sorted({f for c in calib_sets.values() for f in c.skipped})
    folder = args.calib_data or (folder_classes(train) or (None,))[0]
    if folder is not None:
        print(f"calibration images: {calib_size} of the {len(train)} image files under {folder}"
              + (f" ({len(skipped)} unreadable, skipped: {', '.join(Path(f).name for f in skipped[:3])}"
                 f"{', ...' if len(skipped) > 3 else ''})" if skipped else ""))
    return calib_sets, skipped


def _exclude_roles(recipe: Any, roles: list[str]) -> Any:
    from dataclasses import replace

    rules = dict(recipe.rules)
    for r in roles:
        rules[f"act:{r}"] = None
        rules[f"weight:{r}"] = None
    return replace(recipe, rules=tuple(rules.items()))


def _write_json(path: Optional[str], obj: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")  # written whole, then renamed: never a truncated file
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(p)


if __name__ == "__main__":
    raise SystemExit(main())
