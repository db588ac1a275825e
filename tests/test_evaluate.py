"""Paired evaluation: predictions, the exact McNemar test and the paired confidence interval."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit

from vitq.errors import ConfigError
from vitq.evaluate import (
    PairedComparison,
    Predictions,
    compare_paired,
    compare_pooled,
    detectable_difference,
    evaluate,
    mcnemar_exact,
    pooled_paired_test,
    predict,
    z_test_p,
)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # b=1, c=9: 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    # large counts stay exact and finite (2^m overflows a float for m > 1023)
    p = mcnemar_exact(1500, 1700)
    assert 0.0 < p < 0.001
    assert mcnemar_exact(1500, 1530) > 0.5
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_compare_paired_counts_and_interval() -> None:
    labels = torch.arange(100) % 10
    a = labels.clone()
    b = labels.clone()
    a[:10] = (labels[:10] + 1) % 10       # A wrong on 10 images
    b[5:25] = (labels[5:25] + 1) % 10     # B wrong on 20 images, 5 of them shared with A
    c = compare_paired(a, b, labels)
    assert (c.n, c.only_a, c.only_b) == (100, 15, 5)
    assert c.top1_a == pytest.approx(90.0) and c.top1_b == pytest.approx(80.0)
    assert c.diff == pytest.approx(c.top1_b - c.top1_a)
    lo, hi = c.ci95
    assert lo < c.diff < hi < 0          # B is worse and the interval says so
    assert c.p_value == pytest.approx(mcnemar_exact(15, 5))
    assert c.agree == pytest.approx(80.0)  # both wrong the same way on 5 images: they agree there
    d = c.to_dict()
    assert d["diff"] == -10.0 and d["only_a_correct"] == 15 and d["ci95"][0] < d["ci95"][1]
    assert "not significant" in compare_paired(a, a, labels).summary()


def test_compare_paired_identical_and_scale() -> None:
    labels = torch.randint(0, 10, (1000,))
    c = compare_paired(labels, labels, labels)
    assert c.diff == 0.0 and c.p_value == 1.0 and c.agree == 100.0 and c.ci95 == (0.0, 0.0)
    # the same discordance rate on 10x the images gives a ~sqrt(10)x narrower interval
    small = PairedComparison(n=1000, top1_a=80, top1_b=81, only_a=20, only_b=30, agree=95)
    big = PairedComparison(n=10000, top1_a=80, top1_b=81, only_a=200, only_b=300, agree=95)
    w = lambda x: x.ci95[1] - x.ci95[0]  # noqa: E731
    assert w(small) / w(big) == pytest.approx(math.sqrt(10), rel=1e-6)
    assert big.p_value < small.p_value


def test_detectable_difference_has_the_promised_power() -> None:
    # 10 000 images, 3 % discordant: the case of our Fashion-MNIST W4A4 comparisons
    n, q = 10000, 0.03
    mde = detectable_difference(int(q * n), n)
    assert mde == pytest.approx(100 * (1.959964 + 0.841621) * math.sqrt(q / n), rel=1e-5)
    assert 0.45 < mde < 0.52
    # simulate pairs whose true difference is exactly the MDE: McNemar finds it about 80 % of the time,
    # and half of it far less often
    gen = torch.Generator().manual_seed(0)

    def found(d_points: float, trials: int = 600) -> float:
        pb = (q + d_points / 100) / 2
        pa = q - pb
        u = torch.rand(trials, n, generator=gen)
        only_a, only_b = (u < pa).sum(1), ((u >= pa) & (u < pa + pb)).sum(1)
        return sum(mcnemar_exact(int(a), int(b)) < 0.05 for a, b in zip(only_a, only_b)) / trials

    assert 0.72 < found(mde) < 0.88
    assert found(mde / 2) < 0.45
    # more images or fewer discordant ones: smaller detectable differences; none measurable from 0
    assert detectable_difference(1200, 40000) < mde and detectable_difference(100, n) < mde
    assert detectable_difference(0, n) is None
    with pytest.raises(ValueError):
        detectable_difference(5, 0)
    c = PairedComparison(n=n, top1_a=86.0, top1_b=86.1, only_a=145, only_b=155, agree=97.0)
    assert c.detectable == pytest.approx(mde) and c.to_dict()["detectable_80pct"] == round(mde, 2)
    assert f"resolves differences of about {mde:.2f} points" in c.summary()


def test_compare_paired_bad_inputs() -> None:
    labels = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ConfigError, match="same images"):
        compare_paired(torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long), labels)
    with pytest.raises(ConfigError, match="0 images"):
        e = torch.zeros(0, dtype=torch.long)
        compare_paired(e, e, e)
    with pytest.raises(ConfigError, match="needs labels"):
        compare_paired(labels, labels)


def test_predict_matches_evaluate_and_carries_labels() -> None:
    torch.manual_seed(0)
    m = tiny_vit(in_chans=1, img_size=28, patch_size=7, num_classes=10)
    x = torch.randn(40, 1, 28, 28)
    y = torch.randint(0, 10, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    p = predict(m, loader)
    assert p.topk.shape == (40, 5) and torch.equal(p.labels, y)
    r = evaluate(m, loader)
    assert r["top1"] == pytest.approx(100.0 * float((p.top1 == y).float().mean()))
    assert torch.equal(r["predictions"].topk, p.topk)
    # Predictions carry their labels; labels from another set are refused
    assert compare_paired(p, r["predictions"]).agree == 100.0
    other = type(p)(p.topk, (y + 1) % 10, 0.0)
    with pytest.raises(ConfigError, match="different images"):
        compare_paired(p, other)
    # per-image cross-entropy, as torch computes it, and its mean in evaluate()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(m(x), y, reduction="none")
    assert p.nll is not None and torch.allclose(p.nll, ref, atol=1e-6)
    assert r["nll"] == pytest.approx(float(ref.mean()), abs=1e-6)
    # labels that are not class indices of the logits (out of range, or soft / float): no log-loss, no error
    for bad in ((y + 10), y.float()):
        bl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, bad), batch_size=16)
        assert predict(m, bl).nll is None and evaluate(m, bl)["nll"] is None


def _preds(nll: torch.Tensor, labels: torch.Tensor) -> Predictions:
    return Predictions(labels.unsqueeze(1), labels, 0.0, nll)


def test_paired_log_loss_test() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.randint(0, 10, (n,), generator=gen)
    base = torch.rand(n, generator=gen).pow(3) * 4  # heavy-ish tail, like real per-image log-losses
    # known values: B's log-loss is A's + 0.01 on every image -> diff 0.01, sd 0, p 0
    c = compare_paired(_preds(base, labels), _preds(base + 0.01, labels))
    assert c.nll_diff == pytest.approx(0.01, abs=1e-6) and c.nll_sd == pytest.approx(0.0, abs=1e-6)
    assert c.nll_a == pytest.approx(float(base.double().mean())) and c.nll_p == pytest.approx(0.0, abs=1e-12)
    same = compare_paired(_preds(base, labels), _preds(base, labels))
    assert same.nll_diff == 0.0 and same.nll_p == 1.0 and same.nll_ci95 == (0.0, 0.0)
    d = same.to_dict()
    assert d["nll_diff"] == 0.0 and d["nll_p"] == 1.0 and "test log-loss B - A: +0.0000" in same.summary()

    # under the null (A and B exchangeable on every image) the z-test rejects about 5 % of the time ...
    def rejects(shift: float, trials: int = 400) -> float:
        hits = 0
        for _ in range(trials):
            noise = torch.randn(n, generator=gen) * 0.05 * base  # per-image disagreement, larger on hard images
            b = base + noise + shift
            swap = torch.rand(n, generator=gen) < 0.5  # exchangeability: which model is which, per image
            a2, b2 = torch.where(swap, b - shift, base), torch.where(swap, base + shift, b)
            hits += compare_paired(_preds(a2, labels), _preds(b2, labels)).nll_p < 0.05
        return hits / trials

    assert 0.02 < rejects(0.0) < 0.09
    # ... and finds a shift of 3 standard errors almost always
    sd = float((torch.randn(n, generator=gen) * 0.05 * base).std())
    assert rejects(3 * sd / math.sqrt(n)) > 0.75
    # the interval is centred on the difference and shrinks as 1/sqrt(n)
    small, big = (PairedComparison(n=k, top1_a=80, top1_b=80, only_a=0, only_b=0, agree=100, nll_a=0.40,
                                   nll_b=0.39, nll_sd=0.2) for k in (1000, 4000))
    w = lambda x: x.nll_ci95[1] - x.nll_ci95[0]  # noqa: E731
    assert w(small) / w(big) == pytest.approx(2.0) and sum(big.nll_ci95) / 2 == pytest.approx(-0.01)
    assert big.nll_p < small.nll_p
    # a NaN log-loss (a model with NaN logits) leaves the log-loss test out instead of reporting NaN
    bad = base.clone()
    bad[3] = float("nan")
    nan_cmp = compare_paired(_preds(base, labels), _preds(bad, labels))
    assert nan_cmp.nll_diff is None and nan_cmp.nll_p is None and "nll_p" not in nan_cmp.to_dict()
    assert "log-loss" not in nan_cmp.summary()
    # plain class-index tensors carry no log-loss: top-1 only
    assert compare_paired(labels, labels, labels).nll_p is None


def test_pooled_paired_test_over_seeds() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 3000
    d = torch.randn(n, generator=gen, dtype=torch.float64) + 0.05
    # one seed: the plain paired z-test; the same seed repeated: the same test, not S times the evidence
    m1, p1 = pooled_paired_test(d.unsqueeze(0))
    assert m1 == pytest.approx(float(d.mean())) and p1 == pytest.approx(z_test_p(float(d.mean()), float(d.std()), n))
    assert pooled_paired_test(d.repeat(5, 1))[1] == pytest.approx(p1)
    # the pooled mean is the mean of the per-seed means
    ds = torch.randn(4, n, generator=gen)
    assert pooled_paired_test(ds)[0] == pytest.approx(float(ds.mean(1).mean()))
    # seeds that share the test images (an image effect common to every seed) and no true difference:
    # the pooled test keeps its 5 % level, where counting seeds as independent tests would not
    hits = 0
    for _ in range(300):
        image = torch.randn(n, generator=gen)
        hits += pooled_paired_test(image + 0.5 * torch.randn(5, n, generator=gen))[1] < 0.05
    assert 0.02 < hits / 300 < 0.09
    with pytest.raises(ValueError):
        pooled_paired_test(d)


def test_compare_pooled() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 500
    labels = torch.randint(0, 10, (n,), generator=gen)
    fp = _preds(torch.rand(n, generator=gen), labels)
    seeds = []
    for _ in range(3):
        top1 = labels.clone()
        wrong = torch.rand(n, generator=gen) < 0.1
        top1[wrong] = (labels[wrong] + 1) % 10
        seeds.append((fp, Predictions(top1.unsqueeze(1), labels, 0.0, fp.nll + 0.02 + 0.01 * torch.randn(n, generator=gen))))
    r = compare_pooled(seeds)
    per = [compare_paired(a, b) for a, b in seeds]
    assert r["seeds"] == 3 and r["diff"] == pytest.approx(sum(c.diff for c in per) / 3)
    assert r["p_value"] < 1e-6  # about 10 % wrong on every seed, FP always right
    assert r["nll_diff"] == pytest.approx(sum(c.nll_diff for c in per) / 3) and r["nll_p"] < 1e-6
    # no log-loss on one side: top-1 only; mismatched images: the paired comparison's error
    r2 = compare_pooled([(fp, Predictions(b.topk, b.labels, 0.0)) for _, b in seeds])
    assert r2["nll_p"] is None and r2["p_value"] == pytest.approx(r["p_value"])
    with pytest.raises(ConfigError, match="different images"):
        compare_pooled([(fp, Predictions(fp.topk, (labels + 1) % 10, 0.0))])
    with pytest.raises(ConfigError, match="0 seeds"):
        compare_pooled([])
    # every seed on the same images: another evaluation set (or size) is refused, not stacked
    for other in (labels[:-1], (labels + 1) % 10):
        o = _preds(torch.rand(len(other), generator=gen), other)
        with pytest.raises(ConfigError, match="seeds' predictions were made on different images"):
            compare_pooled([seeds[0], (o, o)])


def test_outputs_that_are_not_finite_are_counted_and_said(caplog) -> None:
    """fqvit at W4A4 gives NaN logits for every image; the run reported "quantized top-1 9.00 %" as an accuracy,
    with no word that the outputs were NaN. Evaluation counts such images, and a trial says so in one warning."""
    import logging

    import torch
    from conftest import tiny_vit
    from torch import nn

    from vitq.evaluate import evaluate
    from vitq.run.execute import trial

    class HalfNaN(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = x.flatten(1)[:, :4].clone()
            out[::2] = float("nan")
            return out

    x, y = torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)
    assert evaluate(HalfNaN(), (x, y))["nonfinite"] == 4
    assert evaluate(tiny_vit(), (x, y))["nonfinite"] == 0
    from vitq.features import evaluate_features

    yl = torch.arange(8) % 2
    assert evaluate_features(HalfNaN(), [(x, yl)], [(x, yl)])["nonfinite"] == 4  # an encoder's NaN embeddings too
    caplog.set_level(logging.WARNING, logger="vitq.run")
    trial(tiny_vit(), "minmax", "W8A8", x, 0, [(x, y)], evaluator=lambda m, d: {**evaluate(HalfNaN(), (x, y)), "n": 8})
    assert "4 of 8 evaluation images gave NaN / inf outputs from the model quantized with minmax at W8A8" in caplog.text
    caplog.clear()
    trial(tiny_vit(), "minmax", "W8A8", x, 0, [(x, y)])
    assert "NaN" not in caplog.text
