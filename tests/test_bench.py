"""The benchmark suite as a package: every benchmark imports as ``bench.NAME`` (no ``sys.path`` edits), and
the one report writer in ``bench.common`` writes what the result pages are made of."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDING = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))
STUDIES = sorted(p.stem for p in (ROOT / "bench" / "studies").glob("*.py") if p.stem != "__init__")


def test_the_suite_is_the_documented_one():
    # bench/__init__.py names the standing benchmarks and studies/README.md has a line per study
    doc = importlib.import_module("bench").__doc__
    assert set(re.findall(r"``([a-z_0-9]+)``", doc)) >= set(STANDING), "bench/__init__.py does not list every benchmark"
    readme = (ROOT / "bench" / "studies" / "README.md").read_text()
    for s in STUDIES:
        assert f"| `{s}` |" in readme, f"bench/studies/README.md has no line for {s}"


@pytest.mark.parametrize("name", [f"bench.{s}" for s in STANDING] + [f"bench.studies.{s}" for s in STUDIES])
def test_every_benchmark_imports_as_a_module_with_a_main(name):
    mod = importlib.import_module(name)
    assert callable(getattr(mod, "main", None)), f"{name} has no main()"


def test_no_benchmark_edits_sys_path():
    for p in list((ROOT / "bench").rglob("*.py")) + list((ROOT / "scripts").glob("*.py")):
        assert "sys.path" not in p.read_text(), f"{p.relative_to(ROOT)} edits sys.path: import bench.common instead"


def test_md_table_and_writers(tmp_path):
    from bench.common import machine_line, md_table, write_json, write_md

    lines = md_table(["model", "top-1"], [["vit", "86.30"], ["deit", None]])
    assert lines == ["| model | top-1 |", "|---|---:|", "| vit | 86.30 |", "| deit | - |"]
    assert md_table(["a", "b"], [], align="ll")[1] == "|---|---|"
    with pytest.raises(ValueError, match="row lengths"):
        md_table(["a", "b"], [["x"]])
    write_md(tmp_path / "r.md", ["# t", "", *lines])
    assert (tmp_path / "r.md").read_text() == "# t\n\n" + "\n".join(lines) + "\n"
    write_json(tmp_path / "r.json", {"rows": [1]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1]}
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"
    assert machine_line({"machine": "x86_64 X", "cpu_capability": "AVX512", "torch": "2", "threads": 1}) == \
        "Machine: x86_64 X (AVX512), torch 2, 1 thread(s)."


def test_save_rows_merges_and_stamps_only_new_rows(tmp_path):
    from bench.common import save_rows

    path = tmp_path / "t.json"
    old = {"model": "vit", "recipe": "minmax", "bits": "W8A8", "q_top1": 86.0, "machine": "elsewhere"}
    save_rows(path, [old], {"title": "t"}, key=("model", "recipe", "bits"))
    new = {"model": "vit", "recipe": "repq", "bits": "W8A8", "q_top1": 86.2}
    save_rows(path, [new], {"title": "t"}, key=("model", "recipe", "bits"))
    rows = {r["recipe"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"minmax", "repq"}, "the earlier row was lost"
    assert rows["minmax"]["machine"] == "elsewhere", "a row passed through was re-stamped with this machine"
    assert "machine" in rows["repq"] and rows["repq"]["machine"] != "elsewhere"


def test_baselines_table_renders_the_merged_rows(tmp_path):
    import bench.baselines as b

    row = {"model": "fmnist-vit", "recipe": "minmax", "bits": "W4A4", "fp_top1": 86.3, "q_top1": 80.24, "drop": 6.06,
           "calib_size": 32, "eval_size": 10000, "seed": 0, "calib_seconds": 0.4, "peak_rss_mb": 900.0}
    b.write(tmp_path / "x.json", [row], None)
    b.write(tmp_path / "x.json", [{**row, "bits": "W8A8", "q_top1": 86.27, "drop": 0.03}], None)
    md = (tmp_path / "x.md").read_text()
    assert "| fmnist-vit | minmax | W8A8 | 86.30 | 86.27 | +0.03 |" in md
    assert "| fmnist-vit | minmax | W4A4 | 86.30 | 80.24 | +6.06 |" in md
    assert md.index("W8A8") < md.index("W4A4"), "rows are not ordered by bits, widest first"


def test_best_merge_keeps_the_other_bit_widths(tmp_path):
    import bench.best as best

    def res(bits, top1):
        return {"fp": {"top1": 88.0}, "recipes": ["repq"], "bits": [bits],
                "rows": [{"recipe": "repq", "bits": bits, "seeds": [0], "mean": top1}],
                "runs": [{"recipe": "repq", "bits": bits, "seed": 0, "top1": top1}]}

    p = tmp_path / "m.json"
    p.write_text(json.dumps(res("W3A3", 75.0)))
    merged = best._merge(p, res("W4A4", 85.0))
    assert {r["bits"] for r in merged["rows"]} == {"W3A3", "W4A4"} and merged["bits"] == ["W4A4", "W3A3"]
    p.write_text(json.dumps(merged))
    again = best._merge(p, res("W4A4", 85.5))
    assert [r["mean"] for r in again["rows"] if r["bits"] == "W4A4"] == [85.5], "a re-measured row was not replaced"
    other = res("W4A4", 85.0)
    other["fp"] = {"top1": 87.0}
    with pytest.raises(SystemExit, match="float evaluation differs"):
        best._merge(p, other)


def test_peer_glue_keeps_the_float_function_and_maps_swin_keys():
    # PTQ4ViT's net_wrap reaches a Linear by its last name: the heads are put under ``head`` without changing
    # the function; FQ-ViT's Swin loads the official layout (downsample at the end of the stage, ``head``)
    import copy

    import torch
    from bench.peers import _swin_state, ptq4vit_shim

    from vitq.reference import load_reference

    for name in ("fmnist-deit", "fmnist-swin"):
        model = load_reference(name).eval()
        shimmed = ptq4vit_shim(copy.deepcopy(model))
        linear_names = {n.rsplit(".", 1)[-1] for n, m in shimmed.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linear_names <= {"qkv", "proj", "fc1", "fc2", "head", "reduction"}, linear_names
        x = torch.randn(3, *model.pretrained_cfg["input_size"])
        with torch.no_grad():
            assert torch.equal(shimmed(x), model(x)), name
    sd = _swin_state(load_reference("fmnist-swin").state_dict())
    assert "layers.0.downsample.reduction.weight" in sd and "layers.1.downsample.reduction.weight" in sd
    assert "layers.2.downsample.reduction.weight" not in sd and "head.weight" in sd and "head.fc.weight" not in sd


def test_peer_cache_runs_only_the_missing_seed_and_width(tmp_path, monkeypatch):
    # a peer run costs minutes: adding seeds to a cached model must run the peer for the new seeds only,
    # one worker per seed, and keep every cached result
    from bench import peers

    calls = []

    def fake_run(key, repo, model_name, bits_list, seeds):
        calls.append((tuple(bits_list), tuple(seeds)))
        return {f"{b}/{s}": {"seed": s} for b in bits_list for s in seeds}

    monkeypatch.setattr(peers, "CACHE", tmp_path)
    monkeypatch.setattr(peers, "_run_peer", fake_run)
    monkeypatch.setattr(peers, "_commit", lambda repo: "0" * 40)
    monkeypatch.delenv("VITQ_PEER_ABLATE", raising=False)
    first = peers.run_peer("fqvit", tmp_path, "m", ["W8A8", "W6A6"], [0])
    assert calls == [(("W8A8", "W6A6"), (0,))] and set(first) == {"W8A8/0", "W6A6/0"}
    calls.clear()
    have = peers.run_peer("fqvit", tmp_path, "m", ["W8A8", "W6A6", "W4A4"], [0, 1])
    assert calls == [(("W4A4",), (0,)), (("W8A8", "W6A6", "W4A4"), (1,))]
    assert set(have) == {f"{b}/{s}" for b in ("W8A8", "W6A6", "W4A4") for s in (0, 1)}
    calls.clear()
    peers.run_peer("fqvit", tmp_path, "m", ["W8A8", "W4A4"], [1, 0])
    assert calls == []


def test_peer_cache_keeps_runs_another_process_added_meanwhile(tmp_path, monkeypatch):
    # two bench processes on one model (e.g. W8A3 and W3A8 at once): the one that finishes last must not
    # overwrite the other's run with the cache it read before its own peer run
    import torch
    from bench import peers

    monkeypatch.setattr(peers, "CACHE", tmp_path)
    monkeypatch.setattr(peers, "_commit", lambda repo: "0" * 40)
    monkeypatch.delenv("VITQ_PEER_ABLATE", raising=False)
    cache = tmp_path / f"ptq4vit-{'0' * 12}-m.pt"

    def fake_run(key, repo, model_name, bits_list, seeds):
        torch.save({"W8A3/0": {"other": True}}, cache)  # the other process saved while this one ran
        return {f"{b}/{s}": {"seed": s} for b in bits_list for s in seeds}

    monkeypatch.setattr(peers, "_run_peer", fake_run)
    have = peers.run_peer("ptq4vit", tmp_path, "m", ["W3A8"], [0])
    assert set(have) == {"W3A8/0", "W8A3/0"}
    assert set(torch.load(cache, weights_only=False)) == {"W3A8/0", "W8A3/0"}


def test_peer_ablation_of_one_peer_refuses_another(monkeypatch, tmp_path, capsys):
    # PTQ4ViT's granularity ablations change PTQ4ViT's config only; FQ-ViT's quantizer ablations FQ-ViT's model
    import sys

    import pytest
    from bench import peers

    (tmp_path / "example").mkdir()
    (tmp_path / "example" / "test_all.py").write_text("")
    (tmp_path / "test_quant.py").write_text("")
    for ablate, flag in (("qkv_groups", "--fqvit"), ("logits", "--ptq4vit")):
        monkeypatch.setattr(sys, "argv", ["peers", flag, str(tmp_path), "--ablate", ablate])
        with pytest.raises(SystemExit, match="code only"):
            peers.main()


def test_peer_post_ln8_widens_exactly_fqvits_layernorm_outputs():
    # FQ-ViT's module names (models/vit_quant.py, models/swin_quant.py): a LayerNorm's output quantizer is the
    # block's qact1 / qact3, the patch merge's qact1 and the model's qact2; the other qacts are residual sums,
    # attention operands, branch outputs or the image / embedding, which post_ln8 must leave at A bits
    import re

    from bench import peers

    vit = peers.WIDENED["post_ln8"]["vit"]
    swin = peers.WIDENED["post_ln8"]["swin"]
    for name, widened in [("blocks.0.qact1", True), ("blocks.11.qact3", True), ("qact2", True),
                          ("blocks.0.qact2", False), ("blocks.0.qact4", False), ("blocks.0.attn.qact1", False),
                          ("blocks.0.mlp.qact1", False), ("qact1", False), ("qact_embed", False), ("act_out", False)]:
        assert bool(re.search(vit, name)) == widened, name
    for name, widened in [("layers.0.blocks.1.qact1", True), ("layers.2.blocks.0.qact3", True),
                          ("layers.1.downsample.qact1", True), ("qact2", True), ("layers.1.downsample.qact2", False),
                          ("layers.0.blocks.0.attn.qact1", False), ("layers.0.blocks.0.qact2", False), ("qact3", False)]:
        assert bool(re.search(swin, name)) == widened, name
    assert "post_ln8" in peers.ABLATIONS  # an --ablate choice


def test_fqvit_postln8_recipe_changes_only_the_post_layernorm_sites():
    from vitq.recipes import load_recipe

    base, wide = load_recipe("fqvit"), load_recipe(str(ROOT / "bench" / "recipes" / "fqvit-postln8.yaml"))
    changed = {k for k, r in wide.rules if dict(base.rules).get(k) != r}
    assert changed == {"act:QKV_IN", "act:FC1_IN", "act:REDUCTION_IN", "act:HEAD_IN"}
    assert all(r.bits == 8 for k, r in wide.rules if k in changed)
    assert wide.passes == base.passes


def test_peer_pages_render_mixed_widths_after_the_issue_widths(tmp_path):
    # cause-finding runs at W8A6 / W6A8 render after the issue's widths, with the 1-point target
    import json

    from bench import peers

    row = {"model": "fmnist-vit", "peer": "FQ-ViT", "recipe": "fqvit", "seeds": [0], "fp_top1": 86.3,
           "peer_top1": [82.0], "vitq_top1": [84.0], "diff": 2.0, "p_value": 1e-6, "agree": 90.0,
           "peer_seconds": 1.0, "vitq_seconds": 1.0, "eval_images": 10000, "ablate": [], "vitq_set": {}}
    rows = [{**row, "bits": "W8A6"}, {**row, "bits": "W6A6", "diff": 0.5}]
    path = tmp_path / "peers_ablation.json"
    path.write_text(json.dumps({"meta": {"machine": "x"}, "rows": rows}))
    peers.render(path)
    lines = [ln for ln in path.with_suffix(".md").read_text().splitlines() if ln.startswith("| fmnist-vit")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["W6A6", "W8A6"]
    assert lines[0].rstrip(" |").endswith("yes") and lines[1].rstrip(" |").endswith("**no**")


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_peer_softmax_ablation_decodes_as_vitqs_twin_uniform(bits):
    # --ablate sos_sum gives PTQ4ViT's code vitq's one-region decode of the twin softmax: away from the region
    # switch (the code switches at split, vitq at the nearest value) it is vitq's twin_uniform exactly
    import torch
    from bench.peers import _one_region

    from vitq.quantizers import QuantSpec, fake_quant, get_quantizer

    q = 2 ** (bits - 1) - 1
    spec = QuantSpec("twin_uniform", bits, granularity="tensor", options={"mode": "softmax", "search": False})
    x = torch.softmax(torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(bits)) * 3, -1)
    for i in (2, 5, 9):
        split = 2.0 ** -i
        p = get_quantizer("twin_uniform")._softmax(q, i)
        away = (x < 0.5 * split) | (x > 2 * split + 1 / q)
        ours = _one_region(x, torch.tensor(split), q)
        # the same levels (k/q computed as k * (1/q): float rounding only)
        torch.testing.assert_close(ours[away], fake_quant(x, p, spec)[away], rtol=0, atol=1e-6, msg=str(i))
        big = x >= split  # and no element is decoded with the other region's saturated value added
        assert (ours[big] <= 1).all() and ((ours[big] * q).round() == ours[big] * q).all()


def test_every_results_page_is_in_the_index_as_current_or_superseded():
    from bench import index

    current, archived = index.pages()
    for p in current + archived:
        if p.name != "README.md":
            assert p.name in index.PAGES, f"bench/results/{p.name} has no entry in bench/index.py PAGES"
    assert {p.name for p in archived} == set(index.SUPERSEDED), "archive/ and SUPERSEDED disagree"
    names = {p.name for p in current}
    for page, (by, _) in index.SUPERSEDED.items():
        assert all(b.strip() in names for b in by.split(",")), f"{page} is superseded by a page that is not current"
    assert not (names & set(index.SUPERSEDED)), "a superseded page is still in bench/results/"
    readme = (ROOT / "bench" / "results" / "README.md").read_text()
    for p in current + archived:
        if p.name != "README.md":
            assert f"[{p.name}]" in readme, f"bench/results/README.md does not list {p.name}: python -m bench.index"


def test_baselines_bench_an_encoder_with_the_clis_knn_bank():
    """bench.baselines read the k-NN bank size from RunSpec's default, which became None (the CLI decides it): every
    encoder row then failed with a TypeError. It takes the CLI's default size."""
    from bench.baselines import KNN_BANK

    from vitq.defaults import DEFAULT_KNN_BANK, KNN_K

    assert isinstance(KNN_BANK, int) and KNN_BANK == DEFAULT_KNN_BANK >= KNN_K


