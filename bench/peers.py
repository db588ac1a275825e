#!/usr/bin/env python3
"""Baseline fidelity: vitq's recipe beside the peer's own, unmodified code, on every reference model.

    python -m bench.peers --repq DIR --ptq4vit DIR2 --fqvit DIR3   # checkouts of the peers (not part of vitq)
    python -m bench.peers --ptq4vit DIR2 --models fmnist-deit --bits W3A3 --seeds 0
    python -m bench.peers --render

Each peer runs in a worker process that imports its checkout; the glue hands the peer's own entry point
our model and data instead of an ImageNet folder and a pretrained download, and reads its predictions.
Shims only where the peer's code meets an interface that changed since its timm (0.4.12 / 0.4.x in their
requirements) or hardware it assumes; each is named here and ``--check-shims`` shows the model-side ones
keep the float function.

**RepQ-ViT** (zkkli/RepQ-ViT, ``classification/test_quant.main()``, recipe ``repq``): ``build_model`` is
the peer's own, with ``timm.create_model`` answering our reference model; ``build_dataset`` yields one batch
of the calibration images (its ``--calib-batchsize`` 32 = vitq ``repq``'s ``calib_size``) and the test
images; ``validate`` is vitq's ``predict`` on the model the peer quantized. Everything between
(``quant_model``, the first calibration forward, the scale reparameterization, the re-calibration) is the
peer's code. Shims:

* ``Attention.forward`` is called with ``attn_mask`` / ``is_causal`` keywords in timm 1.x: the peer's
  replacement forward takes ``x`` alone, so a wrapper drops them (they are None / False here);
* timm 1.x attention modules carry ``q_norm`` / ``k_norm`` / ``norm`` and ``Mlp`` a ``norm`` (all Identity
  here; the peer's attention forward does not call them): their names contain ``norm``, which the peer's
  reparameterization loop takes for a Swin patch-merging norm (``father_module.reduction``) and fails, so
  the Identity modules are removed and ``Mlp`` runs timm 0.4.12's forward (fc1, act, drop, fc2, drop);
* timm 1.x ``PatchMerging`` works on (B, H, W, C) tensors; the peer's channel-wise calibration reads a 4-D
  input as a convolution's (channels on dim 0), so the merge is computed on (B, L, 4C) tokens as in timm
  0.4.12 (the same function; tested against timm's in this file's ``--check-shims``).

**PTQ4ViT** (hahnyuan/PTQ4ViT, ``example/test_all.test_all()`` with its own ``cfg_modifier`` at
``linear_ptq_setting=(1, 1, 1)``, ``metric="hessian"``, config ``PTQ4ViT``, 32 calibration images; recipe
``ptq4vit``): ``utils.models.get_net`` is the peer's own (it swaps in its attention forwards with
``matmul1`` / ``matmul2``), with ``timm.create_model`` answering our model; ``ViTImageNetLoaderGenerator``
gives a calibration loader of the 32 images (batch 32) and the test batches; ``test_classification`` is
vitq's ``predict``. ``net_wrap``, ``HessianQuantCalibrator.batching_quant_calib`` and every quantizer are
the peer's code. Shims:

* the peer's code is CUDA-only (``.cuda()`` on every tensor and the model); our hosts have no GPU, so
  ``Tensor.cuda`` / ``Module.cuda`` return their object unchanged in the worker (the arithmetic is the
  same; the chunking it derives from a 3 GiB GPU budget is kept);
* ``example/test_all.py`` imports ``timm.models.layers.config`` (unused; ``timm.layers.config`` in timm
  1.x): it is aliased;
* ``net_wrap`` maps a Linear to its quantizer by its last name (``head``, ``qkv``, ...) and fails on any
  other: timm 1.x Swin's classifier is ``head.fc`` (timm 0.4.12: ``head``) and the distilled DeiT's second
  head ``head_dist`` (also a KeyError in the peer's code on timm 0.4.12): each is put in a one-child
  container so that it is reached as ``head.fc.head`` / ``head_dist.head`` and quantized as the peer's
  classifier (``qlinear_classifier``), as vitq's recipe quantizes both heads (the HEAD role).
* the Attention keyword wrapper of RepQ-ViT's list (timm 1.x ``Block`` passes ``attn_mask``).

Each (model, bits, seed): the same 32 calibration images (``calibration_subset(train, 32, seed)``) and the
same 10 000 test images for the peer and vitq; top-1 of each and the pooled paired test of vitq against the peer over
the seeds (``vitq.evaluate.compare_pooled``). Writes ``bench/results/peers.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import nn

import vitq
from bench.common import (
    MODELS,
    RESULTS,
    ROOT,
    FashionData,
    available,
    file_lock,
    machine_line,
    md_table,
    save_rows,
    setup,
    write_md,
)
from vitq.data import calibration_subset, stack_images
from vitq.evaluate import Predictions, compare_pooled, predict
from vitq.recipes import load_recipe, parse_assignments, set_pass_options
from vitq.reference import load_reference

OUT = RESULTS / "peers.json"
BITS = ["W8A8", "W6A6", "W4A4", "W3A3"]
TARGET = {"W8A8": 1.0, "W6A6": 1.0, "W4A4": 1.0, "W3A3": 1.5}  # |vitq - peer| pooled over 3 seeds
CALIB = 32
FQVIT_CALIB = 1000  # FQ-ViT's --calib-batchsize 100 x --calib-iter 10


# -- timm 1.x shims (see the module docstring) ------------------------------------------------------------
def _merge_tokens(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm 1.x PatchMerging.forward computed on (B, L, 4C) tokens, as timm 0.4.12 fed norm / reduction."""
    B, H, W, C = x.shape
    x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = x.shape
    x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
    h, w = x.shape[1], x.shape[2]
    x = self.reduction(self.norm(x.reshape(B, h * w, -1)))
    return x.reshape(B, h, w, -1)


