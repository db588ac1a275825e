"""``vitq report``: one self-contained HTML page (PNGs inlined, also written beside it) that says
where a quantized model loses: per-site error, per-site sensitivity, the distributions that matter
with the quantizer's levels drawn over them, and the manifest.

Measurements come from :mod:`vitq.insight.sites`; this module only draws and writes. The figures
are matplotlib (the ``report`` extra); a missing matplotlib is a one-line error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from ..nn import FakeQuant, fake_quants
from ..passes.quantize import manifest
from ..roles import Role
from ..state import state_of
from .sites import Batch, embedding_sensitivity, levels, most_sensitive, site_errors, site_samples, site_sensitivity

#: the distributions the report draws: role -> what a reader calls it
DIST_ROLES = {Role.QKV_IN: "post-LayerNorm (QKV input)", Role.FC1_IN: "post-LayerNorm (FC1 input)",
              Role.FC2_IN: "post-GELU (FC2 input)", Role.ATTN_PROBS: "post-Softmax (attention probabilities)"}
ROLE_COLOURS = {"PATCH_EMBED": "#7f7f7f", "QKV_IN": "#1f77b4", "PROJ_IN": "#ff7f0e", "FC1_IN": "#2ca02c",
                "FC2_IN": "#d62728", "GLU_OUT": "#ff9896", "REDUCTION_IN": "#8c564b", "DWCONV_IN": "#c49c94", "HEAD_IN": "#e377c2", "ATTN_Q": "#9467bd",
                "ATTN_K": "#c5b0d5", "ATTN_PROBS": "#17becf", "ATTN_MIXED": "#9edae5", "ATTN_V": "#bcbd22", "LN_IN": "#393b79",
                "SOFTMAX_IN": "#637939", "RESIDUAL": "#843c39"}


#: an encoder's per-site sensitivity fields (:func:`~vitq.insight.sites.embedding_sensitivity`)
SENS_KEYS_FEATURES = ("emb_cosine_mean", "emb_cosine_p5", "emb_sqnr_db")


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("vitq report draws with matplotlib, which is not installed: pip install 'vitq[report]' "
                          "(or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class ReportInputs:
    """What the page shows besides the measurements: ``meta`` (model, recipe, bits, data, top-1s ...),
    the recipe as a dict, and ``before``: the float model prepared with the same recipe but not
    calibrated (the distributions before reparameterization; None when the recipe folds nothing or
    the float model is not at hand)."""

    meta: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    before: Optional[nn.Module] = None


def _short(site: str) -> str:
    return site.replace(".input_quant", ".in").replace(".weight_quant", ".w").replace(".output_quant", ".out") \
        .replace("blocks.", "b").replace("layers.", "l").replace(".attn.", ".").replace(".mlp.", ".")


def pick_distribution_sites(model: nn.Module, per_role: int = 3) -> list[tuple[Role, list[FakeQuant]]]:
    """Activation sites whose distributions the report draws: for each role of :data:`DIST_ROLES` the
    first, middle and last site in model order."""
    out = []
    acts = [fq for fq in fake_quants(model, "act") if fq.ready or fq.spec.dynamic]
    for role in DIST_ROLES:
        of = [fq for fq in acts if fq.role == role]
        if not of:
            continue
        idx = sorted({0, len(of) // 2, len(of) - 1})[:per_role]
        out.append((role, [of[i] for i in idx]))
    return out


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_errors(errors: list[dict[str, Any]], plt: Any) -> bytes:
    """SQNR per site in model order: local (the site alone) and accumulated (everything upstream)."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    xs = list(range(len(errors)))
    for ax, key, title in ((axes[0], "sqnr_db", "local: the site's quantizer on the float tensor"),
                           (axes[1], "acc_sqnr_db", "accumulated: quantized model vs float model at the site")):
        for kind, marker in (("act", "o"), ("weight", "s")):
            pts = [(i, e[key], ROLE_COLOURS.get(e["role"], "k")) for i, e in zip(xs, errors)
                   if e["kind"] == kind and e[key] is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], marker=marker, s=18,
                           edgecolors="none")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    roles = list(dict.fromkeys(e["role"] for e in errors))
    handles = [plt.Line2D([], [], marker="o", ls="", color=ROLE_COLOURS.get(r, "k"), label=r) for r in roles]
    handles += [plt.Line2D([], [], marker="s", ls="", color="k", label="weight"),
                plt.Line2D([], [], marker="o", ls="", color="k", label="activation")]
    axes[0].legend(handles=handles, fontsize=7, ncol=min(len(handles), 8), loc="lower left",
                   bbox_to_anchor=(0, 1.12), frameon=False)
    axes[1].set_xlabel("site (model order; higher SQNR = less error)")
    return _png(fig, plt)


