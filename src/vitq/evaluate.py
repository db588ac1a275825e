"""Evaluation: top-1 / top-5 accuracy, test log-loss, paired comparisons, timings.

``vitq.evaluate(model, data)`` calls :func:`evaluate` (this module is callable): ``data`` is a DataLoader, a
Dataset of ``(image, label)`` items, an ``(images, labels)`` pair of tensors, or any iterable of batches.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .batches import batch_images, batch_labels, forward_logits
from .devices import model_device
from .errors import DataError


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB: since the last :func:`reset_peak_rss` where Linux
    allows resetting it (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux ``clear_refs`` 5), so that the next
    :func:`peak_rss_mb` measures one run. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Predictions:
    """Per-image predictions of one model on one evaluation set: ``topk`` (N, k) class indices, best
    first, ``labels`` (N,) and ``nll`` (N,), each image's cross-entropy ``-log softmax(logits)[label]``
    in nats (None where the labels are not class indices of the logits)."""

    topk: Tensor
    labels: Tensor
    seconds: float
    nll: Optional[Tensor] = None
    nonfinite: int = 0  # images whose outputs hold NaN / inf (their predictions mean nothing)

    @property
    def top1(self) -> Tensor:
        return self.topk[:, 0]


@torch.no_grad()
def predict(model: nn.Module, loader: "DataLoader | Iterable[Any]", k: int = 5, progress: bool = False, desc: str = "eval",
            device: Optional[torch.device] = None) -> Predictions:
    """Top-``k`` class indices and per-image cross-entropy of ``model`` for every batch of ``loader``:
    ``(images, labels)`` pairs or ``{"pixel_values": ..., "labels": ...}`` dicts; the model may return
    logits or an output with ``.logits`` (Hugging Face). Batches go to ``device`` (default: where the
    model's parameters are)."""
    model.eval()
    device = device if device is not None else model_device(model)
    tops: list[Tensor] = []
    labels: list[Tensor] = []
    nlls: Optional[list[Tensor]] = []
    nonfinite = 0
    t0 = time.perf_counter()
    it: Iterable[Any] = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, unit="batch", leave=False)
    for b in it:
        x, y = batch_images(b), batch_labels(b)
        if y is None:
            raise DataError("evaluation batches need labels: give (images, labels) pairs or dicts with 'labels'")
        y = torch.as_tensor(y)
        if device.type != "cpu" or x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device)
        logits = forward_logits(model, x)
        nonfinite += int((~torch.isfinite(logits)).reshape(len(logits), -1).any(-1).sum())
        y = y.reshape(-1)
        tops.append(logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu())
        labels.append(y.cpu())
        if nlls is not None and logits.dim() == 2 and not y.is_floating_point() and len(y) == len(logits) \
                and bool(((y >= 0) & (y < logits.shape[-1])).all()):
            nlls.append(torch.nn.functional.cross_entropy(logits.float(), y.to(logits.device).long(),
                                                          reduction="none").cpu())
        else:
            nlls = None  # labels that are not class indices of these logits: no log-loss
    dt = time.perf_counter() - t0
    if not tops:
        return Predictions(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, dtype=torch.long), dt)
    return Predictions(torch.cat(tops), torch.cat(labels), dt, None if nlls is None else torch.cat(nlls), nonfinite)


def gather(p: Predictions) -> Predictions:
    """Every rank's per-image predictions, concatenated in rank order (:func:`vitq.distributed.shard`
    gives each rank a contiguous block, so this is the dataset's order); ``p`` with one process."""
    if not distributed.active():
        return p
    parts = distributed.all_gather_objects((p.topk, p.labels, p.seconds, p.nll, p.nonfinite))
    nll = None if any(q[3] is None for q in parts) else torch.cat([q[3] for q in parts])
    return Predictions(torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts]), max(q[2] for q in parts), nll,
                       sum(q[4] for q in parts))


def batches_of(data: Any, batch_size: int = 64) -> "DataLoader | Iterable[Any]":
    """Evaluation data as batches: a DataLoader or an iterable of batches as they are, a Dataset through a
    DataLoader, an ``(images, labels)`` pair of tensors cut into batches."""
    if isinstance(data, (str, bytes)):
        raise DataError(f"evaluation data is the string {data!r}: pass a DataLoader, a Dataset or (images, labels) "
                        "tensors; for a folder of images use vitq.data.build_dataset(DIR, 'eval', vitq.transforms(model))")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"(images, labels) must be N,C,H,W and N, got {tuple(x.shape)} and {tuple(y.shape)}")
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size)
    if not hasattr(data, "__iter__"):
        raise DataError(f"evaluation data must be a DataLoader, a Dataset, (images, labels) tensors or an iterable of "
                        f"batches, got {type(data).__name__}")
    return data  # type: ignore[no-any-return]


