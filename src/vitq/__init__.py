"""vitq: post-training quantization of Vision Transformers (timm and Hugging Face ViT / DeiT / Swin).

    import vitq
    model, _ = vitq.load_model("fmnist-vit")
    qmodel = vitq.quantize(model, recipe="minmax", bits="W4A4", calib_data=images)
"""

from . import adapters as _adapters  # noqa: F401  (registers adapters)
from . import quantizers as _quantizers  # noqa: F401  (registers quantizers)
from .bits import Bits
from .errors import VitqError
from .export import load_quantized, save_quantized
from .models import data_config, load_model
from .nn import calibrate, disabled
from .pipeline import Context, manifest, prepare, quantize, run_recipe, wrap
from .recipes import Recipe, list_recipes, load_recipe
from .state import QuantState, state_of

__version__ = "0.1.0"

__all__ = [
    "Bits", "Context", "QuantState", "Recipe", "VitqError", "calibrate", "data_config", "disabled", "list_recipes", "load_model",
    "load_quantized", "load_recipe", "manifest", "prepare", "quantize", "run_recipe", "save_quantized", "state_of", "wrap",
    "__version__",
]