def shim_before(model: nn.Module) -> nn.Module:
    from timm.models.swin_transformer import PatchMerging

    for m in model.modules():
        if isinstance(m, PatchMerging):
            m.forward = MethodType(_merge_tokens, m)
    return model


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm 0.4.12's Mlp.forward (timm 1.x adds a ``norm`` between act and fc2, Identity here)."""
    return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def shim_after(model: nn.Module) -> nn.Module:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Mlp) and "norm" in m._modules:
            assert isinstance(m._modules["norm"], nn.Identity), "Mlp.norm is not Identity"
            del m._modules["norm"]
            m.forward = MethodType(_mlp_forward, m)
        if isinstance(m, Attention):  # the peer's forward is in place: the Identity norms it skips can go
            for n in ("q_norm", "k_norm", "norm"):
                if n in m._modules:
                    assert isinstance(m._modules[n], nn.Identity), f"{n} is not Identity: the peer's forward skips it"
                    del m._modules[n]
            _drop_attention_kwargs(m)
    return model


def _drop_attention_kwargs(m: nn.Module) -> None:
    """timm 1.x Block calls its attention with ``attn_mask`` / ``is_causal`` (None / False here); the peers'
    replacement forwards take ``x`` alone."""
    peer_forward = m.forward

    def forward(x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> Any:
        assert attn_mask is None and not is_causal
        return peer_forward(x)

    m.forward = forward  # type: ignore[method-assign]


def check_shims() -> None:
    """The shims leave each reference model's float function unchanged (before the peer touches it)."""
    for name in MODELS:
        model = load_reference(name)
        x = torch.randn(4, *model.pretrained_cfg["input_size"])
        with torch.no_grad():
            ref = model(x)
            got = shim_before(copy.deepcopy(model))(x)
        assert torch.allclose(ref, got, atol=1e-5), name
        print(f"{name}: shims keep the float function (max |diff| {float((ref - got).abs().max()):.2e})")


# -- the peers, each in a worker process -------------------------------------------------------------------
def _validate_capture(captured: dict[str, Any]) -> Any:
    def validate(args: Any, val_loader: Any, q_model: nn.Module, criterion: Any, device: Any) -> Any:
        p = predict(q_model, val_loader)
        captured["pred"] = p
        return 0.0, 100.0 * float((p.top1 == p.labels).double().mean()), 0.0
    return validate


def repq_worker(model_name: str, bits_list: list[str], seeds: list[int]) -> dict[str, Any]:
    import test_quant  # the peer's script (classification/ is on this process's PYTHONPATH)

    peer_bm = sys.modules["utils.build_model"]  # the peer's module (its package re-exports a function of that name)
    base = load_reference(model_name)
    fd = FashionData(base)
    batches = list(fd.eval_loader)
    res: dict[str, Any] = {}
    for bits in bits_list:
        w, a = int(bits[1]), int(bits[3])
        for seed in seeds:
            calib = stack_images(calibration_subset(fd.train, CALIB, seed))
            model = shim_before(copy.deepcopy(base))
            peer_bm.timm = SimpleNamespace(create_model=lambda name, pretrained=True, _m=model: _m)
            captured: dict[str, Any] = {}
            test_quant.build_model = lambda name: shim_after(peer_bm.build_model(name))
            test_quant.build_dataset = lambda args, _c=calib: ([_c], batches)
            test_quant.validate = _validate_capture(captured)
            test_quant.args = argparse.Namespace(
                model="swin_tiny" if "swin" in model_name else "deit_small", dataset="", calib_batchsize=CALIB,
                val_batchsize=256, num_workers=0, device="cpu", print_freq=10**9, seed=seed, w_bits=w, a_bits=a)
            t0 = time.perf_counter()
            test_quant.main()
            res[f"{bits}/{seed}"] = _record(captured["pred"], time.perf_counter() - t0)
            _say("RepQ-ViT", model_name, bits, seed, captured["pred"])
    return res


class _Named(nn.Module):
    """One child under the name the peer's ``net_wrap`` knows (``head``), with the same function."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.head = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def ptq4vit_shim(model: nn.Module) -> nn.Module:
    """The heads under a name PTQ4ViT's ``net_wrap`` maps (see the module docstring)."""
    head = getattr(model, "head", None)
    if head is not None and isinstance(getattr(head, "fc", None), nn.Linear):  # timm 1.x ClassifierHead
        head.fc = _Named(head.fc)
    if isinstance(getattr(model, "head_dist", None), nn.Linear):  # distilled DeiT
        model.head_dist = _Named(model.head_dist)
    return model


def _attention_kwargs(model: nn.Module) -> nn.Module:
    """timm 1.x Block passes attn_mask / is_causal to the attention the peer's forward replaced."""
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            _drop_attention_kwargs(m)
    return model


def ptq4vit_worker(model_name: str, bits_list: list[str], seeds: list[int]) -> dict[str, Any]:
    import timm.layers.config

    sys.modules.setdefault("timm.models.layers.config", timm.layers.config)
    # CUDA-only code on a CPU host: .cuda() returns its object (module docstring)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    import test_all  # the peer's example/test_all.py (example/ and the checkout are on PYTHONPATH)
    import utils.models as peer_models

    base = load_reference(model_name)
    fd = FashionData(base)
    batches = list(fd.eval_loader)
    res: dict[str, Any] = {}
    for bits in bits_list:
        w, a = int(bits[1]), int(bits[3])
        for seed in seeds:
            x, y = stack_images(calibration_subset(fd.train, CALIB, seed))
            calib_batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=CALIB)
            model = ptq4vit_shim(copy.deepcopy(base))
            peer_models.timm = SimpleNamespace(create_model=lambda name, pretrained=True, _m=model: _m)
            test_all.get_net = lambda name, _g=peer_models.get_net: _attention_kwargs(_g(name))

            class Loaders:
                def __init__(self, *args: Any, _c: Any = calib_batches, **kwargs: Any) -> None:
                    self.calib = _c

                def test_loader(self) -> Any:
                    return batches

                def calib_loader(self, num: int = CALIB) -> Any:
                    assert num == CALIB
                    return self.calib

            captured: dict[str, Any] = {}

            def test_classification(net: nn.Module, loader: Any, max_iteration: Any = None, description: Any = None,
                                    _cap: dict[str, Any] = captured) -> float:
                _cap["pred"] = p = predict(net, loader)
                return float((p.top1 == p.labels).double().mean())

            test_all.datasets = SimpleNamespace(ViTImageNetLoaderGenerator=Loaders)
            test_all.test_classification = test_classification
            modifier = test_all.cfg_modifier(linear_ptq_setting=(1, 1, 1), metric="hessian", bit_setting=(w, a))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                test_all.test_all(model_name, lambda cfg, _m=modifier: _ptq4vit_ablate(_m(cfg)),
                                  calib_size=CALIB, config_name="PTQ4ViT")
            res[f"{bits}/{seed}"] = _record(captured["pred"], time.perf_counter() - t0)
            _say("PTQ4ViT", model_name, bits, seed, captured["pred"])
    return res