def evaluate(model: nn.Module, loader: Any, progress: bool = False, desc: str = "eval",
             device: Optional[torch.device] = None, sharded: bool = False, batch_size: int = 64) -> dict[str, Any]:
    """Top-1 / top-5 (percent) and mean test cross-entropy ``nll`` (nats; None without class-index
    labels) of ``model`` over ``loader`` (any form :func:`batches_of` takes; ``batch_size`` cuts a Dataset or a
    tensor pair); ``predictions`` holds the per-image :class:`Predictions` (for :func:`compare_paired`).
    ``sharded``: ``loader`` holds this rank's block of the test set (:func:`vitq.distributed.shard`); the
    result is over every rank's, as one process's."""
    if not callable(model):
        raise DataError(f"evaluate takes a model first, got {type(model).__name__} (load it with vitq.load_model)")
    loader = batches_of(loader, batch_size)
    p = predict(model, loader, k=5, progress=progress and distributed.is_main(), desc=desc, device=device)
    if sharded:
        p = gather(p)
    n = len(p.labels)
    c1 = int((p.top1 == p.labels).sum()) if n else 0
    c5 = int((p.topk == p.labels.unsqueeze(-1)).any(-1).sum()) if n else 0
    nll = float(p.nll.double().mean()) if p.nll is not None and n else None
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "nll": nll, "n": n,
            "seconds": p.seconds, "predictions": p, "nonfinite": p.nonfinite}


# ---------------------------------------------------------------------------------- paired test
@dataclass(frozen=True)
class PairedComparison:
    """Two models' top-1 on the *same* images, compared pairwise.

    Two quantized models of one float model make most of their mistakes on the same images, so the
    difference of their accuracies is far less noisy than two independent accuracies would suggest,
    and only the *discordant* images (one right, the other wrong) carry information. ``p_value`` is
    the exact two-sided McNemar test on those (binomial, p = 1/2); ``ci95`` is the Wald interval of
    the paired difference ``top1_b - top1_a`` in points. Neither says anything about another
    calibration seed: repeat the run with other seeds for that.

    Where both sides carry per-image cross-entropies (:class:`Predictions` from :func:`predict`), the
    comparison also holds the mean test log-loss of each (``nll_a``, ``nll_b``, nats, lower is better)
    and the paired z-test of their difference (``nll_diff``, ``nll_ci95``, ``nll_p``: mean and
    standard deviation ``nll_sd`` of the per-image differences, normal approximation). Log-loss sees
    every image's confidence, not only the few hundred discordant ones, so it resolves far smaller
    changes than top-1 does; it is a different question (is B's predictive distribution better?), not
    a more precise answer to the top-1 one.
    """

    n: int
    top1_a: float
    top1_b: float
    only_a: int  # images A classifies correctly and B does not
    only_b: int  # images B classifies correctly and A does not
    agree: float  # percent of images where A and B predict the same class
    nll_a: Optional[float] = None  # mean test cross-entropy of A, nats
    nll_b: Optional[float] = None
    nll_sd: Optional[float] = None  # standard deviation of the per-image differences nll_b - nll_a

    @property
    def diff(self) -> float:
        """``top1_b - top1_a``, points."""
        return 100.0 * (self.only_b - self.only_a) / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        d = (self.only_b - self.only_a) / self.n
        var = max((self.only_a + self.only_b) / self.n - d * d, 0.0) / self.n
        h = 1.959964 * math.sqrt(var)
        return 100.0 * (d - h), 100.0 * (d + h)

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    @property
    def detectable(self) -> Optional[float]:
        """Smallest true difference (points) this test set would call significant at 5 % with 80 %
        power, given the pair's observed discordance (:func:`detectable_difference`); None when the
        two models agree on every image's correctness."""
        return detectable_difference(self.only_a + self.only_b, self.n)

    @property
    def nll_diff(self) -> Optional[float]:
        """``nll_b - nll_a``, nats per image (negative: B's log-loss is lower, better); None without NLLs."""
        return None if self.nll_a is None or self.nll_b is None else self.nll_b - self.nll_a

    @property
    def nll_ci95(self) -> Optional[tuple[float, float]]:
        d = self.nll_diff
        if d is None or self.nll_sd is None:
            return None
        h = 1.959964 * self.nll_sd / math.sqrt(self.n)
        return d - h, d + h

    @property
    def nll_p(self) -> Optional[float]:
        """Two-sided p-value of the paired z-test of ``nll_diff`` (None without NLLs)."""
        d = self.nll_diff
        if d is None or self.nll_sd is None:
            return None
        return z_test_p(d, self.nll_sd, self.n)

    def summary(self, name_a: str = "A", name_b: str = "B") -> str:
        lo, hi = self.ci95
        verdict = "significant" if self.significant() else "not significant"
        mde = self.detectable
        resolves = "" if mde is None else f"; this test set resolves differences of about {mde:.2f} points or more"
        out = (f"{name_b} - {name_a}: {self.diff:+.2f} points (95% CI {lo:+.2f} .. {hi:+.2f}; McNemar p = "
               f"{self.p_value:.3g}, {verdict} at 5%) on {self.n} images; {self.only_a} only {name_a} right, "
               f"{self.only_b} only {name_b} right, predictions agree on {self.agree:.2f}%{resolves}")
        ci, p = self.nll_ci95, self.nll_p
        if ci is not None and p is not None and self.nll_diff is not None:
            out += (f"\ntest log-loss {name_b} - {name_a}: {self.nll_diff:+.4f} nats per image (95% CI "
                    f"{ci[0]:+.4f} .. {ci[1]:+.4f}; paired z-test p = {p:.3g}; lower is better; "
                    f"{name_a} {self.nll_a:.4f}, {name_b} {self.nll_b:.4f})")
        return out

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci95
        out = {"n": self.n, "top1_a": round(self.top1_a, 2), "top1_b": round(self.top1_b, 2),
               "diff": round(self.diff, 2), "ci95": [round(lo, 2), round(hi, 2)], "p_value": self.p_value,
               "only_a_correct": self.only_a, "only_b_correct": self.only_b, "agree": round(self.agree, 2),
               "detectable_80pct": None if self.detectable is None else round(self.detectable, 2)}
        ci = self.nll_ci95
        if ci is not None and self.nll_a is not None and self.nll_b is not None and self.nll_diff is not None:
            out.update(nll_a=round(self.nll_a, 5), nll_b=round(self.nll_b, 5), nll_diff=round(self.nll_diff, 5),
                       nll_ci95=[round(ci[0], 5), round(ci[1], 5)], nll_p=self.nll_p)
        return out


