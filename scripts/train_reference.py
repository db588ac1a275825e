#!/usr/bin/env python
"""Train the Fashion-MNIST reference models on the CPU and write their weights + metadata.

    python scripts/train_reference.py fmnist-vit --epochs 10
    python scripts/train_reference.py fmnist-deit --teacher fmnist-vit --init-from fmnist-vit --epochs 4
                                                                        # DeiT hard distillation
    python scripts/train_reference.py --outliers-only fmnist-vit         # (re)compute outlier scales

Writes ``src/vitq/reference/weights/<name>.safetensors`` and ``<name>.json`` (architecture, FP
test top-1, training settings, outlier scales). Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time

import torch
import torch.nn.functional as F

from vitq.data import FashionMNIST, Preprocess  # noqa: E402
from vitq.models import data_config  # noqa: E402
from vitq.reference import (  # noqa: E402
    REFERENCE_MODELS,
    build_architecture,
    load_meta,
    load_reference,
    meta_path,
    weights_path,
)

log = logging.getLogger("train_reference")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 2-pixel padding and horizontal flip, on a uint8 batch N,1,H,W."""
    n, _, h, w = x.shape
    pad = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, pre: Preprocess, ds: FashionMNIST, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(ds), bs):
        x = torch.stack([pre(im) for im in ds.images[i:i + bs]])
        correct += (model(x).argmax(-1) == ds.targets[i:i + bs]).sum().item()
    return 100.0 * correct / len(ds)


def train(name: str, epochs: int, lr: float, bs: int, seed: int, teacher_name: str | None,
          init_from: str | None = None) -> None:
    torch.manual_seed(seed)
    spec = REFERENCE_MODELS[name]
    model = build_architecture(spec)
    if init_from:
        # start from a trained model of the same width/depth (e.g. DeiT from ViT): shared weights copied,
        # new ones (distillation token, distillation head) from their initialisation
        src = load_reference(init_from).state_dict()
        own = model.state_dict()
        for k, v in src.items():
            if k in own and own[k].shape == v.shape:
                own[k] = v
            elif k == "pos_embed" and k in own:  # one more (distillation) token: copy the class-token slot
                own[k][:, :1] = v[:, :1]
                own[k][:, 1:2] = v[:, :1]
                own[k][:, 2:] = v[:, 1:]
        if "head_dist.weight" in own and "head.weight" in src:
            own["head_dist.weight"], own["head_dist.bias"] = src["head.weight"].clone(), src["head.bias"].clone()
        if "dist_token" in own and "cls_token" in src:
            own["dist_token"] = src["cls_token"].clone()
        model.load_state_dict(own)
    pre = Preprocess(data_config(model))
    train_ds, test_ds = FashionMNIST(None, "train"), FashionMNIST(None, "test")
    teacher = load_reference(teacher_name) if teacher_name else None
    if teacher is not None:
        tpre = Preprocess(data_config(teacher))
        model.set_distilled_training(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = len(train_ds) // bs
    total = epochs * steps_per_epoch
    warm = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(train_ds), generator=g)
        run_loss = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            raw = augment(train_ds.images[idx], g)
            y = train_ds.targets[idx]
            x = torch.stack([pre(im) for im in raw])
            out = model(x)
            if teacher is not None:
                with torch.no_grad():
                    ty = teacher(torch.stack([tpre(im) for im in raw])).argmax(-1)
                cls_out, dist_out = out
                loss = 0.5 * F.cross_entropy(cls_out, y, label_smoothing=0.1) + 0.5 * F.cross_entropy(dist_out, ty)
            else:
                loss = F.cross_entropy(out, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
        acc = evaluate(model, pre, test_ds)
        log.info("%s epoch %d/%d loss %.4f test top-1 %.2f (%.0fs)", name, ep + 1, epochs,
                 run_loss / steps_per_epoch, acc, time.time() - t0)
        save(name, model, acc, dict(epochs=epochs, epochs_done=ep + 1, lr=lr, batch_size=bs, seed=seed,
                                    teacher=teacher_name, init_from=init_from, seconds=round(time.time() - t0, 1),
                                    threads=torch.get_num_threads()))


def save(name: str, model: torch.nn.Module, acc: float, train_cfg: dict) -> None:
    from safetensors.torch import save_file

    weights_path(name).parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(weights_path(name)))
    meta = load_meta(name)
    meta.update(name=name, arch=REFERENCE_MODELS[name].arch, kwargs=REFERENCE_MODELS[name].kwargs,
                fp_top1=round(acc, 2), eval_split="fashion-mnist test (10000 images)", train=train_cfg)
    meta_path(name).write_text(json.dumps(meta, indent=2) + "\n")


def outliers(name: str, seed: int) -> None:
    from vitq.passes.reparam import choose_outlier_scales

    model = load_reference(name)
    pre = Preprocess(data_config(model))
    ds = FashionMNIST(None, "train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:256]
    x = torch.stack([pre(ds.images[i]) for i in idx])
    scales, report = choose_outlier_scales(model, x, seed=seed)
    meta = load_meta(name)
    meta["outlier_scales"] = {k: {str(c): s for c, s in v.items()} for k, v in scales.items()}
    meta["outlier_report"] = report
    meta_path(name).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s outlier scales written: %s", name, report)


def knn_fp(name: str) -> None:
    """An encoder's (``headless``) float k-NN top-1 on the test split, with a bank of 10 000 train images - what
    ``vitq eval`` reports for it by default - written to its metadata as ``fp_knn_top1``."""
    from vitq.data import calibration_subset, make_loader
    from vitq.features import evaluate_features

    model = load_reference(name)
    pre = Preprocess(data_config(model))
    bank = make_loader(calibration_subset(FashionMNIST(None, "train", pre), 10000, 0), batch_size=256)
    test = make_loader(FashionMNIST(None, "test", pre), batch_size=256)
    res = evaluate_features(model, test, bank)
    meta = load_meta(name)
    meta["fp_knn_top1"] = round(res["top1"], 2)
    meta_path(name).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s float k-NN top-1 %.2f", name, res["top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(REFERENCE_MODELS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--teacher", default=None, help="reference model used as DeiT hard-distillation teacher")
    ap.add_argument("--init-from", default=None, help="start from this reference model's weights where shapes match")
    ap.add_argument("--outliers-only", action="store_true", help="only (re)compute the outlier-variant scales")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.outliers_only:
        train(args.name, args.epochs, args.lr, args.batch_size, args.seed, args.teacher, args.init_from)
    outliers(args.name, args.seed)
    if REFERENCE_MODELS[args.name].headless:
        knn_fp(args.name)


if __name__ == "__main__":
    main()
