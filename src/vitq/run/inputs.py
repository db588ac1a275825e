"""What a run reads: the model (a reference name, a library's MODEL, a pickle, or a run folder) and its
data - the evaluation split and the calibration source - with the model's own preprocessing.

**No run reads data the model was not made for.** ``data=None`` means: the data a run folder recorded
(:attr:`vitq.state.QuantState.run`, sealed in its ``vitq.json``), Fashion-MNIST for a reference model (or a
run folder made from one), and otherwise a one-line error asking for ``--data``. Given or recorded, the
data must fit the model (:func:`check_fit`: Fashion-MNIST's grey images and 10 classes; a class-folder
split with no more classes than the head scores) before any image is decoded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..adapters import ModelSource, get_adapter
from ..data import (
    DataSpec,
    Transforms,
    build_dataset,
    calibration_images,
    calibration_subset,
    check_classes,
    eval_subset,
    folder_classes,
    make_loader,
)
from ..data.fashion import FASHION_MNIST_CLASSES
from ..devices import resolve
from ..errors import ConfigError, DataError
from ..models import load_model, transforms
from ..state import state_of

#: how the data of a run was chosen
GIVEN, RECORDED, REFERENCE = "given", "recorded", "reference"


def is_run_folder(model: str) -> bool:
    """A ``vitq quantize --out`` folder (or any vitq export folder): it holds ``vitq.json``."""
    p = Path(model)
    return p.is_dir() and (p / "vitq.json").is_file()


def load(model: str, checkpoint: Optional[str] = None, trust_pickle: bool = False, random_weights: bool = False,
         num_classes: Optional[int] = None, device: Any = None) -> tuple[nn.Module, ModelSource]:
    """The model MODEL names, on ``device``, and its source (``export`` for a run folder)."""
    dev = resolve(device)  # a missing GPU is one line, before any loading
    if is_run_folder(model):
        from ..export import load_quantized

        for flag, v in (("--checkpoint", checkpoint), ("--num-classes", num_classes)):
            if v:
                raise ConfigError(f"{model} is a vitq run folder with its own weights and head: drop {flag}")
        return load_quantized(model, trust_pickle=trust_pickle).to(dev), ModelSource("export", str(model))
    m, source = load_model(model, checkpoint=checkpoint, trust_pickle=trust_pickle, random_weights=random_weights,
                           num_classes=num_classes)
    return m.to(dev), source


@dataclass(frozen=True)
class DataChoice:
    """The data a command reads: ``spec``; the preprocessing overrides (``input_size``, ``crop_pct``,
    ``interpolation``; None = the model's own); ``origin``: given, recorded (by the run folder) or
    reference (Fashion-MNIST, the reference models' own)."""

    spec: DataSpec
    input_size: Optional[tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    origin: str = GIVEN

    def describe(self) -> str:
        return f"{self.spec}" + ("" if self.origin == GIVEN else f" ({self.origin})")


def recorded(model: nn.Module) -> Optional[dict[str, Any]]:
    """The run record a model loaded from a run folder carries (data, preprocessing, calibration), or None."""
    st = state_of(model)
    return None if st is None else st.run


def is_reference_model(model: nn.Module, source: ModelSource) -> bool:
    """A Fashion-MNIST reference model, or an export made from one."""
    if source.kind == "reference":
        return True
    st = state_of(model)
    return st is not None and st.source is not None and st.source.kind == "reference"


def choose_data(model_arg: str, model: nn.Module, source: ModelSource, data: Optional[str] = None,
                input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None) -> DataChoice:
    """The data a command on ``model`` reads: ``data`` when given, else the run folder's recorded data (with its
    preprocessing overrides, unless given now), else Fashion-MNIST for a reference model; anything else is a
    one-line error. The choice is checked against the model (:func:`check_fit`)."""
    size = None if input_size is None else tuple(int(v) for v in input_size)
    rec = recorded(model)
    if data is not None:
        choice = DataChoice(DataSpec.parse(data), size, crop_pct, interpolation, GIVEN)  # type: ignore[arg-type]
    elif rec is not None and rec.get("data"):
        where = str(rec["data"])
        try:
            spec = DataSpec.parse(where)
        except DataError:
            raise DataError(f"{model_arg} was quantized on {where}, which is not there any more: pass --data DIR "
                            "(the model's own evaluation images)") from None
        rsize = rec.get("input_size")
        choice = DataChoice(spec, size if size is not None else (None if rsize is None else tuple(rsize)),  # type: ignore[arg-type]
                            crop_pct if crop_pct is not None else rec.get("crop_pct"),
                            interpolation if interpolation is not None else rec.get("interpolation"), RECORDED)
    elif is_reference_model(model, source):
        choice = DataChoice(DataSpec.parse("fashion-mnist"), size, crop_pct, interpolation, REFERENCE)  # type: ignore[arg-type]
    else:
        what = "a vitq run folder that recorded no data" if is_run_folder(model_arg) else "not a reference model"
        raise ConfigError(f"{model_arg} is {what}, so there is no data to default to: pass --data (an ImageNet-layout "
                          "folder or a class-folder split of the model's own images)")
    check_fit(model, choice.spec, model_arg)
    return choice


def task_of(model: nn.Module, task: str = "auto", knn_bank: Optional[int] = None) -> str:
    """``classify`` or ``features``: ``auto`` is features for a model without a classification head (an encoder:
    ``num_classes=0``, DINOv2 / CLIP / SigLIP towers). ``knn_bank``: the --knn-bank the user gave (None: not given),
    refused for a model evaluated by its head, where it would be ignored."""
    if task != "auto":
        if task == "classify" and get_adapter(model).num_outputs(model) is None:
            raise ConfigError("--task classify: the model has no classification head; it is an encoder: use --task "
                              "features (k-NN and embedding agreement)")
        found = task
    else:
        found = "features" if get_adapter(model).num_outputs(model) is None else "classify"
    if found == "classify" and knn_bank is not None:
        raise ConfigError(f"--knn-bank {knn_bank} sizes an encoder's k-NN memory bank, and this model is evaluated by its "
                          "classification head: drop --knn-bank (or pass --task features to evaluate its embeddings)")
    return found


def check_fit(model: nn.Module, spec: DataSpec, model_arg: str = "the model") -> None:
    """Refuse data the model was not made for, before any image is decoded: Fashion-MNIST (grey 28x28
    images, 10 classes) for a model that takes another number of channels or scores another number of
    classes. (Class folders are checked against the head when the split is built: ``check_classes``.)"""
    if spec.kind != "fashion-mnist":
        return
    adapter = get_adapter(model)
    c = adapter.data_config(model).input_size[0]
    n = adapter.num_outputs(model)
    if c != 1 or (n is not None and n != len(FASHION_MNIST_CLASSES)):
        took = f"{c}-channel images" + ("" if n is None else f" and scores {n} classes")
        raise DataError(f"{spec} holds grey (1-channel) images of {len(FASHION_MNIST_CLASSES)} classes, but {model_arg} "
                        f"takes {took}: pass --data with the model's own images (an ImageNet-layout folder or a "
                        "class-folder split)")


def preprocessing(model: nn.Module, choice: DataChoice) -> Transforms:
    return transforms(model, choice.input_size, choice.crop_pct, choice.interpolation)


def eval_loader(model: nn.Module, choice: DataChoice, pre: Transforms, eval_size: Optional[int] = None,
                batch_size: int = 64, workers: int = 0, shard: bool = False) -> DataLoader:
    """The evaluation split (its first ``eval_size`` images), checked against the head; ``shard``: this
    rank's contiguous block under torchrun (``evaluate(sharded=True)`` merges them)."""
    full = build_dataset(choice.spec, "eval", pre)
    check_classes(full, get_adapter(model).num_outputs(model))  # before any image is decoded
    ds: Dataset = eval_subset(full, eval_size)
    if shard:
        ds = distributed.shard(ds, batch_size)
    return make_loader(ds, batch_size=batch_size, num_workers=workers)


@dataclass
class Opened:
    """A model and the data a command reads: what ``eval``, ``export --verify``, ``report`` and ``compare`` open."""

    model: nn.Module
    source: ModelSource
    choice: DataChoice
    pre: Transforms
    loader: DataLoader


def open_model_and_data(model: str, data: Optional[str] = None, *, checkpoint: Optional[str] = None,
                        trust_pickle: bool = False, random_weights: bool = False, num_classes: Optional[int] = None,
                        device: Any = None, input_size: Optional[Sequence[int]] = None, crop_pct: Optional[float] = None,
                        interpolation: Optional[str] = None, eval_size: Optional[int] = None, batch_size: int = 64,
                        workers: int = 0, shard: bool = False) -> Opened:
    """:func:`load` the model, :func:`choose_data` for it, and the evaluation loader with its preprocessing."""
    m, source = load(model, checkpoint, trust_pickle, random_weights, num_classes, device)
    choice = choose_data(model, m, source, data, input_size, crop_pct, interpolation)
    pre = preprocessing(m, choice)
    return Opened(m, source, choice, pre, eval_loader(m, choice, pre, eval_size, batch_size, workers, shard))


def open_spec(spec: Any, data: Optional[str] = None, shard: bool = False) -> Opened:
    """:func:`open_model_and_data` for a :class:`~vitq.run.RunSpec` (``data`` overrides the spec's)."""
    return open_model_and_data(spec.model, data if data is not None else spec.data, checkpoint=spec.checkpoint,
                               trust_pickle=spec.trust_pickle, random_weights=spec.random_weights,
                               num_classes=spec.num_classes, device=spec.device, input_size=spec.input_size,
                               crop_pct=spec.crop_pct, interpolation=spec.interpolation, eval_size=spec.eval_size,
                               batch_size=spec.batch_size, workers=spec.workers, shard=shard)


@dataclass
class CalibrationSource:
    """Where calibration images come from: ``--calib-data``'s folder or the data's train split; ``sample(n,
    seed)`` draws the seeded sample (unreadable files skipped and counted)."""

    dataset: Any
    folder: Optional[str]

    def sample(self, n: int, seed: int, at_most: bool = False) -> Any:
        return calibration_subset(self.dataset, n, seed, at_most)

    def __len__(self) -> int:
        return len(self.dataset)


def calibration_source(choice: DataChoice, pre: Transforms, calib_data: Optional[str] = None,
                       eval_data: Any = None) -> CalibrationSource:
    """``--calib-data DIR`` (any folder of images), or the data's train split (whose class folders must be
    the evaluation split's)."""
    if calib_data:
        return CalibrationSource(calibration_images(calib_data, pre), calib_data)
    train = build_dataset(choice.spec, "train", pre)
    if eval_data is not None:
        check_classes(eval_data, None, train)
    fc = folder_classes(train)
    return CalibrationSource(train, None if fc is None else str(fc[0]))


def sample_record(sets: dict[int, Any]) -> dict[str, Any]:
    """What a run calibrated on, to record: per seed the files (image folders) or the indices of the split."""
    out: dict[str, Any] = {}
    for seed, cs in sets.items():
        base = getattr(cs, "dataset", None)
        files = getattr(base, "files", None)
        idx = list(getattr(cs, "indices", []))
        out[str(seed)] = {"files": [str(files[i]) for i in idx]} if files is not None else {"indices": idx}
    return out


def preprocessing_record(pre: Transforms) -> dict[str, Any]:
    """The resolved preprocessing (the model's own with any overrides) and the transform that applies it."""
    return {**asdict(pre.config), "transform": pre.source}


def record_of(choice: DataChoice, pre: Transforms, calib_data: Optional[str], calib_size: int,
              seeds: Sequence[int], sets: Optional[dict[int, Any]] = None,
              spec: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The run record a run folder keeps (``QuantState.run``): the data and preprocessing overrides later
    commands reuse, the resolved preprocessing, the calibration source and sample, the seeds and the spec."""
    return {"data": str(choice.spec), "input_size": None if choice.input_size is None else list(choice.input_size),
            "crop_pct": choice.crop_pct, "interpolation": choice.interpolation,
            "preprocessing": preprocessing_record(pre), "calib_data": calib_data, "calib_size": calib_size,
            "seeds": list(seeds), "calib_sample": sample_record(sets) if sets else None, "spec": spec}


__all__ = ["GIVEN", "RECORDED", "REFERENCE", "CalibrationSource", "DataChoice", "Opened", "open_model_and_data", "open_spec", "calibration_source", "check_fit",
           "choose_data", "eval_loader", "task_of", "is_reference_model", "is_run_folder", "load", "preprocessing",
           "preprocessing_record", "record_of",
           "recorded"]