def detectable_difference(discordant: int, n: int, alpha: float = 0.05, power: float = 0.8) -> Optional[float]:
    """Minimum detectable difference, in points, of a paired top-1 comparison on ``n`` images of which
    ``discordant`` are right for exactly one model: ``(z_{1-alpha/2} + z_power) * sqrt(q / n)``,
    ``q = discordant / n`` (normal approximation; the variance of the paired difference is ``(q - d^2) / n``,
    about ``q / n`` for the small differences this is asked about). A true difference this large is
    found significant with probability ``power``; half of it, about one time in three at 80 %.
    None when ``discordant`` is 0 (the data say nothing about the spread)."""
    from statistics import NormalDist

    if n <= 0 or not 0 <= discordant <= n:
        raise ValueError(f"need 0 <= discordant <= n and n >= 1, got discordant={discordant}, n={n}")
    if discordant == 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return 100.0 * z * math.sqrt(discordant / n / n)


def z_test_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of a z-test that ``n`` independent values with this ``mean`` and standard
    deviation ``sd`` have expectation 0 (normal approximation, for large ``n``)."""
    from statistics import NormalDist

    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return 2.0 * NormalDist().cdf(-abs(mean) / (sd / math.sqrt(n)))


def pooled_paired_test(diffs: Tensor) -> tuple[float, float]:
    """Paired test of two recipes over several calibration seeds on the same ``N`` test images.

    ``diffs`` is (S, N): per seed and image, B's score minus A's (correctness 1/0 for top-1, or
    log-loss). Seeds share the test images, so their per-seed tests are not independent and their
    p-values cannot be combined; instead each image's difference is averaged over the seeds and the
    ``N`` image averages are z-tested: the calibration seeds are held fixed, the test images are the
    random sample. Returns ``(mean difference, p)``."""
    if diffs.dim() != 2 or diffs.shape[1] < 2:
        raise ValueError(f"need (seeds, images) differences with >= 2 images, got shape {tuple(diffs.shape)}")
    per_image = diffs.double().mean(0)
    mean, sd = float(per_image.mean()), float(per_image.std(unbiased=True))
    return mean, z_test_p(mean, sd, per_image.numel())


def compare_pooled(pairs: Sequence[tuple[Predictions, Predictions]]) -> dict[str, Any]:
    """A and B over several calibration seeds on the same test images, one ``(pred_a, pred_b)`` per
    seed: :func:`pooled_paired_test` of the top-1 difference (points) and, where every seed has
    per-image log-losses, of the log-loss difference (nats). ``diff`` is the mean of the per-seed
    top-1 differences."""
    from .errors import ConfigError

    if not pairs:
        raise ConfigError("pooled comparison of 0 seeds: give one (A, B) prediction pair per seed")
    for a, b in pairs:
        compare_paired(a, b)  # same images, same labels, non-empty: its checks and errors
        if not torch.equal(a.labels, pairs[0][0].labels):
            raise ConfigError("the seeds' predictions were made on different images (labels differ): evaluate "
                              "every seed on the same data and --eval-size")
    right = torch.stack([100.0 * ((b.top1 == b.labels).double() - (a.top1 == a.labels).double()) for a, b in pairs])
    out: dict[str, Any] = {"seeds": len(pairs), "diff": float(right.mean()), "p_value": None, "nll_diff": None,
                           "nll_p": None}
    if right.shape[1] < 2:  # one image: a mean, no test
        return out
    out["diff"], out["p_value"] = pooled_paired_test(right)
    if all(a.nll is not None and b.nll is not None for a, b in pairs):
        d = torch.stack([b.nll.double() - a.nll.double() for a, b in pairs if a.nll is not None and b.nll is not None])
        if bool(torch.isfinite(d).all()):
            out["nll_diff"], out["nll_p"] = pooled_paired_test(d)
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs: twice the binomial
    tail P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1 (computed with exact integers)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    m, k = b + c, min(b, c)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**m)


def compare_paired(pred_a: Tensor | Predictions, pred_b: Tensor | Predictions,
                   labels: Optional[Tensor] = None) -> PairedComparison:
    """Paired comparison of two models' top-1 predictions on the same images (see
    :class:`PairedComparison`). ``pred_*`` are (N,) class indices, (N, k) top-k indices or
    :class:`Predictions`; ``labels`` defaults to the labels carried by a :class:`Predictions`."""
    from .errors import ConfigError

    la = pred_a.labels if isinstance(pred_a, Predictions) else None
    lb = pred_b.labels if isinstance(pred_b, Predictions) else None
    for other in (la, lb):
        if labels is None:
            labels = other
        elif other is not None and not torch.equal(other, labels):
            raise ConfigError("the two prediction sets were made on different images (labels differ): "
                              "evaluate both models on the same data and --eval-size")
    if labels is None:
        raise ConfigError("compare_paired needs labels: pass labels= or Predictions from vitq.evaluate.predict")
    a = pred_a.top1 if isinstance(pred_a, Predictions) else (pred_a[:, 0] if pred_a.dim() == 2 else pred_a)
    b = pred_b.top1 if isinstance(pred_b, Predictions) else (pred_b[:, 0] if pred_b.dim() == 2 else pred_b)
    if not (a.shape == b.shape == labels.shape) or a.dim() != 1:
        raise ConfigError(f"paired comparison needs predictions of the same images: got shapes "
                          f"{tuple(a.shape)}, {tuple(b.shape)} and labels {tuple(labels.shape)}")
    n = int(labels.numel())
    if n == 0:
        raise ConfigError("paired comparison of 0 images: evaluate on a non-empty set (--eval-size N, N >= 1)")
    ra, rb = a == labels, b == labels
    na = pred_a.nll if isinstance(pred_a, Predictions) else None
    nb = pred_b.nll if isinstance(pred_b, Predictions) else None
    nll: dict[str, Optional[float]] = {}
    if na is not None and nb is not None and na.shape == nb.shape == labels.shape:
        d = nb.double() - na.double()
    if na is not None and nb is not None and na.shape == nb.shape == labels.shape and bool(torch.isfinite(d).all()):
        # (a model with NaN / inf logits has no log-loss to compare: the top-1 comparison stands alone)
        nll = {"nll_a": float(na.double().mean()), "nll_b": float(nb.double().mean()),
               "nll_sd": float(d.std(unbiased=True)) if n > 1 else 0.0}
    return PairedComparison(n=n, top1_a=100.0 * float(ra.float().mean()), top1_b=100.0 * float(rb.float().mean()),
                            only_a=int((ra & ~rb).sum()), only_b=int((rb & ~ra).sum()),
                            agree=100.0 * float((a == b).float().mean()), **nll)


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    """Signal-to-quantization-noise ratio, dB."""
    noise = (ref - out).pow(2).mean().item()
    sig = ref.pow(2).mean().item()
    return float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)


from ._callable import make_callable  # noqa: E402

make_callable(__name__, "evaluate")  # vitq.evaluate(model, data) is evaluate(model, data)