def _ptq4vit_ablate(cfg: Any) -> Any:
    """PTQ4ViT's config with the ``--ablate`` choices of :data:`PTQ4VIT_ABLATIONS` made vitq's way (cause-finding
    only; the table of record runs the config unchanged)."""
    chosen = _ablations()
    if "qkv_groups" in chosen:  # the qkv weight as one row group: built as the peer builds proj (n_V = 1)
        peer_get = cfg.get_module
        cfg.get_module = lambda kind, *a, _g=peer_get, **k: _g("qlinear_proj" if kind == "qlinear_qkv" else kind,
                                                               *a, **k)
    if "heads" in chosen:  # matmul operands with one scale per tensor, not per head (n_G = 1)
        from quant_layers.matmul import PTQSLBatchingQuantMatMul, PTQSLQuantMatMul

        PTQSLBatchingQuantMatMul._get_padding_parameters = PTQSLQuantMatMul._get_padding_parameters
    if "sos_sum" in chosen:  # the twin softmax decoded one region per element, as vitq's twin_uniform does
        from quant_layers.matmul import SoSPTQSLBatchingQuantMatMul as SoS

        SoS.quant_input_A = lambda self, x: _one_region(x, self.split, self.A_qmax - 1)
        SoS._search_best_A_interval = _split_search_one_region
    return cfg


def _one_region(x: torch.Tensor, split: Any, q: int) -> torch.Tensor:
    """PTQ4ViT's two softmax regions (``[split, 1]`` with step ``1/q``, ``[0, split)`` with step ``split/q``,
    switching at ``split`` as its code does), each element decoded from its own region only. The code returns
    the sum of both regions' values, so an element ``>= split`` also gets the saturated low term (``+split``)."""
    high = (x.clamp(split, 1) * q).round().clamp(0, q) / q
    low = (x.clamp(0, split) / (split / q)).round().clamp(0, q) * (split / q)
    return torch.where(x >= split, high, low)