def test_bench_judge_scores_an_encoder_by_knn_and_its_exports_by_embedding_cosine():
    """The benches that evaluate outside vitq.run (export_parity, aocq) score an encoder as `vitq eval` does: k-NN
    top-1 against its own embeddings of the train split, the embeddings' agreement with a reference; a classifier
    by its head. export_parity renders encoder rows in their own table."""
    from types import SimpleNamespace

    import torch
    from bench.common import Judge
    from bench.export_parity import render
    from conftest import tiny_vit
    from torch.utils.data import TensorDataset

    from vitq.data import make_loader
    from vitq.features import evaluate_features

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(40, 3, 16, 16, generator=g), torch.arange(40) % 4)
    test = TensorDataset(torch.randn(24, 3, 16, 16, generator=g), torch.arange(24) % 4)
    data = SimpleNamespace(train=train, eval_loader=make_loader(test, batch_size=8))

    enc = tiny_vit(num_classes=0)
    judge = Judge(enc, data)
    assert judge.encoder and sum(len(b[0]) for b in judge.bank) == 40  # the whole (small) train split is the bank
    fp = judge(enc)
    want = evaluate_features(enc, data.eval_loader, judge.bank)
    assert fp["top1"] == want["top1"] and torch.equal(fp["features"], want["features"])
    noisy = tiny_vit(num_classes=0)
    with torch.no_grad():
        noisy.blocks[0].mlp.fc1.weight.add_(0.3 * torch.randn_like(noisy.blocks[0].mlp.fc1.weight))
    q = judge(noisy, fp)
    assert q["emb_cosine_mean"] < 0.9999 and q["emb_cosine_p5"] <= q["emb_cosine_mean"]
    v = judge.versus(fp, q, "onnx")
    assert set(v) == {"onnx_cos_mean", "onnx_cos_p5"} and v["onnx_cos_mean"] == q["emb_cosine_mean"]

    head = tiny_vit()
    hj = Judge(head, data)
    assert not hj.encoder and hj.bank is None and hj.versus(fp, q, "onnx") == {}
    assert "features" not in hj(head)

    row = {"model": "m", "recipe": "repq", "bits": "W8A8", "task": "features", "fp_top1": 50.0, "sim_top1": 49.0,
           "sim_cos_mean": 0.99, "sim_cos_p5": 0.98, "target_changed": False, "target_sim_top1": 49.0}
    for k, d in (("onnx", 0.05), ("onnx_uniform8", 0.3), ("vitq", 0.0), ("target_onnx", 0.05)):
        row.update({f"{k}_top1": 49.0 + d, f"{k}_diff": d, f"{k}_agree": 99.0, f"{k}_cos_mean": 0.9999,
                    f"{k}_cos_p5": 0.9995, f"{k}_fallbacks": 0})
    row["vitq_size_ratio"] = 0.3
    page = render([row, {**row, "model": "m2", "onnx_diff": 0.2, "onnx_cos_p5": 0.97}], {})
    assert "## Encoders (no head)" in page and "on 1 of 2 rows" in page and "at least 0.97000" in page
    assert "| m | repq | W8A8 | 50.00 | 49.00 | 0.99000 / 0.98000 | 49.05 | +0.05 |" in page
