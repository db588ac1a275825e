"""Reconstruction: AdaRound / BRECQ / QDrop engine, slicings into units, losses, caches."""

from .adaround import AdaRoundWeight, beta_at, init_v, rectified_sigmoid, round_loss
from .engine import RECON_DEFAULTS, ReconConfig, Reconstructor, collect_images, float_copy, reconstruct
from .losses import LOSSES, get_loss, lp_loss, register_loss
from .outliers import boundary_outlier_ratios, proxy_score
from .slicing import Slicing, blocks_per_unit, describe_units

__all__ = [
    "AdaRoundWeight", "LOSSES", "RECON_DEFAULTS", "ReconConfig", "Reconstructor", "Slicing", "beta_at",
    "blocks_per_unit", "boundary_outlier_ratios", "collect_images", "describe_units", "float_copy", "get_loss",
    "init_v", "lp_loss", "proxy_score", "reconstruct", "rectified_sigmoid", "register_loss", "round_loss",
]
