"""The results index: ``bench/results/README.md``, one line per results page - what it answers, whether it is
current or superseded (and by what), and the caveats a reader needs before quoting it. Superseded pages live
under ``bench/results/archive/``. Every page must have an entry here (tests/test_bench.py checks), so a new
benchmark page cannot land unlisted.

    .venv/bin/python -m bench.index
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

from bench.common import RESULTS, md_table, write_md

ARCHIVE = RESULTS / "archive"

#: page -> (what it answers, what produces it). Current unless listed in SUPERSEDED.
PAGES: dict[str, tuple[str, str]] = {
    "best.md": ("the default recipe `best` against repq and dopq (and `best-1204`) on all six models, W4A4 / W3A3",
                "bench/best.py"),
    "best_budget.md": ("`best`'s drop against its reconstruction budget (100 / 300 / 1000 iterations), with paired "
                       "intervals and the weights-only / activations-only split", "bench/best_budget.py"),
    "best_parts.md": ("which parts make `best` at W3A3 (V-2SF post-GELU, a power-of-two attention grid, QDrop stage 3)",
                      "bench/best.py with bench/recipes/parts-*"),
    "baselines.md": ("every calibration-only baseline recipe on all six models, W8A8 to W3A3", "bench/baselines.py"),
    "fallback_cost.md": ("what a float fallback costs in onnxruntime: each kind at every block of DeiT-S against the "
                         "all-integer file (the CLI's fallback lines cite it)", "bench/studies/fallback_cost.py"),
    "glu_out.md": ("quantizers on a SwiGLU's gated product (GLU_OUT): why no recipe puts a post-GELU quantizer there",
                   "bench/studies/glu_out.py"),
    "int4_weights.md": ("4-bit weights stored in 4 bits (INT4 + Cast, vitq's file since 2026-12-06) against 8-bit "
                        "containers and a 4-bit DequantizeLinear: size, ops after fusion, speed in onnxruntime and "
                        "OpenVINO; file sizes at DeiT-S scale", "bench/studies/int4_weights.py"),
    "new_families.md": ("calibration-only recipes (and dopq at W8A8) on the EVA-02- and SigLIP-style reference models "
                        "and their outlier twins, W8A8 / W4A4 / W3A3", "bench/baselines.py --name new_families"),
    "new_families_dinov2.md": ("every recipe (reconstruction at 200 iterations per unit) on the DINOv2-style encoder "
                               "and its twin, W8A8 / W4A4 / W3A3: k-NN top-1 and the embeddings' agreement with the "
                               "float model", "bench/baselines.py --name new_families_dinov2"),
    "peers.md": ("vitq's baselines beside the peers' own code (RepQ-ViT, PTQ4ViT, FQ-ViT), 3 seeds, paired tests",
                 "bench/peers.py"),
    "peers_ablation.md": ("the peers' code with one quantizer left out: the causes of the remaining gaps",
                          "bench/peers.py --ablate"),
    "reconstruction.md": ("brecq / qdrop / oas / *-repq at 200 iterations per unit, all six models", "bench/recon.py"),
    "reconstruction_seed1.md": ("the same, calibration seed 1", "bench/recon.py --seed 1 --name reconstruction_seed1"),
    "reconstruction_seed2.md": ("the same, calibration seed 2", "bench/recon.py --seed 2 --name reconstruction_seed2"),
    "recon_variants.md": ("the complete-RepQ start (`qdrop-repqfull`) beside the reconstruction rows",
                          "bench/recon.py --recipes qdrop-repqfull --name recon_variants"),
    "recon_budget.md": ("does 5x the reconstruction iterations change the W4A4 ranking?", "bench/studies/recon_budget.py"),
    "recon_speed.md": ("what float masks instead of torch.where buy reconstruction (bit-identical)",
                       "bench/studies/recon_speed.py"),
    "published_20k.md": ("qdrop and oas as shipped: 20k iterations per unit, published learning rates",
                         "bench/studies/significance.py --group published"),
    "granularity.md": ("the reconstruction-granularity curve (OAS slicings), W4A4", "bench/granularity.py"),
    "oas_guard.md": ("OAS's held-out validation with and without the guard", "bench/studies/oas_guard.py"),
    "significance.md": ("paired significance of the open accuracy targets, pooled over seeds",
                        "bench/studies/significance.py"),
    "dopq.md": ("DopQ-ViT pipelines (repq, dopq-calib, dopq) and the MOSF ablation, 2000 test images",
                "bench/dopq.py"),
    "dopq_eval10k.md": ("the same on all 10 000 test images", "bench/dopq.py --eval-size 10000 --name dopq_eval10k"),
    "dopq_eval10k_iters300.md": ("dopq at 300 iterations per unit per stage, 10 000 images",
                                 "bench/dopq.py --name dopq_eval10k_iters300"),
    "dopq_calib1024.md": ("dopq on 1024 calibration images (the paper's count)", "bench/dopq.py --name dopq_calib1024"),
    "dopq_seed1.md": ("dopq, calibration seed 1", "bench/dopq.py --seed 1 --name dopq_seed1"),
    "dopq_seed2.md": ("dopq, calibration seed 2", "bench/dopq.py --seed 2 --name dopq_seed2"),
    "softmax_quantizers.md": ("which post-Softmax quantizer at 3 / 4 / 6 bits (only ATTN_PROBS quantized)",
                              "bench/studies/softmax_quantizers.py"),
    "tsptq.md": ("TSPTQ-ViT (V-2SF, O-2SF) and its ablations, fully quantized", "bench/baselines.py --name tsptq"),
    "tsptq_eval10k.md": ("TSPTQ-ViT W8A8 on all 10 000 images: Hessian-guided against MSE-only V-2SF choice",
                         "bench/baselines.py --name tsptq_eval10k"),
    "two_scale_act.md": ("twin uniform and V-2SF on real post-Softmax / post-GELU values",
                         "bench/studies/two_scale_act.py"),
    "o2sf_layernorm.md": ("O-2SF against per-tensor and PTF on real LayerNorm inputs", "bench/studies/two_scale_ln.py"),
    "aocq.md": ("AOCQ (Add_alpha, LN_alpha, two-stage optimisation) on all six models, 2000 test images",
                "bench/aocq.py"),
    "aocq_new_families.md": ("FQ-ViT and AOCQ (fully quantized) at W8A8 / W4A4 / W3A3 on the EVA-02-, SigLIP- and "
                             "DINOv2-style models (the encoder by k-NN) and their twins, 10 000 test images",
                             "bench/aocq.py table --models fmnist-eva fmnist-siglip ... --bits W8A8 W4A4 W3A3 "
                             "--eval-size 10000 --name aocq_new_families"),
    "aocq_eval10k.md": ("AOCQ on the plain models, all 10 000 test images", "bench/aocq.py table --eval-size 10000 --name aocq_eval10k"),
    "fqvit_collapse.md": ("why fqvit falls to chance at 4 / 3 bits: which fully-quantized site breaks it",
                          "bench/studies/fqvit_collapse.py"),
    "mixed_precision.md": ("per-site weight bits under a budget (`--bits auto`) against uniform widths",
                           "bench/mixed_precision.py"),
    "hf_parity.md": ("Hugging Face models against their timm twins: the same quantized logits", "bench/hf_parity.py"),
    "export_parity.md": ("simulated top-1 against the exported files in onnxruntime and the packed format, A8",
                         "bench/export_parity.py"),
    "export_parity_a4.md": ("the same at W4A4 / W3A3 with the sub-8-bit QDQ lowering", "bench/export_parity.py --out"),
    "deploy.md": ("speed and accuracy of vitq's default files in onnxruntime and OpenVINO beside onnxruntime's "
                  "quantize_static / quantize_dynamic, NNCF's INT8 and PT2E, one host (AMX / VNNI)", "bench/deploy.py"),
    "deploy_epyc_2026-12-05.md": ("speed and accuracy in onnxruntime beside its own quantize_static and PT2E, an "
                                  "AVX-512 VNNI AMD host (the uint8-default era)", "bench/deploy.py"),
    "recon_new_families.md": ("reconstruction recipes (brecq, qdrop, oas, qdrop-repq, oas-repq) on the EVA-02- and "
                              "SigLIP-style reference models and their twins, W8A8 / W4A4 / W3A3",
                              "bench/recon.py --name recon_new_families"),
    "openvino_attention.md": ("OpenVINO and vitq's attention: best, symmetric weights, symmetric q / k beside NNCF's "
                              "INT8 (speed, attention subgraph precision, layer times; W8A8 accuracy of the recipes)",
                              "bench/studies/openvino_attention.py"),
    "openvino_fq.md": ("OpenVINO: vitq's OpenVINO form (--format openvino) step by step against NNCF's INT8, DeiT-S "
                       "W8A8 / W4A8", "bench/studies/openvino_fq.py"),
    "openvino_profile.md": ("where OpenVINO spends its time on vitq's ONNX files and on NNCF's INT8 model, by layer "
                            "kind (DeiT-S, batch 1)", "bench/studies/openvino_profile.py"),
    "best_a8.md": ("the default recipe at 8-bit activations: uniform 8-bit post-Softmax and symmetric q / k / 8-bit "
                   "weights (all-integer files OpenVINO runs on its INT8 kernels) against its former forms "
                   "(best-asym8, dopq-calib's TanQ), W8A8 / W4A8, ten reference models",
                   "bench/baselines.py --name best_a8"),
    "export_parity_new_families.md": ("export parity on the EVA-02-, SigLIP- and DINOv2-style reference models and "
                                      "their twins (onnx, uniform8, packed, @onnx; the encoder by k-NN and embedding "
                                      "cosine)", "bench/export_parity.py --out"),
    "deploy_avx2.md": ("the same on an AVX2-only host, with int8-weight rows", "bench/deploy.py --out"),
    "peers_before.md": ("vitq repq beside RepQ-ViT's code before repq's post-Softmax zero code", "bench/peers.py"),
    "recon_cost.md": ("reconstruction seconds per 1k iterations per unit kind, and a DeiT-S sized model",
                      "bench/recon_cost.py"),
}

#: archived page -> (what supersedes it, why)
SUPERSEDED: dict[str, tuple[str, str]] = {
    "peers_before.md": ("peers.md", "measured before `repq`'s post-Softmax zero code (2026-12-03), which closed most "
                                    "of the gap it shows"),
    "deploy_epyc_2026-12-05.md": ("deploy.md", "another host (AMD EPYC, AVX-512 VNNI), uint8 weight containers and "
                                                "repq / dopq-calib rows: re-run on 2026-12-06 with the new defaults "
                                                "(best, auto containers) and the OpenVINO / NNCF / quantize_dynamic rows"),
    "recon_cost.md": ("recon_speed.md, published_20k.md", "seconds measured before the float-mask engine (2026-12-02: "
                                                          "QDrop blocks train 1.55-1.65x faster); its memory and "
                                                          "DeiT-S cache figures still hold"),
}

#: current pages whose figures predate a change that may move them: what a reader must know
CAVEATS: dict[str, str] = {
    "export_parity.md": "int8 weight containers on a VNNI host, before the uint8 default (2026-12-05)",
    "deploy.md": "DeiT-S timed in one run and the reference models in a second one on the same host; speed is for "
                 "DeiT-S only",
    "deploy_avx2.md": "predates the sub-8-bit QDQ lowering (2026-12-06)",
    "best.md": "`best-1204` and the W4A4 `repq` column are older compositions, labelled in the page",
    "dopq.md": "the dopq recipe; the default is `best` since 2026-12-05 (best.md)",
}


def _date(path: Path) -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], capture_output=True, text=True,
                         cwd=RESULTS.parents[1])
    return out.stdout.strip() or "not committed"


def _machine(page: Path) -> Optional[str]:
    js = page.with_suffix(".json")
    if not js.is_file():
        return None
    try:
        meta = json.loads(js.read_text()).get("meta", {})
    except (json.JSONDecodeError, AttributeError):
        return None
    m = meta.get("machine")
    return None if not m else f"{m}" + (f" ({meta['cpu_capability']})" if meta.get("cpu_capability") else "")


def pages() -> tuple[list[Path], list[Path]]:
    return sorted(RESULTS.glob("*.md")), sorted(ARCHIVE.glob("*.md"))


def render() -> list[str]:
    current, archived = pages()
    lines = ["# Benchmark results: the index", "",
             "Generated by `bench/index.py`. Every page of `bench/results/`: what it answers, what produces it, when it "
             "was last written and on which machine (where its JSON says). **Current** pages describe what the code "
             "does today (a caveat says where a later change may move their figures); **superseded** pages are kept "
             "under `archive/` for the history the docs cite, with what replaced them. Figures from different machines "
             "are not comparable for speed; accuracy differs between hosts by a few tenths at W3A3.", "",
             "## Current", ""]
    rows = []
    for p in current:
        if p.name == "README.md":
            continue
        what, how = PAGES[p.name]
        rows.append([f"[{p.name}]({p.name})", what, f"`{how}`", _date(p), _machine(p) or "-", CAVEATS.get(p.name, "")])
    lines += md_table(["page", "answers", "made by", "written", "machine", "caveat"], rows, align="llllll")
    lines += ["", "## Superseded (in `archive/`)", ""]
    rows = []
    for p in archived:
        by, why = SUPERSEDED[p.name]
        what, how = PAGES[p.name]
        rows.append([f"[{p.name}](archive/{p.name})", what, by, why, _date(p)])
    lines += md_table(["page", "answered", "superseded by", "why", "written"], rows, align="lllll")
    return lines


def main() -> None:
    write_md(RESULTS / "README.md", render(), echo=True)


if __name__ == "__main__":
    main()
