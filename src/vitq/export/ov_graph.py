"""Rewrites of an exported ONNX graph into the form OpenVINO's INT8 transformations fuse (``--format openvino``).

Pure functions on an ``onnx.ModelProto``, each exact on the values it moves (a per-tensor quantizer commutes with
ops that only move or select values), each returning how many places it changed:

1. :func:`fake_quantize_pairs` - every activation ``QuantizeLinear -> DequantizeLinear`` pair becomes one
   ``FakeQuantize`` (OpenVINO's own operator, ONNX domain :data:`OV_DOMAIN`) with a float output over the pair's grid:
   the form NNCF writes. OpenVINO reads a QDQ pair as a FakeQuantize with an integer output followed by Convert /
   Subtract / Multiply, which its transformations fuse only in some places (bench/results/openvino_profile.md).
2. :func:`hoist_fake_quantize` - a FakeQuantize that reads a Reshape / Transpose / Gather moves above it, onto the op
   that computes the values (an attention's output, a LayerNorm), where OpenVINO fuses it as that op's output stage
   instead of running it alone with two reorders.
3. :func:`merge_split_fake_quantize` - the q, k and v quantizers of a fused qkv projection (its output reshaped to
   ``(..., 3, heads, head_dim)``, transposed, sliced) become one per-channel FakeQuantize on the projection's output,
   which OpenVINO fuses into the projection's INT8 matmul (the three stand-alone ones cost 1/6 of a DeiT-S's time).

Measured on DeiT-S, W8A8 (bench/results/openvino_fq.md): 1 -> 0.86x NNCF's INT8 throughput at batch 1, 1 + 2 + 3 ->
about 1.0x.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

#: the ONNX domain of OpenVINO's own operators, which its ONNX frontend reads (FakeQuantize)
OV_DOMAIN = "org.openvinotoolkit"
#: ops a per-tensor FakeQuantize commutes with: they move or select values, never combine them
MOVES = ("Reshape", "Transpose", "Gather")


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _users(nodes: list[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            out.setdefault(i, []).append(k)
    return out


def _set_nodes(graph: Any, nodes: list[Any]) -> None:
    """Replace the graph's nodes (copies of ``nodes``) and drop initializers nothing reads any more."""
    copies = [n.__deepcopy__() for n in nodes]
    del graph.node[:]
    graph.node.extend(copies)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def fq_range(scale: float, zero_point: float, qmin: int, qmax: int) -> tuple[float, float]:
    """The float interval a FakeQuantize with ``qmax - qmin + 1`` levels spans to hold the grid of a quantizer with
    ``scale`` / ``zero_point`` / codes ``[qmin, qmax]``: its lowest and highest representable values. FakeQuantize
    maps ``x`` to ``round((x - lo) / (hi - lo) * (levels - 1))``, which is ``round(x / scale) + zero_point - qmin``
    on that grid: the same code, shifted."""
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def _scalar(v: Optional[np.ndarray]) -> Optional[float]:
    return None if v is None or v.size != 1 else float(v.reshape(-1)[0])


