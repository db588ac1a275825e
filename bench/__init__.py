"""vitq's benchmark suite: thin drivers of the library, run from the repository root as ``python -m bench.NAME``.

Standing benchmarks (their figures are in ``bench/results/``): ``baselines``, ``recon``, ``dopq``, ``aocq``,
``granularity``, ``best``, ``best_budget`` (best's W3A3 drop against its reconstruction budget),
``mixed_precision``, ``deploy``, ``export_parity``, ``hf_parity``, ``recon_cost``, ``gpu``, ``peers`` (vitq beside
the peers' own code: RepQ-ViT, PTQ4ViT, FQ-ViT), and ``index`` (bench/results/README.md: every results page,
current or superseded). One-off investigations are in ``bench/studies/``.
Shared plumbing and the one report writer: ``bench.common``.
"""
