"""The run layer: a run specified once (:class:`RunSpec`), executed in one place (:func:`run`, built on
:func:`trial` / :func:`quantize_copy`), reported in one format (:mod:`vitq.run.record`), and remembered by the
folder it is saved to (:mod:`vitq.run.inputs`: commands on a run folder use its recorded data).

It sits above the pipeline and ``insight`` (mixed precision, the report) and below the CLI; ``vitq compare``
(:mod:`vitq.run.compare`), ``vitq reproduce``, ``vitq report`` and the benches all quantize through it.

    spec = vitq.RunSpec(model="fmnist-vit", recipe="repq", bits="W4A4", seeds=(0, 1, 2))
    result = vitq.run(spec)            # result.record: what `vitq quantize --json` writes

This package is callable: ``vitq.run(spec)`` is :func:`vitq.run.run` (``vitq.run.record`` etc. stay modules).
"""

from .execute import RunResult, check_exclusions, default_notice, quantize_copy, refuse_quantized, run, trial
from .inputs import DataChoice, check_fit, choose_data, is_run_folder
from .record import RESULT_SCHEMA, Trial, make_record, manifest_digest, measured
from .resume import RESUME_RECORD, check_resume
from .spec import DEFAULT_MODEL, RunSpec

__all__ = ["DEFAULT_MODEL", "RESULT_SCHEMA", "RESUME_RECORD", "DataChoice", "RunResult", "RunSpec", "Trial",
           "check_exclusions", "check_fit", "check_resume", "choose_data", "default_notice", "is_run_folder",
           "make_record", "manifest_digest", "measured", "quantize_copy", "refuse_quantized", "run", "trial"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, "run")  # vitq.run(spec) is run(spec)