def fake_quantize_pairs(proto: Any) -> int:
    """Every activation ``QuantizeLinear -> DequantizeLinear`` pair with per-tensor constant parameters (the same in
    both), whose quantized tensor feeds only that DequantizeLinear, becomes one ``FakeQuantize`` on the same grid
    (in place). A pair preceded by a ``Clip`` to the grid's ends (codes narrower than their 8-bit container:
    :class:`~vitq.export.lowering.QDQ`) keeps the Clip, so the FakeQuantize over the container's 256 levels sees only
    the codes' own. Weight ``DequantizeLinear`` nodes (of integer constants) are not pairs and stay as they are."""
    from onnx import helper, numpy_helper

    g = proto.graph
    vals = _constants(g)
    nodes = list(g.node)
    users = _users(nodes)
    outputs = {o.name for o in g.output}
    replace: dict[int, Any] = {}
    drop: set[int] = set()
    for k, n in enumerate(nodes):
        if n.op_type != "QuantizeLinear" or n.output[0] in outputs:
            continue
        us = users.get(n.output[0], [])
        if len(us) != 1 or nodes[us[0]].op_type != "DequantizeLinear":
            continue
        dq = nodes[us[0]]
        s, s2 = _scalar(vals.get(n.input[1])), _scalar(vals.get(dq.input[1]))
        z = vals.get(n.input[2]) if len(n.input) > 2 else None
        z2 = vals.get(dq.input[2]) if len(dq.input) > 2 else None
        if s is None or s != s2 or (z is None) != (z2 is None):
            continue
        if z is not None and (z.dtype not in (np.int8, np.uint8) or _scalar(z) is None or _scalar(z) != _scalar(z2)):
            continue
        qmin, qmax = (-128, 127) if z is not None and z.dtype == np.int8 else (0, 255)
        lo, hi = fq_range(s, _scalar(z) or 0.0, qmin, qmax)
        names = (f"vitq_fq{len(replace)}_lo", f"vitq_fq{len(replace)}_hi")
        g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), names[0]),
                              numpy_helper.from_array(np.array(hi, np.float32), names[1])])
        replace[us[0]] = helper.make_node("FakeQuantize", [n.input[0], names[0], names[1], names[0], names[1]],
                                          [dq.output[0]], domain=OV_DOMAIN, levels=qmax - qmin + 1,
                                          name=f"vitq_fq{len(replace)}")
        drop.add(k)
    if replace:
        _set_nodes(g, [replace.get(k, n) for k, n in enumerate(nodes) if k not in drop])
        if not any(o.domain == OV_DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(OV_DOMAIN, 1))
    return len(replace)


def hoist_fake_quantize(proto: Any, moves: tuple[str, ...] = MOVES) -> int:
    """Move every FakeQuantize that reads one of ``moves`` (the op's output read by nothing else) above it, as far as
    it goes: ``x -> Reshape -> FQ`` becomes ``x -> FQ -> Reshape``. Exact for a per-tensor FakeQuantize (it acts on
    each value alone) and for a per-channel one above a Gather (the channels stay where they are); a per-channel one
    stays below a Reshape / Transpose."""
    g = proto.graph
    vals = _constants(g)
    nodes = list(g.node)
    moved = 0
    while True:
        producer = {o: k for k, n in enumerate(nodes) for o in n.output}
        users = _users(nodes)
        for k, fq in enumerate(nodes):
            if fq.op_type != "FakeQuantize":
                continue
            d = producer.get(fq.input[0])
            if d is None or nodes[d].op_type not in moves or users.get(nodes[d].output[0]) != [k]:
                continue
            per_tensor = all(vals.get(i) is not None and vals[i].size == 1 for i in fq.input[1:])
            if not per_tensor and nodes[d].op_type != "Gather":
                continue
            dm = nodes[d]
            x, y, z = dm.input[0], dm.output[0], fq.output[0]
            fq.input[0], fq.output[0] = x, y
            dm.input[0], dm.output[0] = y, z
            nodes[d], nodes[k] = fq, dm
            moved += 1
            break
        else:
            break
    if moved:
        _set_nodes(g, nodes)
    return moved


def _follow(t: str, nodes: list[Any], users: dict[str, list[int]],
            vals: dict[str, np.ndarray]) -> Optional[tuple[int, float]]:
    """From a slice of a fused projection's output, through Squeeze / Transpose / a Mul by a positive scalar constant
    (each the only reader): the FakeQuantize reached, and the product of the Mul constants on the way."""
    factor = 1.0
    while True:
        us = users.get(t, [])
        if len(us) != 1:
            return None
        u = nodes[us[0]]
        if u.op_type == "FakeQuantize":
            return us[0], factor
        c = _scalar(vals.get(u.input[1])) if u.op_type == "Mul" and len(u.input) == 2 else None
        if u.op_type in ("Squeeze", "Transpose") or c is not None and c > 0:
            factor *= c if u.op_type == "Mul" and c is not None else 1.0
            t = u.output[0]
            continue
        return None


