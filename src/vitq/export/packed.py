"""The ``vitq`` packed format: integer weight codes at their bit-width, loadable without the float
weights and without replaying the recipe.

A folder with ``model.safetensors`` and ``vitq.json`` (``format: vitq.packed/1``):

* every uniformly quantized weight as ``<param>.codes``: its codes shifted to ``[0, 2^b)`` and
  bit-packed little-endian (two 4-bit codes per byte; 3- and 6-bit codes across byte boundaries),
  with its quantizer's own parameters (scale, zero point: the FakeQuant buffers, already in the
  state dict) - the float weight is not stored;
* every other tensor (LayerNorm and bias parameters, position embeddings, activation quantizer
  parameters and lookup tables, weights of non-uniform quantizers) as it is, except that integral
  zero points are stored as 8- or 16-bit integers and the quantizers' ``initialized`` flags as one
  list of the sites that are not (all values exact);
* ``vitq.json``: the model source with its build config (architecture without weights), the recipe
  and bits (the structure :func:`vitq.prepare` rebuilds) and the quantization map: per packed weight
  its site, quantizer spec, shape, bits and code offset.

Loading unpacks the codes and dequantizes them with the stored parameters: the weight the simulated
model used, bit for bit (the weight quantizer maps its own grid values to themselves), so the loaded
model computes exactly what the quantized one did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints import load_into, load_state_file, short_error
from ..errors import ModelError, VitqError
from ..passes.quantize import iter_slots
from ..quantizers.base import QuantSpec, dequantize, get_quantizer, quantize
from ..state import ensure_state, state_of
from .integrity import begin_write, finish_write
from .lowering import check_exportable

PACKED_FORMAT = "vitq.packed/1"
CODES_SUFFIX = ".codes"


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Unsigned integers in ``[0, 2^bits)`` (any shape) as a flat uint8 bit stream, little-endian:
    value i occupies bits ``i*bits .. i*bits + bits - 1`` of the stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, 2^{bits}) cannot be packed in {bits} bits")
    n = v.numel()
    if bits == 8:
        return v.to(torch.uint8)
    bit_idx = torch.arange(bits, dtype=torch.int64)
    stream = ((v.unsqueeze(1) >> bit_idx) & 1).reshape(-1)  # n*bits bits, value-major, LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)[: math.ceil(n * bits / 8)]


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``n`` values (int64)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    p = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        return p[:n]
    stream = ((p.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    if stream.numel() < n * bits:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {n} {bits}-bit values")
    return (stream.reshape(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)


def _packable(spec: QuantSpec) -> bool:
    return spec.quantizer == "uniform" and spec.bits <= 8 and not spec.dynamic


def save_packed(model: nn.Module, out_dir: "str | Path", source: Any) -> dict[str, Any]:
    """Write ``model`` (quantized by vitq) in the packed format; returns the sizes."""
    from safetensors.torch import save_file

    check_exportable(model)
    if source.kind == "pickle":
        raise ModelError("a model loaded from a pickle has no architecture the packed format can rebuild: "
                         "load it from a timm name, an hf:DIR folder or a reference model")
    st = state_of(model)
    assert st is not None and st.recipe is not None and st.bits is not None
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    qmap: dict[str, Any] = {}
    for name, mod, slot, _role, kind in iter_slots(model):
        fq = getattr(mod, slot)
        if kind != "weight" or fq is None or not fq.enabled or not _packable(fq.spec):
            continue
        key = f"{name}.weight" if name else "weight"
        w = mod.weight.detach()
        codes = quantize(w, fq.params, fq.spec)
        qmin, _ = get_quantizer(fq.spec.quantizer).code_range(fq.spec)
        sd.pop(key)
        sd[key + CODES_SUFFIX] = pack_bits(codes - qmin, fq.spec.bits)
        qmap[key] = {"site": fq.site, "spec": fq.spec.to_dict(), "shape": list(w.shape), "bits": fq.spec.bits,
                     "offset": qmin, "dtype": str(w.dtype).removeprefix("torch.")}
    integral: dict[str, str] = {}
    for k in [k for k in sd if k.endswith("zero_point")]:
        v = sd[k]
        if v.is_floating_point() and v.numel() and bool((v == v.round()).all()):
            lo, hi = int(v.min()), int(v.max())
            dt = torch.uint8 if 0 <= lo and hi < 256 else torch.int8 if -128 <= lo and hi < 128 else torch.int16 \
                if -32768 <= lo and hi < 32768 else None
            if dt is not None:
                integral[k] = str(v.dtype).removeprefix("torch.")
                sd[k] = v.to(dt)
    flags = [k for k in sd if k.endswith(".initialized") or k == "initialized"]
    not_ready = [k for k in flags if not bool(sd[k])]
    for k in flags:
        sd.pop(k)
    stage = begin_write(out_dir)  # staged, then moved into out_dir (vitq.json last)
    save_file(sd, str(stage / "model.safetensors"))
    meta = {"format": PACKED_FORMAT, "integral_tensors": integral, "initialized_keys": flags,
            "uninitialized_keys": not_ready, "source": source.to_dict(), "recipe": st.recipe.to_dict(), "bits": str(st.bits),
            "pretrained_cfg": {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
                               if isinstance(v, (str, int, float, bool, list, tuple)) or v is None},
            "quantization_map": qmap, **({"run": st.run} if st.run else {})}
    out = finish_write(stage, meta, ["model.safetensors"])
    # the float model's size: its own tensors in float32 (the quantizers' buffers are not part of it)
    float_bytes = sum(t.numel() * 4 for k, t in model.state_dict().items()
                      if t.is_floating_point() and "_quant." not in k and not k.startswith(("weight_quant", "input_quant")))
    return {"bytes": (out / "model.safetensors").stat().st_size, "float32_state_bytes": float_bytes,
            "packed_weights": len(qmap)}


def load_packed(path: "str | Path", meta: dict[str, Any], trust_pickle: bool = False) -> nn.Module:
    """The model a packed folder holds (see the module docstring)."""
    from ..models import ModelSource, rebuild
    from ..pipeline import prepare
    from ..recipes import Recipe

    p = Path(path)
    model = rebuild(ModelSource.from_dict(meta["source"]), trust_pickle, weights=False)
    prepare(model, Recipe.from_dict(meta["recipe"], str(p / "vitq.json")), meta["bits"])
    sd = load_state_file(p / "model.safetensors")
    for k, dt in meta.get("integral_tensors", {}).items():
        if k in sd:
            sd[k] = sd[k].to(getattr(torch, dt))
    not_ready = set(meta.get("uninitialized_keys", []))
    for k in meta.get("initialized_keys", []):
        sd[k] = torch.tensor(k not in not_ready)
    for key, q in meta.get("quantization_map", {}).items():
        packed = sd.pop(key + CODES_SUFFIX, None)
        if packed is None:
            raise ModelError(f"{p / 'model.safetensors'} has no {key}{CODES_SUFFIX}: the export is incomplete, re-export it")
        try:  # a map the seal covers can still be wrong (crafted, resealed): every value checked, one line
            spec = QuantSpec.from_dict(q["spec"])
            n = math.prod(q["shape"])
            codes = unpack_bits(packed, int(q["bits"]), n).reshape(q["shape"]) + int(q["offset"])
            prefix = key[: -len("weight")]
            params = {k: sd[prefix + "weight_quant." + k] for k in get_quantizer(spec.quantizer).param_names}
            sd[key] = dequantize(codes.to(torch.int32), params, spec).to(getattr(torch, q.get("dtype", "float32")))
        except VitqError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise ModelError(f"{p / 'vitq.json'}: the quantization map's entry for {key} is not valid "
                             f"({short_error(e)}): export the model again") from None
    load_into(model, sd, f"packed export {p}")
    st = ensure_state(model)
    st.source = ModelSource.from_dict(meta["source"])
    st.run = meta.get("run") if isinstance(meta.get("run"), dict) else None
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = meta["pretrained_cfg"]
    return model.eval()


__all__ = ["PACKED_FORMAT", "load_packed", "pack_bits", "save_packed", "unpack_bits"]
