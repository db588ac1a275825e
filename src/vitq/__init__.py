"""vitq: post-training quantization of Vision Transformers (timm and Hugging Face ViT / DeiT / Swin).

    import vitq
    model, _ = vitq.load_model("fmnist-vit")
    qmodel = vitq.quantize(model, recipe="repq", bits="W4A4", calib_data=images)   # in memory, in place
    vitq.evaluate(qmodel, (images, labels))                                         # top-1, top-5, log-loss
    vitq.export(qmodel, "out/", format="onnx")                                      # model.onnx for onnxruntime
    vitq.export(qmodel, "ov/", format="openvino")                                   # model.xml for OpenVINO

    result = vitq.run(model="fmnist-vit", recipe="repq", bits="W4A4")              # what `vitq quantize` runs
"""

from . import _startup

_previous_sigint = _startup.begin()  # the command line: Ctrl-C during the imports is one line, exit 130

from . import adapters as _adapters  # noqa: F401  (registers adapters)
from . import evaluate, export, run  # callable modules: vitq.evaluate(...), vitq.export(...), vitq.run(...)
from . import quantizers as _quantizers  # noqa: F401  (registers quantizers)
from .bits import Bits
from .defaults import DEFAULT_BITS, DEFAULT_RECIPE
from .errors import VitqError
from .export import load_quantized, save_quantized
from .models import ModelSource, data_config, load_model, transforms
from .nn import calibrate, disabled
from .pipeline import Context, calibrating, manifest, prepare, quantize, run_recipe, wrap
from .recipes import Recipe, list_recipes, load_recipe
from .run import RunResult, RunSpec
from .state import QuantState, state_of

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BITS", "DEFAULT_RECIPE", "Bits", "Context", "ModelSource", "QuantState", "Recipe", "RunResult", "RunSpec",
    "VitqError", "calibrate", "calibrating", "data_config", "disabled", "evaluate", "export", "list_recipes",
    "load_model", "load_quantized", "load_recipe", "manifest", "prepare", "quantize", "run", "run_recipe",
    "save_quantized", "state_of", "transforms", "wrap", "__version__",
]

_startup.end(_previous_sigint)