def _split_search_one_region(self: Any, candidates: torch.Tensor) -> None:
    """The split search of PTQ4ViT's ``SoSPTQSLBatchingQuantMatMul`` (the same candidates, calibration batches,
    metric and reduction: the metric's mean over heads and rows, summed over images) with :func:`_one_region`
    as the decode. Cause-finding only (``--ablate sos_sum``)."""
    q = self.A_qmax - 1
    score = torch.zeros(len(candidates))
    for b0 in range(0, self.calib_size, self.calib_batch_size):
        b1 = min(self.calib_size, b0 + self.calib_batch_size)
        a, b = (t[b0:b1].unsqueeze(0) for t in self.raw_input)
        raw_out, raw_grad = self.raw_out[b0:b1].unsqueeze(0), self.raw_grad[b0:b1]
        for i, split in enumerate(candidates):
            sim = self._get_similarity(raw_out, _one_region(a, split, q) @ b, self.metric, raw_grad=raw_grad)
            score[i] += float(sim.mean([2, 3]).sum())
    self.split = candidates[int(score.argmax())]
    self.A_interval = self.split / q


def _swin_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 1.x Swin keys -> the official / timm 0.4.12 layout FQ-ViT's SwinTransformer loads: stage i's
    leading ``downsample`` is stage i-1's trailing one, and the classifier is ``head`` (not ``head.fc``)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k.replace("head.fc.", "head.")] = v
    return out


