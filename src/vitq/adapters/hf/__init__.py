"""Hugging Face transformers: the library (MODEL = ``hf:DIR``, a local ``save_pretrained`` folder;
nothing is downloaded) and its families, ViT / DeiT (:mod:`.vit`) and Swin (:mod:`.swin`).

``transformers`` is an optional extra (``pip install vitq[hf]``): without it these adapters match
nothing and ``hf:DIR`` is a one-line error. Models are built with ``attn_implementation="eager"``
so that the float model vitq evaluates is exactly the wrapped model with quantization disabled.

Preprocessing comes from the folder's ``preprocessor_config.json`` (the image processor's own
settings), kept on the model as ``vitq_preprocessor`` and in an export's build config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from torch import Tensor, nn

from ...checkpoints import short_error
from ...data import PreprocessConfig, fit_channels
from ...data.preprocess import torchvision_image_transform
from ...errors import DataError, ModelError
from ..base import Adapter, ModelLibrary, ModelSource, register_library

PREFIX = "hf:"
#: the model classes vitq has adapters for, by the name ``config.json``'s ``architectures`` uses
SUPPORTED = ("ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
             "SwinForImageClassification", "ViTModel", "DeiTModel", "Dinov2Model", "Dinov2ForImageClassification",
             "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "CLIPVisionModel",
             "CLIPVisionModelWithProjection", "SiglipVisionModel", "SiglipForImageClassification",
             "ViTMSNForImageClassification", "ViTMSNModel",
             "BeitForImageClassification", "BeitModel", "SwinModel",
             "Swinv2ForImageClassification", "Swinv2Model", "Data2VecVisionForImageClassification",
             "Data2VecVisionModel")
#: PIL resample codes of image-processor configs -> interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN / STD), for configs that leave them out
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_INSTALL = "install the Hugging Face extra: pip install 'vitq[hf]' (or pip install transformers)"


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(f"Hugging Face models need the transformers package: {_INSTALL}") from None
    return transformers


def model_class(name: str) -> Any:
    """A supported transformers model class by name. Importing a model module imports torchao when it is installed
    (vitq's bench extra), whose enum registrations make torch log two deprecation warnings on stderr; they say
    nothing about the user's model, so that logger is quiet while the class is imported."""
    import logging

    if name not in SUPPORTED:
        raise ModelError(f"Hugging Face architecture {name} is not supported: vitq supports {', '.join(SUPPORTED)}")
    tf = _transformers()
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        return getattr(tf, name)
    finally:
        pytree.setLevel(level)


class HFLibrary(ModelLibrary):
    name = "hf"
    usage = "hf:DIR (a local Hugging Face save_pretrained folder)"

    def claims(self, model: str) -> bool:
        return model.startswith(PREFIX)

    def load(self, model: str, checkpoint: Optional[str] = None, random_weights: bool = False,
             num_classes: Optional[int] = None) -> tuple[nn.Module, ModelSource]:
        if checkpoint:
            raise ModelError(f"{model} holds its own weights (model.safetensors): drop --checkpoint")
        if num_classes is not None:
            raise ModelError(f"{model} takes its classifier size from its config.json: drop --num-classes")
        folder = Path(model[len(PREFIX):]).expanduser()
        if folder.is_file():
            raise ModelError(f"{folder} is a file: hf:DIR takes the folder save_pretrained wrote (config.json, "
                             "model.safetensors, preprocessor_config.json)")
        if not folder.is_dir():
            raise ModelError(f"Hugging Face model folder {folder} does not exist: pass hf:DIR with a local "
                             "save_pretrained folder (nothing is downloaded)")
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json): pass the folder "
                             "model.save_pretrained() wrote")
        tf = _transformers()
        try:
            config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises ValueError / OSError / KeyError for foreign configs
            raise ModelError(f"{cfg_file} cannot be read as a transformers config ({short_error(e)}): "
                             "pass a save_pretrained folder") from None
        arch = _architecture(config, cfg_file)
        cls = model_class(arch)
        if not random_weights and not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
            raise ModelError(f"{folder} has no weights (model.safetensors): save the model with "
                             "save_pretrained, or pass --random-weights for cost measurements only")
        bars = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()  # vitq shows its own progress; no per-file bars
        verbosity = tf.utils.logging.get_verbosity()
        # weights that do not fit the config are vitq's one-line error (check_loading_info), not transformers'
        # multi-line report: it loads with ignore_mismatched_sizes so that it returns them instead of raising
        tf.utils.logging.set_verbosity_error()
        try:
            if random_weights:
                m = cls(config)
            else:
                m, info = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
        except Exception as e:  # truncated weights
            raise ModelError(f"transformers cannot load {folder} as {arch} ({short_error(e)}): "
                             "re-save the folder with save_pretrained") from None
        finally:
            tf.utils.logging.set_verbosity(verbosity)
            if bars:
                tf.utils.logging.enable_progress_bar()
        if not random_weights:
            check_loading_info(folder, arch, info)
        if not random_weights and not (folder / "preprocessor_config.json").is_file():
            raise ModelError(f"{folder} has no preprocessor_config.json: the image preprocessing (size, mean, std) "
                             "would be guessed; save the model's image processor beside it (processor.save_pretrained"
                             f"('{folder}'))")
        pre = read_preprocessor(folder)
        source = ModelSource("hf", model, build_config=build_config(m, pre))
        return finish(m, pre), source

    def build(self, source: ModelSource) -> nn.Module:
        bc = source.build_config or {}
        if "config" not in bc or "architecture" not in bc:
            raise ModelError(f"the source of {source.name} has no Hugging Face build config: re-export the model "
                             "with this vitq")
        cls = model_class(str(bc["architecture"]))
        config = cls.config_class.from_dict(dict(bc["config"]))
        return finish(cls(config), bc.get("preprocessor"))

    def source_of(self, model: nn.Module) -> Optional[ModelSource]:
        """A transformers model carries its config: the build config rebuilds it (its image-processor settings
        too when vitq loaded it; the processor defaults otherwise)."""
        if not any(c.__name__ in SUPPORTED for c in type(model).__mro__) or not hasattr(model, "config"):
            return None
        return ModelSource("hf", f"<{type(model).__name__} in memory>",
                           build_config=build_config(model, getattr(model, "vitq_preprocessor", None)))