def plot_embedding_sensitivity(sens: list[dict[str, Any]], plt: Any, top: int = 20) -> bytes:
    """An encoder's sites whose quantization alone moves the embeddings most (lowest SQNR against the float ones)."""
    rows = most_sensitive(sens)[:top][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.4))
    vals = [r["emb_sqnr_db"] for r in rows]
    ax.barh(range(len(rows)), vals, color=[ROLE_COLOURS.get(r["role"], "k") for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{_short(r['site'])} ({r['kind'][0]}{r['bits']})" for r in rows], fontsize=8)
    for i, r in enumerate(rows):
        ax.annotate(f"cos {r['emb_cosine_mean']:.4f}", (vals[i], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_xlabel("embedding SQNR against the float model, dB (only this site quantized; lower is worse)")
    ax.set_title(f"the {len(rows)} most sensitive sites (label: mean embedding cosine)", fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    return _png(fig, plt)


def plot_sensitivity(sens: list[dict[str, Any]], plt: Any, top: int = 20) -> bytes:
    """The sites whose quantization alone costs the most log-loss (or top-1, without log-loss)."""
    key = "d_nll" if all(r["d_nll"] is not None for r in sens) else "d_top1"
    rows = sorted(sens, key=lambda r: r[key], reverse=(key == "d_nll"))[:top]
    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.4))
    vals = [r[key] for r in rows]
    ax.barh(range(len(rows)), vals, color=[ROLE_COLOURS.get(r["role"], "k") for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{_short(r['site'])} ({r['kind'][0]}{r['bits']})" for r in rows], fontsize=8)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['d_top1']:+.2f} pt", (vals[i], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_xlabel("test log-loss change, nats (only this site quantized)" if key == "d_nll"
                  else "top-1 change, points (only this site quantized)")
    ax.set_title(f"the {len(rows)} most sensitive sites (label: top-1 change)", fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    return _png(fig, plt)


def plot_distributions(groups: list[tuple[Role, list[FakeQuant]]], after: dict[str, dict[str, Any]],
                       before: Optional[dict[str, dict[str, Any]]], plt: Any) -> bytes:
    """One row per role, one column per depth: histogram (log count) of the float values reaching the
    site, the values before reparameterization in grey, the quantizer's levels as vertical lines."""
    ncol = max(len(s) for _, s in groups)
    fig, axes = plt.subplots(len(groups), ncol, figsize=(4.2 * ncol, 2.6 * len(groups)), squeeze=False)
    for r, (role, sites) in enumerate(groups):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(sites):
                ax.axis("off")
                continue
            fq = sites[c]
            a = after[fq.site]
            lo, hi = a["min"], a["max"]
            if before is not None and fq.site in before:
                b = before[fq.site]
                ax.hist(b["sample"].numpy(), bins=120, color="#bbbbbb", log=True, label="before reparam.")
            ax.hist(a["sample"].numpy(), bins=120, color=ROLE_COLOURS.get(str(role), "k"), alpha=0.8, log=True,
                    label="quantizer input")
            lv = levels(fq, lo, hi)
            if lv is not None:
                lv = lv[(lv >= lo - 0.05 * (hi - lo)) & (lv <= hi + 0.05 * (hi - lo))]
                step = max(1, len(lv) // 64)  # at most 64 lines: more merge into a band
                for v in lv[::step].tolist():
                    ax.axvline(v, color="k", lw=0.4, alpha=0.6)
                note = f"{len(lv)} levels" + ("" if step == 1 else f" (every {step}th drawn)")
            else:
                note = f"{fq.spec.granularity} grid: levels per channel, not drawn"
            ax.set_title(f"{_short(fq.site)}  {fq.spec.quantizer} {fq.spec.bits}b\n{note}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel(DIST_ROLES[role].split(" (")[0], fontsize=8)
            if r == 0 and c == 0:
                ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _png(fig, plt)


def plot_channels(sites: list[FakeQuant], after: dict[str, dict[str, Any]], before: Optional[dict[str, dict[str, Any]]],
                  plt: Any) -> Optional[bytes]:
    """Per-channel range of post-LayerNorm sites: the outlier channels a per-tensor grid must cover,
    before and after reparameterization."""
    sites = [s for s in sites if after[s.site]["channel_min"] is not None and after[s.site]["channel_min"].numel() > 1]
    if not sites:
        return None
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 2.8), squeeze=False)
    for ax, fq in zip(axes[0], sites):
        a = after[fq.site]
        if before is not None and fq.site in before:
            b = before[fq.site]
            ax.fill_between(range(len(b["channel_min"])), b["channel_min"].numpy(), b["channel_max"].numpy(),
                            color="#bbbbbb", label="before reparam.", step="mid")
        ax.fill_between(range(len(a["channel_min"])), a["channel_min"].numpy(), a["channel_max"].numpy(),
                        color=ROLE_COLOURS.get(str(fq.role), "k"), alpha=0.8, label="quantizer input", step="mid")
        ax.set_title(f"{_short(fq.site)}: min..max per channel", fontsize=8)
        ax.set_xlabel("channel", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig, plt)


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str, int]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{_fmt(r.get(k), nd)}</td>" for k, _, nd in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1180px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:.6em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}
.kv td{text-align:left}pre{background:#f7f7f7;padding:.6em;font-size:12px;overflow:auto}.note{color:#555}"""

_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-ok', ok);
});
</script>"""


def write_report(model: nn.Module, eval_batches: Sequence[Batch], out_dir: "str | Path", inputs: ReportInputs,
                 error_images: int = 64, progress: bool = False, features: bool = False) -> Path:
    """Measure ``model`` (quantized, calibrated) on ``eval_batches`` and write ``report.html``,
    ``report.json`` and the PNGs into ``out_dir``. Returns the HTML path. ``features``: the model is an encoder,
    each site's sensitivity is how far it alone moves the embeddings (:func:`embedding_sensitivity`)."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    err_imgs: list[Tensor] = []
    n = 0
    for x, _ in eval_batches:
        if n >= error_images:
            break
        err_imgs.append(x[: error_images - n])
        n += len(err_imgs[-1])
    errors = site_errors(model, err_imgs)
    sens = (embedding_sensitivity if features else site_sensitivity)(model, eval_batches, progress=progress)
    by_site = {r["site"]: r for r in sens["sites"]}
    sens_keys = SENS_KEYS_FEATURES if features else ("d_top1", "d_nll", "p_value")
    rows = [{**e, **{k: by_site.get(e["site"], {}).get(k) for k in sens_keys}} for e in errors]
    specs = {m["site"]: m for m in manifest(model)}
    for r in rows:
        r["granularity"] = specs.get(r["site"], {}).get("granularity")

    groups = pick_distribution_sites(model)
    names = [fq.site for _, sites in groups for fq in sites]
    st = state_of(model)
    folded = bool(st is not None and st.reparam)
    after = site_samples(model, names, err_imgs)
    before = None
    if folded and inputs.before is not None:
        have = {fq.site for fq in fake_quants(inputs.before)}
        before = site_samples(inputs.before, [s for s in names if s in have], err_imgs)

    figs: dict[str, bytes] = {"errors": plot_errors(errors, plt), "sensitivity": (
        plot_embedding_sensitivity if features else plot_sensitivity)(sens["sites"], plt)}
    if groups:
        figs["distributions"] = plot_distributions(groups, after, before, plt)
        ln = [fq for role, sites in groups if role in (Role.QKV_IN, Role.FC1_IN) for fq in sites]
        ch = plot_channels(ln[:3], after, before, plt)
        if ch is not None:
            figs["channels"] = ch
    for name, data in figs.items():
        (out / f"{name}.png").write_bytes(data)

    meta = inputs.meta
    man = manifest(model)
    n_q = sum(1 for m in man if m.get("quantizer") != "float")
    worst = most_sensitive(sens["sites"])
    summary = {"meta": meta, "sensitivity_fp": sens["fp"], "sites": rows, "manifest": man, "recipe": inputs.recipe,
               "reparameterized": folded, "figures": sorted(f"{k}.png" for k in figs)}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")

    def img(name: str, alt: str) -> str:
        if name not in figs:
            return ""
        b64 = base64.b64encode(figs[name]).decode()
        return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></p>'

    kv = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in meta.items())
    top_cols = [("site", "site", 0), ("role", "role", 0), ("kind", "kind", 0), ("quantizer", "quantizer", 0),
                ("bits", "bits", 0), ("d_top1", "Δ top-1 (pt)", 2), ("d_nll", "Δ log-loss", 4),
                ("p_value", "p (McNemar)", 3), ("agree", "agree %", 2)]
    all_cols = [("site", "site", 0), ("role", "role", 0), ("kind", "kind", 0), ("quantizer", "quantizer", 0),
                ("bits", "bits", 0), ("granularity", "granularity", 0), ("sqnr_db", "SQNR dB", 1),
                ("cosine", "cosine", 5), ("acc_sqnr_db", "acc. SQNR dB", 1), ("acc_cosine", "acc. cosine", 5),
                ("d_top1", "Δ top-1", 2), ("d_nll", "Δ log-loss", 4), ("p_value", "p", 3)]
    if features:
        emb = [("emb_cosine_mean", "emb. cosine", 5), ("emb_cosine_p5", "cosine p5", 5), ("emb_sqnr_db", "emb. SQNR dB", 1)]
        top_cols = top_cols[:5] + emb
        all_cols = all_cols[:10] + emb
    man_cols = [("site", "site", 0), ("role", "role", 0), ("kind", "kind", 0), ("quantizer", "quantizer", 0),
                ("bits", "bits", 0), ("granularity", "granularity", 0), ("observer", "observer", 0)]
    fp = sens["fp"]
    sens_note = (f"""Every other site float; how far the embeddings move from the float model's on the same
{fp['images']} images, image by image: mean and 5th-percentile cosine, SQNR (the encoder has no head to
score).""" if features else f"""Every other site float; the change against the float model ({fp['top1']:.2f} % top-1,
log-loss {_fmt(fp['nll'], 4)}) on the same {fp['images']} images. p: exact McNemar test of the top-1 change
(most single-site changes are not significant; the log-loss resolves far smaller ones).""")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vitq report: {html.escape(str(meta.get('model', '')))}
{html.escape(str(meta.get('recipe', '')))} {html.escape(str(meta.get('bits', '')))}</title><style>{_CSS}</style></head>
<body>
<h1>vitq report: {html.escape(str(meta.get('model', '')))} · {html.escape(str(meta.get('recipe', '')))} ·
{html.escape(str(meta.get('bits', '')))}</h1>
<table class="kv">{kv}<tr><td>sites quantized</td><td>{n_q} of {len(man)}</td></tr></table>
<h2>Per-site error</h2>
<p class="note">SQNR of each site on {n} evaluation images. Local: the site's quantizer on the float tensor
that reaches it (what the site alone does). Accumulated: the fully quantized model's tensor at the site
against the float model's (everything upstream included). Squares are weights, circles activations.</p>
{img("errors", "per-site SQNR")}
<h2>Sensitivity: one site quantized at a time</h2>
<p class="note">{sens_note}</p>
{img("sensitivity", "per-site sensitivity")}
{_table(worst[:15], top_cols)}
<h2>Distributions that matter</h2>
<p class="note">Float values reaching the site (log count){', before reparameterization in grey' if before else ''};
vertical lines: the values the site's quantizer can output.</p>
{img("distributions", "activation distributions with quantizer levels")}
{img("channels", "per-channel ranges of post-LayerNorm activations")}
<h2>Every site</h2>
{_table(rows, all_cols)}
<h2>Manifest</h2>
{_table(man, man_cols)}
<h2>Recipe</h2>
<pre>{html.escape(json.dumps(inputs.recipe, indent=1))}</pre>
{_SCRIPT}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