def fqvit_model(model_name: str, base: nn.Module, cfg: Any) -> nn.Module:
    """Our reference model as FQ-ViT's own model class (models/vit_quant.py, models/swin_quant.py) with our
    weights, built as the peer's own builders build their family (QIntLayerNorm; the image input quantized
    for DeiT and Swin, not for ViT, as in its deit_* / swin_* / vit_* functions). The distilled DeiT has no
    class in FQ-ViT: the glue adds the distillation token and a second head made like the peer's head."""
    from functools import partial

    from models.ptq import QIntLayerNorm, QLinear
    from models.swin_quant import SwinTransformer
    from models.vit_quant import VisionTransformer

    from vitq.reference import REFERENCE_MODELS

    spec = REFERENCE_MODELS[model_name.removesuffix("-outlier")]
    kw = dict(spec.kwargs)
    sd = dict(base.state_dict())
    model: nn.Module
    if spec.arch == "swin":
        kw.pop("qkv_bias", None)
        model = SwinTransformer(**kw, norm_layer=QIntLayerNorm, input_quant=True, cfg=cfg)
        sd = _swin_state(sd)
    elif spec.arch == "deit":

        class Distilled(VisionTransformer):  # type: ignore[misc, valid-type]
            def __init__(self, **k: Any) -> None:
                super().__init__(**k)
                d, n = self.embed_dim, self.patch_embed.num_patches
                self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
                self.pos_embed = nn.Parameter(torch.zeros(1, n + 2, d))
                self.head_dist = QLinear(d, self.num_classes, bit_type=cfg.BIT_TYPE_W,
                                         calibration_mode=cfg.CALIBRATION_MODE_W, observer_str=cfg.OBSERVER_W,
                                         quantizer_str=cfg.QUANTIZER_W)

            def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # the peer's, with two tokens
                B = x.shape[0]
                if self.input_quant:
                    x = self.qact_input(x)
                x = self.patch_embed(x)
                x = torch.cat((self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x), dim=1)
                x = self.qact_embed(x)
                x = x + self.qact_pos(self.pos_embed)
                x = self.qact1(x)
                x = self.pos_drop(x)
                for i, blk in enumerate(self.blocks):
                    last = self.qact1.quantizer if i == 0 else self.blocks[i - 1].qact4.quantizer
                    x = blk(x, last)
                x = self.norm(x, self.blocks[-1].qact4.quantizer, self.qact2.quantizer)[:, :2]
                return self.qact2(x)

            def forward(self, x: torch.Tensor) -> torch.Tensor:  # timm's eval: the mean of the two heads
                t = self.forward_features(x)
                return self.act_out((self.head(t[:, 0]) + self.head_dist(t[:, 1])) / 2)

        model = Distilled(**kw, norm_layer=partial(QIntLayerNorm, eps=1e-6), input_quant=True, cfg=cfg)
    else:
        model = VisionTransformer(**kw, norm_layer=partial(QIntLayerNorm, eps=1e-6), input_quant=False, cfg=cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    for what in _ablations():  # cause-finding only (--ablate): some of the peer's quantizers left out
        if what == "image":
            model.input_quant = False  # the image input stays float, as in every vitq recipe
            continue
        if what == "int_norm":  # LayerNorm in float on its PTF-quantized input (vitq's simulation), not integer
            model.model_quant = _float_norm_after(model, QIntLayerNorm)
            continue
        if what in WIDENED:  # these quantizers kept, calibrated and run at 8 bits (their QIntLayerNorm reads them)
            _widen(model, WIDENED[what]["swin" if spec.arch == "swin" else "vit"])
            continue
        pattern = ABLATIONS[what]["swin" if spec.arch == "swin" else "vit"]
        for name, _ in list(model.named_modules()):
            if name and re.search(pattern, name):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    params = {n for n, _ in model.named_parameters()}
    assert not unexpected and not (params & set(missing)), (unexpected, sorted(params & set(missing)))
    model.eval()
    x = torch.randn(4, *spec.input_size)
    with torch.no_grad():  # before calibration every quantizer is off: the peer's model is our float model
        assert torch.allclose(model(x), base(x), atol=1e-4), f"FQ-ViT's {spec.arch} does not compute our model"
    return model


def fqvit_worker(model_name: str, bits_list: list[str], seeds: list[int]) -> dict[str, Any]:
    import test_quant  # the peer's script (the checkout is on PYTHONPATH and the working folder)
    from models.ptq.bit_type import BitType

    base = load_reference(model_name).eval()
    fd = FashionData(base)
    res: dict[str, Any] = {}
    family = {"swin": "swin_tiny", "deit": "deit_small"}.get(model_name.split("-")[1], "vit_base")
    for bits in bits_list:
        w, a = int(bits[1]), int(bits[3])
        for seed in seeds:
            x, y = stack_images(calibration_subset(fd.train, FQVIT_CALIB, seed))
            calib_set = torch.utils.data.TensorDataset(x, y)

            class Config(test_quant.Config):  # type: ignore[misc, name-defined]
                def __init__(self, *args: Any, _w: int = w, _a: int = a) -> None:
                    super().__init__(*args)
                    self.BIT_TYPE_W = BitType(_w, True)  # FQ-ViT's bit types at the row's width
                    self.BIT_TYPE_A = BitType(_a, False)  # (its softmax keeps uint4 with --lis)

            captured: dict[str, Any] = {}
            test_quant.Config = Config
            test_quant.str2model = lambda name: lambda pretrained=True, cfg=None: fqvit_model(model_name, base, cfg)
            test_quant.datasets = SimpleNamespace(
                ImageFolder=lambda root, transform=None, _c=calib_set: _c if root.endswith("train") else fd.eval_set)
            test_quant.validate = _validate_capture(captured)
            sys.argv = ["test_quant.py", family, "/fashion-mnist", "--quant", "--ptf", "--lis", "--quant-method",
                        "minmax", "--calib-batchsize", "100", "--calib-iter", str(FQVIT_CALIB // 100), "--val-batchsize",
                        "256", "--num-workers", "0", "--device", "cpu", "--seed", str(seed)]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                test_quant.main()
            res[f"{bits}/{seed}"] = _record(captured["pred"], time.perf_counter() - t0)
            _say("FQ-ViT", model_name, bits, seed, captured["pred"])
    return res


#: what ``--ablate`` can leave out of FQ-ViT's model (cause-finding; the table of record is the unmodified code):
#: the activation quantizers FQ-ViT has and vitq's ``fqvit`` has not, by the names in its ViT / Swin classes
ABLATIONS: dict[str, dict[str, str]] = {
    "logits": {"vit": r"^act_out$", "swin": r"^act_out$"},  # the head's output
    "branch": {"vit": r"(attn\.qact3|mlp\.qact2)$", "swin": r"(attn\.qact4|mlp\.qact2)$"},  # proj / fc2 outputs
    "qkv": {"vit": r"attn\.qact1$", "swin": r"attn\.qact1$"},  # the qkv output, one scale for q, k and v
    "embed": {"vit": r"^(qact_embed|qact_pos)$", "swin": r"attn\.qact_table$"},  # tokens + position table / bias table
    "image": {},  # the image input (DeiT and Swin; FQ-ViT's ViT keeps it float)
    "int_norm": {},  # not a quantizer: the integer LayerNorm (8-bit requantization multiplier) run in float
    "post_ln8": {},  # not left out: the post-LayerNorm outputs at 8 bits (WIDENED)
}
#: what ``--ablate`` widens to 8 bits instead of leaving out: FQ-ViT's integer LayerNorm requantizes its output
#: on the scale of the quantizer after it, so leaving that quantizer out would still round on the A-bit step.
#: ``post_ln8``: every LayerNorm's output (the qkv, fc1, patch-merging reduction and head inputs: vitq's QKV_IN,
#: FC1_IN, REDUCTION_IN, HEAD_IN), where the outlier twins' 8-32x channels sit on one per-tensor grid
WIDENED: dict[str, dict[str, str]] = {
    "post_ln8": {"vit": r"^(blocks\.\d+\.(qact1|qact3)|qact2)$",
                 "swin": r"^(layers\.\d+\.blocks\.\d+\.(qact1|qact3)|layers\.\d+\.downsample\.qact1|qact2)$"},
}
#: what ``--ablate`` changes in PTQ4ViT's config (cause-finding): its granularities that vitq's ptq4vit has not
PTQ4VIT_ABLATIONS = {
    "qkv_groups": "the qkv weight in one row group (PTQ4ViT: q, k and v rows each with their own scale)",
    "heads": "the matmul operands q, k, v with one scale per tensor (PTQ4ViT: one per head)",
    "sos_sum": "the twin softmax decoded one region per element (PTQ4ViT: the sum of both regions' values)",
}


def _widen(model: nn.Module, pattern: str) -> None:
    """FQ-ViT's activation quantizers whose names match ``pattern`` at 8 bits (unsigned, as its activations),
    before calibration: the observer and quantizer read the bit type when they compute their range."""
    from models.ptq.bit_type import BitType

    eight = BitType(8, False)
    hits = 0
    for name, m in model.named_modules():
        if name and re.search(pattern, name):
            m.bit_type = m.quantizer.bit_type = m.quantizer.observer.bit_type = eight
            hits += 1
    assert hits, f"no FQ-ViT quantizer matches {pattern}"


def _float_norm_after(model: nn.Module, norm_type: type) -> Callable[[], None]:
    """``model.model_quant`` (the peer's switch to quantized mode) leaving its LayerNorms in float mode."""
    peer_quant = model.model_quant

    def quant() -> None:
        peer_quant()
        for m in model.modules():
            if isinstance(m, norm_type):
                m.mode = "ln"
    return quant


def _ablations() -> list[str]:
    return [a for a in os.environ.get("VITQ_PEER_ABLATE", "").split(",") if a]


def _record(p: Predictions, seconds: float) -> dict[str, Any]:
    return {"top1": p.top1, "labels": p.labels, "nll": p.nll, "seconds": round(seconds, 2)}


def _say(peer: str, model_name: str, bits: str, seed: int, p: Predictions) -> None:
    print(f"peer {peer} {model_name} {bits} seed {seed}: {100.0 * float((p.top1 == p.labels).double().mean()):.2f}",
          file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str  # as the table names it
    recipe: str  # vitq's recipe that claims to be it
    repo: str  # owner/name on GitHub
    marker: str  # a file a checkout has
    paths: tuple[str, ...]  # folders of the checkout on the worker's PYTHONPATH
    cwd: str  # the worker's working folder in the checkout (the peer reads paths relative to it)
    worker: Callable[[str, list[str], list[int]], dict[str, Any]]
    calib: int = CALIB  # calibration images per seed (each peer's own default; vitq's recipe has the same)


PEERS = {
    "repq": Peer("RepQ-ViT", "repq", "zkkli/RepQ-ViT", "classification/test_quant.py", ("classification",),
                 "classification", repq_worker),
    "ptq4vit": Peer("PTQ4ViT", "ptq4vit", "hahnyuan/PTQ4ViT", "example/test_all.py", ("", "example"), "",
                    ptq4vit_worker),
    "fqvit": Peer("FQ-ViT", "fqvit", "megvii-research/FQ-ViT", "test_quant.py", ("",), "", fqvit_worker, FQVIT_CALIB),
}


def worker_main(key: str, model_name: str, bits_list: list[str], seeds: list[int], out: str) -> None:
    setup(threads=1)
    torch.save(PEERS[key].worker(model_name, bits_list, seeds), out)


CACHE = ROOT / "bench" / "cache" / "peers"


def run_peer(key: str, repo: Path, model_name: str, bits_list: list[str], seeds: list[int]) -> dict[str, Any]:
    """The peer's predictions per ``bits/seed``, cached per model, peer commit and ablation (they do not
    depend on vitq)."""
    ablate = "".join(f"-no-{a}" for a in _ablations())
    cache = CACHE / f"{key}-{_commit(repo)[:12]}{ablate}-{model_name}.pt"
    have: dict[str, Any] = torch.load(cache, weights_only=False) if cache.is_file() else {}
    for seed in seeds:  # one worker per seed, for the widths that seed lacks: cached runs are never repeated
        todo_bits = [b for b in bits_list if f"{b}/{seed}" not in have]
        if todo_bits:
            have = _merge_cache(cache, _run_peer(key, repo, model_name, todo_bits, [seed]))
    return have


def _merge_cache(cache: Path, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` merged into the cache file under a lock: several bench processes may add runs of one model
    at once, and each must keep the others' (re-read, not the copy read before its peer run)."""
    with file_lock(cache):
        have: dict[str, Any] = torch.load(cache, weights_only=False) if cache.is_file() else {}
        have.update(new)
        torch.save(have, cache)
    return have


def _run_peer(key: str, repo: Path, model_name: str, bits_list: list[str], seeds: list[int]) -> dict[str, Any]:
    peer = PEERS[key]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.pt"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([*(str(repo / p) for p in peer.paths), str(ROOT)])}
        cmd = [sys.executable, "-m", "bench.peers", "--worker", key, model_name, "--bits", *bits_list,
               "--seeds", *map(str, seeds), "--worker-out", str(out)]
        done = subprocess.run(cmd, env=env, cwd=repo / peer.cwd, stdout=subprocess.DEVNULL, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{peer.name}'s code failed on {model_name} (exit {done.returncode}); its output is above")
        return torch.load(out, weights_only=False)


def _pred(d: dict[str, Any]) -> Predictions:
    return Predictions(d["top1"].reshape(-1, 1), d["labels"], 0.0, d["nll"])


def bench_model(key: str, repo: Path, name: str, bits_list: list[str], seeds: list[int],
                vitq_set: Optional[dict[str, Any]] = None, vitq_recipe: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per bit-width: the peer's code and vitq's recipe (``vitq_recipe`` instead of the peer's
    counterpart, and / or with ``vitq_set`` pass options, for
    cause-finding) on the same images."""
    peer_def = PEERS[key]
    recipe = set_pass_options(load_recipe(vitq_recipe or peer_def.recipe), vitq_set or {})
    peer = run_peer(key, repo, name, bits_list, seeds)
    base = load_reference(name)
    fd = FashionData(base)
    batches = list(fd.eval_loader)
    fp = predict(base, batches)
    fp_top1 = 100.0 * float((fp.top1 == fp.labels).double().mean())
    rows = []
    for bits in bits_list:
        pairs, mine, theirs, secs = [], [], [], []
        for seed in seeds:
            calib = stack_images(calibration_subset(fd.train, peer_def.calib, seed))[0]
            t0 = time.perf_counter()
            q = vitq.quantize(copy.deepcopy(base), recipe, bits, calib_data=calib, seed=seed)
            secs.append(time.perf_counter() - t0)
            p = predict(q, batches)
            o = _pred(peer[f"{bits}/{seed}"])
            assert torch.equal(o.labels, p.labels), "the peer saw other test images"
            pairs.append((o, p))
            mine.append(100.0 * float((p.top1 == p.labels).double().mean()))
            theirs.append(100.0 * float((o.top1 == o.labels).double().mean()))
        test = compare_pooled(pairs)
        row = {"model": name, "peer": peer_def.name, "recipe": recipe.name, "bits": bits, "seeds": seeds,
               "fp_top1": round(fp_top1, 2), "peer_top1": [round(v, 2) for v in theirs],
               "vitq_top1": [round(v, 2) for v in mine], "diff": round(test["diff"], 3), "p_value": test["p_value"],
               "agree": round(100.0 * float(torch.stack([(a.top1 == b.top1).double().mean() for a, b in pairs]).mean()), 2),
               "peer_seconds": round(sum(peer[f"{bits}/{s}"]["seconds"] for s in seeds) / len(seeds), 2),
               "vitq_seconds": round(sum(secs) / len(secs), 2), "eval_images": int(fp.labels.numel()),
               "peer_commit": _commit(repo), "ablate": _ablations(), "vitq_set": vitq_set or {}}
        print(f"{name} {peer_def.name} {bits}: peer {sum(theirs) / len(theirs):.2f}  vitq {sum(mine) / len(mine):.2f}  "
              f"diff {row['diff']:+.2f} (p {row['p_value']:.2g})", flush=True)
        rows.append(row)
    return rows


def render(path: Path = OUT) -> None:
    d = json.loads(path.read_text())
    order = [p.name for p in PEERS.values()]
    rows = sorted(d["rows"], key=lambda r: (order.index(r.get("peer", "RepQ-ViT")),
                                            MODELS.index(r["model"]) if r["model"] in MODELS else 99,
                                            BITS.index(r["bits"]) if r["bits"] in BITS else len(BITS), r["bits"]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = ["# vitq's baselines beside the peers' own code (bench/peers.py)", "",
             "Each peer's own entry point, unmodified (glue and shims: `bench/peers.py`'s docstring), and "
             "`vitq.quantize(model, RECIPE, bits)`, on the same calibration images per seed (a seeded sample of the "
             "Fashion-MNIST train split: 32 for RepQ-ViT and PTQ4ViT, 1000 for FQ-ViT, each peer's default and the "
             "vitq recipe's calib_size) and the 10 000 test images. `diff` = vitq - peer, mean over the seeds, with "
             "the pooled paired test over the seeds (`p`); `agree` = share of test images with the same prediction. "
             "Target of the baseline-fidelity issue: |diff| <= 1 point at W8A8-W4A4 (W6A6 and W4A4 asked), <= 1.5 at "
             "W3A3.", "", machine_line(d["meta"]), ""]
    total = n_total = 0
    def group(r: dict[str, Any]) -> tuple[str, str, tuple[str, ...], str]:
        return (r.get("peer", "RepQ-ViT"), r.get("recipe", ""), tuple(r.get("ablate") or ()),
                ", ".join(f"{k}={v}" for k, v in sorted((r.get("vitq_set") or {}).items())))

    groups = list(dict.fromkeys(group(r) for r in rows))
    for peer_name, recipe, ablate, vset in groups:
        peer = next(p for p in PEERS.values() if p.name == peer_name)
        mine = [r for r in rows if group(r) == (peer_name, recipe, ablate, vset)]
        table = []
        for r in mine:
            ok = abs(r["diff"]) <= TARGET.get(r["bits"], 1.0)  # mixed widths (cause-finding): 1 point
            table.append([r["model"], r["bits"], f"{r['fp_top1']:.2f}", f"{mean(r['peer_top1']):.2f}",
                          f"{mean(r['vitq_top1']):.2f}", f"{r['diff']:+.2f}", f"{r['p_value']:.2g}", f"{r['agree']:.1f}",
                          " / ".join(f"{a:.2f}" for a in r["peer_top1"]), " / ".join(f"{a:.2f}" for a in r["vitq_top1"]),
                          f"{r['peer_seconds']:.1f}", f"{r['vitq_seconds']:.1f}", "yes" if ok else "**no**"])
        n_ok = sum(1 for t in table if t[-1] == "yes")
        total, n_total = total + n_ok, n_total + len(table)
        commit = mine[0].get("peer_commit") or d["meta"].get("peer_commit", "unknown")
        left_out = f"; left out: {', '.join(ablate)}" if ablate else ""
        changed = f" with {vset}" if vset else ""
        lines += [f"## {peer.name} ({peer.repo} at {commit[:12]}{left_out}) against vitq `{recipe}`{changed}", "",
                  *md_table(["model", "bits", "FP", f"{peer.name} code", f"vitq {recipe}", "diff", "p", "agree %",
                             "code per seed", "vitq per seed", "code s", "vitq s", "within target"], table,
                            align="llrrrrrrllrrl"),
                  "", f"Within the target on {n_ok} of {len(table)} rows.", ""]
    lines += [f"All peers: within the target on {total} of {n_total} rows."]
    if path != OUT:
        lines[0] = "# Cause-finding: the peers' code with one of its quantizers left out (bench/peers.py --ablate)"
        lines[2] = ("The same harness as peers.md, with the peer's model changed by the glue as each section's "
                    "`left out` says (FQ-ViT's activation quantizers that vitq's fqvit does not have: `logits` the "
                    "head's output, `branch` the attention-projection and fc2 outputs, `qkv` the qkv output with one "
                    "scale for q, k and v (vitq: one each), `embed` the tokens and position embedding (ViT) or the "
                    "relative-position table (Swin), `image` the image input; `post_ln8` not left out but every LayerNorm's "
                    "output quantizer at 8 bits; PTQ4ViT's choices made vitq's: `qkv_groups` "
                    "the qkv weight in one row group, `heads` matmul operands per tensor, `sos_sum` the twin softmax "
                    "decoded one region per element), or vitq's recipe changed as its `with` says (`--vitq-set`, pass options), "
                    "or both at a mixed width (W8A6 / W6A8: only the weights or only the activations at the lower width; "
                    "target 1 point). Not the "
                    "table of record: it says which choice a difference between vitq and the peer comes from.")
    write_md(path.with_suffix(".md"), lines, echo=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    for key, peer in PEERS.items():
        ap.add_argument(f"--{key}", type=Path, metavar="DIR", help=f"a checkout of {peer.repo}")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--bits", nargs="+", default=BITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--check-shims", action="store_true")
    ap.add_argument("--ablate", nargs="+", choices=[*ABLATIONS, *PTQ4VIT_ABLATIONS], default=[],
                    help="to find a difference's cause: leave these of FQ-ViT's quantizers out, or make these "
                         "of PTQ4ViT's granularities vitq's (rows go to peers_ablation.json, not the table of record)")
    ap.add_argument("--vitq-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="cause-finding: vitq's recipe with these pass options (rows go to peers_ablation.json)")
    ap.add_argument("--vitq-recipe", metavar="NAME|FILE",
                    help="cause-finding: this vitq recipe (a name or a YAML file, e.g. one that extends the peer's "
                         "counterpart) instead of the counterpart (rows go to peers_ablation.json)")
    ap.add_argument("--worker", nargs=2, metavar=("PEER", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker[0], args.worker[1], args.bits, args.seeds, args.worker_out)
        return
    if args.render:
        render()
        render(RESULTS / "peers_ablation.json")
        return
    setup(threads=1)
    if args.check_shims:
        check_shims()
        return
    given = {k: getattr(args, k) for k in PEERS if getattr(args, k) is not None}
    if not given:
        raise SystemExit("give at least one peer checkout: " + ", ".join(f"--{k} DIR ({p.repo})" for k, p in PEERS.items()))
    for key, repo in given.items():
        if not (repo / PEERS[key].marker).is_file():
            raise SystemExit(f"--{key} {repo}: not a checkout of {PEERS[key].repo} (no {PEERS[key].marker})")
    for peer_key, table in (("fqvit", ABLATIONS), ("ptq4vit", PTQ4VIT_ABLATIONS)):
        if set(args.ablate) & set(table) and set(given) != {peer_key}:
            raise SystemExit(f"--ablate {' '.join(sorted(set(args.ablate) & set(table)))} changes "
                             f"{PEERS[peer_key].name}'s code only: give --{peer_key} DIR alone")
    os.environ["VITQ_PEER_ABLATE"] = ",".join(args.ablate)  # read here and by the workers (inherited)
    vitq_set = parse_assignments(args.vitq_set, "--vitq-set") if args.vitq_set else {}
    # the table of record holds the issue's four widths of each peer's unmodified code; anything else
    # (a quantizer left out, vitq's options changed, a mixed width such as W8A6) is cause-finding
    cause_finding = bool(args.ablate or vitq_set or args.vitq_recipe or set(args.bits) - set(BITS))
    path = RESULTS / "peers_ablation.json" if cause_finding else OUT
    models, missing = available(args.models)
    for key, repo in given.items():
        for name in models:
            rows = bench_model(key, repo.resolve(), name, args.bits, args.seeds, vitq_set, args.vitq_recipe)
            # the table of record holds one row per (model, peer, bits); cause-finding rows differ by their changes
            save_rows(path, rows, {}, key=("model", "peer", "bits") if path == OUT else
                      ("model", "peer", "recipe", "bits", "ablate", "vitq_set"))
            render(path)


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
