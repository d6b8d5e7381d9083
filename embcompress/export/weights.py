"""Weight-only quantization of an ONNX graph: ``export --quantize int8|int4``.

Why weight-only: onnxruntime's dynamic quantization also quantizes the activations, per tensor at run time, which
costs a 768-d sentence encoder a cosine of 0.82 to its torch model (issue 15). Here only the stored weights change;
every activation stays float32. The schemes are the project's own, so the ONNX file holds what ``quantize`` stores:

* a weight W (K x N) of ``MatMul`` or ``Gemm`` (K input features): 4-bit -> ``com.microsoft::MatMulNBits``, its
  codes, fp16 scales (widened to float32, exactly) and integer zero points computed by the ``lowbit`` storage (groups
  of ``block_size`` along K, asymmetric by default), which is the layout MatMulNBits reads; 8-bit -> int8 with one
  float32 scale per output channel (``methods.int8``, the scheme ``quantize --bits 8`` stores for matrices) feeding
  a ``DequantizeLinear`` (``axis`` the output channel) before the float product. A 4-bit weight whose K is not a
  multiple of the block (or below it) and the weights of an ``LSTM`` node get the int8 scheme too.
* a float table read by ``Gather`` (rows along axis 0): 8-bit -> int8 per row (``methods.int8``): a Gather of int8
  rows, a Gather of the row scales and a Mul; 4-bit -> ``com.microsoft::GatherBlockQuantized`` on 4-bit groups of
  ``block_size`` (``methods.lowbit``, the bytes ``quantize --bits 4`` stores), int8 per row when the block does not
  divide d. Tables already kept in a storage (int8 rows, GatherBlockQuantized) are integer initializers and stay
  as they are.

A ``DequantizeLinear`` replaces its float initializer under the same name, so every consumer reads the float
weight it read before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods.int8 import quantize_int8
from ..methods.lowbit import SCALE_SUFFIX, ZERO_SUFFIX, LowBitConfig, quantize_lowbit

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SCHEME = "asym"
MS_DOMAIN = "com.microsoft"


class _Graph:
    """The float initializers of a graph and the nodes that read them; collects what replaces them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.readers: dict[str, list[tuple[Any, int]]] = {}
        for node in self.graph.node:
            for k, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, k))
        self.front: list[Any] = []  # DequantizeLinear nodes, run before everything else
        self.added: list[Any] = []
        self.removed: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._names: set[str] = set(self.inits) | {o for n in self.graph.node for o in n.output}

    def float_matrix(self, name: str, ndim: int = 2) -> np.ndarray | None:
        import onnx

        init = self.inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != ndim:
            return None
        return onnx.numpy_helper.to_array(init)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def add(self, base: str, array: np.ndarray) -> str:
        import onnx

        name = self.fresh(base)
        self.added.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def drop_if_unread(self, name: str, replaced: Iterable[Any]) -> None:
        """Remove a float initializer once every node that read it has been replaced."""
        gone = {id(n) for n in replaced}
        if all(id(node) in gone for node, _ in self.readers.get(name, [])):
            self.removed.add(name)

    def save(self, dst: Path, replace: dict[int, list[Any]]) -> None:
        import onnx

        nodes = list(self.front)
        for node in self.graph.node:
            nodes.extend(replace.get(id(node), [node]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        keep = [i for i in self.graph.initializer if i.name not in self.removed]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep + self.added)
        if any(n.domain == MS_DOMAIN for n in nodes) and not any(o.domain == MS_DOMAIN
                                                                  for o in self.model.opset_import):
            self.model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        onnx.save(self.model, str(dst))


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``methods.int8`` on the rows of w (dim 0): int8 codes and float32 scales."""
    q, scale = quantize_int8(torch.from_numpy(w))
    return q.numpy(), scale.numpy()


def _dequantize_weight(g: _Graph, name: str, w: np.ndarray, axis: int) -> None:
    """Replace the float initializer ``name`` by int8 codes per channel along ``axis`` and a DequantizeLinear."""
    import onnx

    moved = np.moveaxis(w, axis, 0)
    q, scale = _int8_rows(moved.reshape(moved.shape[0], -1))
    codes = np.moveaxis(q.reshape(moved.shape), 0, axis)
    qname, sname = g.add(f"{name}_int8", codes), g.add(f"{name}_int8_scale", scale)
    g.front.append(onnx.helper.make_node("DequantizeLinear", [qname, sname], [name], name=g.fresh(f"{name}_dq"),
                                         axis=axis))
    g.removed.add(name)
    g.counts["int8 per output channel (DequantizeLinear)"] += 1


def _lowbit(w_rows: np.ndarray, bits: int, block_size: int, scheme: str) -> dict[str, np.ndarray]:
    config = LowBitConfig(bits=bits, group_size=block_size, scheme=scheme)
    return {k: v.numpy() for k, v in quantize_lowbit(torch.from_numpy(w_rows), config).items()}


def _matmul_nbits(g: _Graph, node: Any, w: np.ndarray, a: str, bias: str | None, bits: int, block_size: int,
                  scheme: str) -> Any:
    """One MatMulNBits node computing ``a @ w (+ bias)`` from the lowbit codes of w^T (N rows of K values)."""
    import onnx

    K, N = w.shape
    stored = _lowbit(np.ascontiguousarray(w.T), bits, block_size, scheme)
    blocks = K // block_size
    base = node.input[1]
    inputs = [a, g.add(f"{base}_q{bits}", stored[""].reshape(N, blocks, block_size * bits // 8)),
              g.add(f"{base}_q{bits}_scale", stored[SCALE_SUFFIX].astype(np.float32).reshape(-1))]
    inputs.append(g.add(f"{base}_q{bits}_zero", stored[ZERO_SUFFIX].reshape(-1)) if ZERO_SUFFIX in stored else "")
    if bias is not None:
        inputs += ["", bias]
    while inputs and inputs[-1] == "":
        inputs.pop()
    g.counts[f"MatMulNBits ({bits}-bit, blocks of {block_size}, {scheme})"] += 1
    return onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=g.fresh(f"{node.name}_q{bits}"),
                                 domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=block_size)


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gemm_bias(g: _Graph, node: Any, n: int) -> tuple[bool, str | None]:
    """(the Gemm is ``A @ B (+ c)`` with a plain 1-D bias, that bias's name)."""
    attrs = _attrs(node)
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return False, None
    if len(node.input) < 3 or not node.input[2]:
        return True, None
    c = g.inits.get(node.input[2])
    return (c is not None and list(c.dims) == [n]), node.input[2]


def _table(g: _Graph, name: str, w: np.ndarray, bits: int, block_size: int, scheme: str) -> dict[int, list[Any]]:
    """Every Gather of the float table ``name`` (axis 0) rewritten to read it in int8 rows or 4-bit groups."""
    import onnx

    readers = g.readers.get(name, [])
    if not readers or any(n.op_type != "Gather" or k != 0 or _attrs(n).get("axis", 0) != 0 for n, k in readers):
        return {}
    dim = w.shape[1]
    if bits == 4 and dim % block_size == 0:
        stored = _lowbit(w, 4, block_size, scheme)
        data = [g.add(f"{name}_q4", stored[""]), g.add(f"{name}_q4_scale", stored[SCALE_SUFFIX])]
        if ZERO_SUFFIX in stored:
            data.append(g.add(f"{name}_q4_zero", stored[ZERO_SUFFIX]))
        out = {}
        for node, _ in readers:
            half = g.fresh(f"{node.output[0]}_fp16")
            out[id(node)] = [
                onnx.helper.make_node("GatherBlockQuantized", [data[0], node.input[1], *data[1:]], [half],
                                      name=g.fresh(f"{node.name}_q4"), domain=MS_DOMAIN, bits=4,
                                      block_size=block_size, gather_axis=0, quantize_axis=1),
                onnx.helper.make_node("Cast", [half], list(node.output), to=onnx.TensorProto.FLOAT),
            ]
        g.counts[f"table GatherBlockQuantized (4-bit, groups of {block_size}, {scheme})"] += 1
    else:
        q, scale = _int8_rows(w)
        qname, sname = g.add(f"{name}_int8", q), g.add(f"{name}_int8_scale", scale.reshape(-1, 1))
        out = {}
        for node, _ in readers:
            rows, scales, floats = (g.fresh(f"{node.output[0]}_{s}") for s in ("int8", "scale", "float"))
            ids = node.input[1]
            out[id(node)] = [
                onnx.helper.make_node("Gather", [qname, ids], [rows], name=g.fresh(f"{node.name}_int8")),
                onnx.helper.make_node("Gather", [sname, ids], [scales], name=g.fresh(f"{node.name}_scale")),
                onnx.helper.make_node("Cast", [rows], [floats], to=onnx.TensorProto.FLOAT),
                onnx.helper.make_node("Mul", [floats, scales], list(node.output)),
            ]
        g.counts["table int8 per row (Gather + scales + Mul)"] += 1
    g.removed.add(name)
    return out


def quantize_weights(src: Path, dst: Path, quantize: str, *, block_size: int = DEFAULT_BLOCK_SIZE,
                     scheme: str = DEFAULT_SCHEME) -> list[str]:
    """Write ``src`` with its float weights quantized weight-only (``int8`` or ``int4``; see the module docstring)
    to ``dst``; returns one line per kind of weight rewritten, with counts."""
    import onnx

    bits = BITS[quantize]
    g = _Graph(onnx.load(str(src)))
    replace: dict[int, list[Any]] = {}
    done: set[str] = set()
    for node in list(g.graph.node):
        if node.op_type == "Gather" and node.input[0] not in done:
            w = g.float_matrix(node.input[0])
            rewritten = _table(g, node.input[0], w, bits, block_size, scheme) if w is not None else {}
            if rewritten:
                done.add(node.input[0])
                replace.update(rewritten)
            continue
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] not in done:
            name = node.input[1]
            w = g.float_matrix(name)
            if w is None:
                continue
            trans_b = node.op_type == "Gemm" and bool(_attrs(node).get("transB", 0))
            kn = w.T if trans_b else w  # K x N
            plain, bias = (True, None) if node.op_type == "MatMul" else _gemm_bias(g, node, kn.shape[1])
            readers = g.readers.get(name, [])
            if (bits == 4 and plain and len(readers) == 1 and kn.shape[0] % block_size == 0
                    and kn.shape[0] >= block_size):
                replace[id(node)] = [_matmul_nbits(g, node, kn, node.input[0], bias, bits, block_size, scheme)]
                g.drop_if_unread(name, [node])
            else:
                _dequantize_weight(g, name, w, axis=0 if trans_b else 1)
            done.add(name)
        elif node.op_type == "LSTM":
            for name in node.input[1:3]:  # W and R: [directions, 4 * hidden, features]
                w = g.float_matrix(name, ndim=3) if name not in done else None
                if w is not None:
                    _dequantize_weight(g, name, w, axis=1)
                    done.add(name)
    g.save(dst, replace)
    return [f"{count} x {what}" for what, count in g.counts.items()]