def merge_split_fake_quantize(proto: Any) -> int:
    """The q / k / v quantizers of a fused projection become one per-channel FakeQuantize on its output (in place):
    ``x -> Reshape(..., S, H, D) -> Transpose(S first) -> S Slices of axis 0 -> [Squeeze / Transpose / Mul c > 0] ->
    FakeQuantize_i`` becomes ``x -> FakeQuantize(ranges of FQ_i / c_i on channels i*H*D .. (i+1)*H*D) -> Reshape ...``
    with the S FakeQuantize nodes removed. Exact: each channel of ``x`` goes to one slice, where its FakeQuantize was
    (a positive constant factor scales the grid; only a value at a tie may round the other way). Returns how many
    projections."""
    from onnx import helper, numpy_helper

    g = proto.graph
    vals = _constants(g)
    nodes = list(g.node)
    merged = 0
    while True:
        users = _users(nodes)
        hit = None
        for k, rs in enumerate(nodes):
            shape = vals.get(rs.input[1]) if rs.op_type == "Reshape" and len(rs.input) > 1 else None
            if shape is None or shape.ndim != 1 or len(shape) < 4 or min(shape[-3:]) < 1:
                continue
            tr = users.get(rs.output[0], [])
            if len(tr) != 1 or nodes[tr[0]].op_type != "Transpose":
                continue
            perm = list(next((a.ints for a in nodes[tr[0]].attribute if a.name == "perm"), []))
            s_count, s_axis = int(shape[-3]), len(shape) - 3
            if not perm or perm[0] != s_axis:
                continue
            slices = users.get(nodes[tr[0]].output[0], [])
            if len(slices) != s_count or any(nodes[i].op_type != "Slice" for i in slices):
                continue
            ranges: dict[int, tuple[float, float, int, int]] = {}
            for i in slices:
                sl = nodes[i]
                st, en = (_scalar(vals.get(sl.input[j])) for j in (1, 2))
                ax = _scalar(vals.get(sl.input[3])) if len(sl.input) > 3 else 0.0
                if st is None or en is None or ax != 0 or en != st + 1 or len(sl.input) > 4:
                    break
                f = _follow(sl.output[0], nodes, users, vals)
                if f is None:
                    break
                fq = nodes[f[0]]
                lo, hi = _scalar(vals.get(fq.input[1])), _scalar(vals.get(fq.input[2]))
                lo2, hi2 = _scalar(vals.get(fq.input[3])), _scalar(vals.get(fq.input[4]))
                levels = next((a.i for a in fq.attribute if a.name == "levels"), 0)
                if lo is None or hi is None or (lo, hi) != (lo2, hi2):
                    break
                ranges[int(st)] = (lo / f[1], hi / f[1], levels, f[0])
            else:
                if sorted(ranges) == list(range(s_count)) and len({r[2] for r in ranges.values()}) == 1:
                    hit = (k, int(shape[-2] * shape[-1]), ranges)
                    break
        if hit is None:
            break
        k, width, ranges = hit
        name = f"vitq_fqc{merged}"
        lows = np.repeat(np.array([ranges[i][0] for i in range(len(ranges))], np.float32), width)
        highs = np.repeat(np.array([ranges[i][1] for i in range(len(ranges))], np.float32), width)
        g.initializer.extend([numpy_helper.from_array(lows, f"{name}_lo"),
                              numpy_helper.from_array(highs, f"{name}_hi")])
        rs = nodes[k]
        new = helper.make_node("FakeQuantize", [rs.input[0], f"{name}_lo", f"{name}_hi", f"{name}_lo", f"{name}_hi"],
                               [f"{name}_out"], domain=OV_DOMAIN, levels=next(iter(ranges.values()))[2], name=name)
        rs.input[0] = f"{name}_out"
        gone = {r[3] for r in ranges.values()}
        bypass = {nodes[i].output[0]: nodes[i].input[0] for i in gone}
        for n in nodes:
            for j, i in enumerate(n.input):
                if i in bypass:
                    n.input[j] = bypass[i]
        nodes = [n for i, n in enumerate(nodes) if i not in gone]
        nodes.insert(nodes.index(rs), new)
        merged += 1
    if merged:
        _set_nodes(g, nodes)
    return merged


def openvino_form(proto: Any) -> dict[str, int]:
    """All three rewrites, in order (in place); how many places each changed."""
    return {"fake_quantize": fake_quantize_pairs(proto), "merged_projections": merge_split_fake_quantize(proto),
            "hoisted": hoist_fake_quantize(proto)}


__all__ = ["MOVES", "OV_DOMAIN", "fake_quantize_pairs", "fq_range", "hoist_fake_quantize", "merge_split_fake_quantize",
           "openvino_form"]