register_library(HFLibrary())


def check_loading_info(folder: Path, arch: str, info: dict[str, Any]) -> None:
    """Refuse a folder whose weights do not match its config: transformers initializes missing weights at random
    (and drops unexpected ones) with only a notice; a result computed on those is not the user's model."""

    def few(keys: Any) -> str:
        ks = sorted(str(k) for k in keys)
        return ", ".join(ks[:4]) + (f" (+{len(ks) - 4} more)" if len(ks) > 4 else "")

    parts = []
    if info.get("missing_keys"):
        parts.append(f"missing weights {few(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        parts.append(f"unexpected weights {few(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        def shape(k: Any) -> str:  # transformers gives (name, shape in the weights, shape the config makes)
            if isinstance(k, tuple) and len(k) == 3:
                return f"{k[0]} {list(k[1])} in the weights, {list(k[2])} by the config"
            return str(k[0] if isinstance(k, tuple) else k)

        parts.append(f"weights of another shape: {few(shape(k) for k in info['mismatched_keys'])}")
    if info.get("error_msgs"):
        parts.append(str(info["error_msgs"][0]).splitlines()[0])
    if parts:
        raise ModelError(f"{folder}: the weights do not match its config.json ({arch}): {'; '.join(parts)}: fix "
                         "config.json or re-save the folder with save_pretrained (transformers would fill missing or "
                         "misshapen weights at random)")


def _architecture(config: Any, where: Path) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in SUPPORTED:
            return a
    found = ", ".join(archs) if archs else f"a {type(config).__name__} without architectures"
    raise ModelError(f"{where} describes {found}: vitq supports {', '.join(SUPPORTED)} "
                     "(save an image-classification model with save_pretrained)")


def finish(m: Any, preprocessor: Optional[dict[str, Any]]) -> nn.Module:
    """Eager attention (the float function vitq's wrapped model reproduces exactly), eval mode, and
    the image-processor settings the data config reads."""
    m.config._attn_implementation = "eager"
    m.vitq_preprocessor = dict(preprocessor or {})
    return m.eval()


def read_preprocessor(folder: Path) -> dict[str, Any]:
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} is not valid JSON ({e}): fix or re-save it") from None
    if not isinstance(d, dict):
        raise ModelError(f"{p} must hold a JSON object: re-save it with the image processor's save_pretrained")
    return d


def build_config(m: Any, preprocessor: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What rebuilds the architecture without the folder: class, config, image-processor settings."""
    return {"architecture": type(m).__name__ if type(m).__name__ in SUPPORTED else _base_name(m),
            "config": m.config.to_dict(), "preprocessor": dict(preprocessor or {})}


def _base_name(m: Any) -> str:
    for c in type(m).__mro__:
        if c.__name__ in SUPPORTED:
            return c.__name__
    raise ModelError(f"{type(m).__name__} is not a supported Hugging Face model")


def _per_channel(pre: dict[str, Any], key: str, default: Any, channels: int) -> tuple[float, ...]:
    """The image processor's ``image_mean`` / ``image_std``: one value per input channel of the model (or one value
    for every channel); another count is the processor of another model."""
    v = pre.get(key)
    if v is None:
        return fit_channels(tuple(float(x) for x in default), channels)
    vals = (v,) if isinstance(v, (int, float)) else tuple(v) if isinstance(v, (list, tuple)) else None
    if vals is None or not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
        raise ModelError(f"{key} in preprocessor_config.json must be a number or a list of numbers, got {v!r}")
    if len(vals) not in (1, channels):
        raise ModelError(f"{key} in preprocessor_config.json has {len(vals)} values for a model of {channels} input "
                         f"channel(s): it is another model's image processor; give {channels} value(s)")
    if not all(math.isfinite(x) for x in vals) or (key == "image_std" and not all(x > 0 for x in vals)):
        want = "positive numbers (images are divided by them)" if key == "image_std" else "finite numbers"
        raise ModelError(f"{key} in preprocessor_config.json is {list(vals)}: give {want}")
    return tuple(float(x) for x in vals) * (channels if len(vals) == 1 else 1)


def hf_num_outputs(model: Any) -> Optional[int]:
    """A transformers image classifier's class count (``config.num_labels``)."""
    n = getattr(getattr(model, "config", None), "num_labels", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def hf_data_config(model: Any, num_channels: int, image_size: tuple[int, int], any_size: bool = False) -> PreprocessConfig:
    """The preprocessing of a Hugging Face model from its image-processor settings: resize to
    ``size`` (height x width, or the shorter side to ``shortest_edge``), centre crop to ``crop_size`` when
    ``do_center_crop``, rescale by 1/255, normalise with ``image_mean`` / ``image_std`` (the ViT / DeiT / DINOv2
    image processors' pipeline). ``any_size``: the model interpolates its position embeddings (DINOv2), so its
    input size is what the processor makes, not the config's ``image_size``."""
    pre: dict[str, Any] = dict(getattr(model, "vitq_preprocessor", None) or {})
    if pre.get("do_rescale", True) is False:
        raise ModelError("the image processor does not rescale pixel values (do_rescale: false): vitq feeds images "
                         "scaled to [0, 1]; set do_rescale: true in preprocessor_config.json")
    size = _hw(pre.get("size"), image_size)
    crop = _hw(pre.get("crop_size"), size) if pre.get("do_center_crop", False) else size
    if any_size:
        image_size = crop
    if crop != image_size:
        raise ModelError(f"the image processor makes {crop[0]}x{crop[1]} inputs but the model is built for "
                         f"{image_size[0]}x{image_size[1]}: fix size / crop_size in preprocessor_config.json")
    if pre.get("do_resize", True) is False:
        size = crop
    # PreprocessConfig resizes both sides to crop / crop_pct: exact when the resize keeps the crop's aspect
    crop_pct = crop[0] / size[0]
    if abs(crop[1] / size[1] - crop_pct) > 1e-9:
        raise ModelError(f"the image processor resizes to {size[0]}x{size[1]} and crops {crop[0]}x{crop[1]} "
                         "(different ratios per side): not supported yet")
    if pre.get("do_normalize", True) is False:
        mean, std = (0.0,) * num_channels, (1.0,) * num_channels
    else:
        mean = _per_channel(pre, "image_mean", _DEFAULT_MEAN, num_channels)
        std = _per_channel(pre, "image_std", _DEFAULT_STD, num_channels)
    return PreprocessConfig(input_size=(int(num_channels), int(image_size[0]), int(image_size[1])),
                            mean=mean, std=std, interpolation=_RESAMPLE.get(int(pre.get("resample", 2)), "bilinear"),
                            crop_pct=float(crop_pct))


def hf_image_transform(model: Any, cfg: PreprocessConfig) -> tuple[Callable[[Any], Tensor], str]:
    """The model's own image processor (``AutoImageProcessor`` on its ``preprocessor_config.json``
    settings): PIL image -> ``pixel_values``. A folder without one gets vitq's transform of the data
    config. The CLI's size / crop / interpolation overrides are refused: they are the processor's."""
    pre: dict[str, Any] = dict(getattr(model, "vitq_preprocessor", None) or {})
    own = hf_data_config(model, cfg.input_size[0], (cfg.input_size[1], cfg.input_size[2]))
    if cfg != own:
        raise DataError("--input-size / --crop-pct / --interpolation apply to timm models; a Hugging Face model is "
                        "preprocessed by its image processor: edit size / crop_size / resample in its "
                        "preprocessor_config.json")
    if not pre.get("image_processor_type"):
        return torchvision_image_transform(cfg), "torchvision (vitq.data.Preprocess; no image processor saved)"
    import tempfile

    try:
        from transformers import AutoImageProcessor
    except ImportError:
        raise ModelError(f"Hugging Face models need transformers: {_INSTALL}") from None
    with tempfile.TemporaryDirectory() as tmp:  # the processor's own resolution of its settings
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(pre))
        try:
            proc = AutoImageProcessor.from_pretrained(tmp)
        except (ValueError, OSError, TypeError, KeyError) as e:
            raise ModelError(f"transformers cannot build the image processor {pre['image_processor_type']} "
                             f"({str(e).splitlines()[0]}): fix preprocessor_config.json") from None

    def transform(img: Any) -> Tensor:
        return proc(images=img, return_tensors="pt")["pixel_values"][0]

    return transform, f"transformers {type(proc).__name__}"


def _hw(size: Any, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        if "shortest_edge" in size and len(size) == 1:
            # the shorter side to S, the aspect kept: what PreprocessConfig's resize does with crop / crop_pct = S
            return (int(size["shortest_edge"]), int(size["shortest_edge"]))
    raise ModelError(f"image-processor size {size!r} is not understood: use {{height: H, width: W}}")


def config_image_size(config: Any) -> tuple[int, int]:
    s = config.image_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def at(prefix: str, rest: str) -> str:
    """A sub-module's name under the base model: ``prefix.rest``, or ``rest`` when the model is the base itself."""
    return f"{prefix}.{rest}" if prefix else rest


class HFAdapter(Adapter):
    """What every Hugging Face family adapter shares. ``MODELS``: transformers class name -> (the attribute that holds
    the base model, "" when the model is the base; the family's head: whether it has a classifier, or what its head
    is called). A model is matched by a class of those names (its own or a base class) in transformers' modules; the
    preprocessing comes from its image processor (:func:`hf_data_config`)."""

    library = "hf"
    MODELS: ClassVar[dict[str, tuple[str, Any]]] = {}

    @classmethod
    def model_name(cls, model: Any) -> Optional[str]:
        for c in type(model).__mro__:
            if c.__name__ in cls.MODELS and c.__module__.startswith("transformers."):
                return c.__name__
        return None

    @classmethod
    def matches(cls, model: Any) -> bool:
        return transformers_available() and cls.model_name(model) is not None

    def _parts(self, model: Any) -> tuple[str, Any, Any]:
        """``(prefix, base model, head)`` of ``model`` (see ``MODELS``)."""
        name = self.model_name(model)
        assert name is not None
        prefix, head = self.MODELS[name]
        return prefix, (getattr(model, prefix) if prefix else model), head

    def num_outputs(self, model: Any) -> Optional[int]:
        return hf_num_outputs(model) if self._parts(model)[2] else None  # an encoder has no classes

    def data_config(self, model: Any) -> PreprocessConfig:
        return hf_data_config(model, int(model.config.num_channels), config_image_size(model.config))

    def image_transform(self, model: Any, cfg: PreprocessConfig) -> tuple[Callable[[Any], Tensor], str]:
        return hf_image_transform(model, cfg)


from . import beit, clip, data2vec, dinov2, siglip, swin, swinv2, vit  # noqa: E402,F401  (registration of the families)
