"""Insight into a quantized model: per-site error and sensitivity (``sites``), the HTML report
(``report``), mixed precision under a budget (``mixed``) and multi-recipe comparisons (``compare``).
Above the pipeline, below the CLI."""

from .sites import (
    first_batches,
    levels,
    most_sensitive,
    only,
    quantized_sites,
    site_errors,
    site_samples,
    site_sensitivity,
)

__all__ = ["first_batches", "levels", "most_sensitive", "only", "quantized_sites", "site_errors", "site_samples", "site_sensitivity"]
