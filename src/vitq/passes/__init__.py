"""Method steps, registered by name (:mod:`.registry`). Importing the package registers every pass:
calibrate; tanq_calibrate; ptq4vit_search; reparam; reconstruct; oas; aocq_balance; aocq_act_scales."""

from . import calibrate, oas, outlier, ptq4vit, reconstruct, repq, scale_search, tanq_calib  # noqa: F401  (registration)
from .registry import PASSES, PassInfo, PassOptions, all_passes, get_pass, parse_options, register_pass

__all__ = ["PASSES", "PassInfo", "PassOptions", "all_passes", "get_pass", "parse_options", "register_pass"]
