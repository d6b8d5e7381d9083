"""Weight-only quantization of an ONNX graph: ``export --quantize int8|int4``.

Why weight-only: onnxruntime's dynamic quantization also quantizes the activations, per tensor at run time, which
costs a 768-d sentence encoder a cosine of 0.82 to its torch model (issue 15). Here only the stored weights change;
every activation stays float32. The schemes are the project's own, so the ONNX file holds what ``quantize`` stores:

* a weight W (K x N) of ``MatMul`` or ``Gemm`` (K input features): 4-bit -> ``com.microsoft::MatMulNBits``, its
  codes, fp16 scales (kept fp16 in the file, widened exactly to float32 by a ``Cast`` that onnxruntime folds when it
  loads the graph) and integer zero points computed by the ``lowbit`` storage (groups of ``block_size`` along K,
  asymmetric by default), which is the layout MatMulNBits reads; 8-bit -> int8 with one
  float32 scale per output channel (``methods.int8``, the scheme ``quantize --bits 8`` stores for matrices) feeding
  a ``DequantizeLinear`` (``axis`` the output channel) before the float product. A 4-bit weight whose K is not a
  multiple of the block (or below it) and the weights of an ``LSTM`` node get the int8 scheme too.
* a float table read by ``Gather`` (rows along axis 0): 8-bit -> int8 per row (``methods.int8``): a Gather of int8
  rows, a Gather of the row scales and a Mul; 4-bit -> ``com.microsoft::GatherBlockQuantized`` on 4-bit groups of
  ``block_size`` (``methods.lowbit``, the bytes ``quantize --bits 4`` stores), int8 per row when the block does not
  divide d or the table has fewer than ``SMALL_TABLE_ROWS`` rows. Tables already kept in a storage (int8 rows,
  GatherBlockQuantized) are integer initializers and stay as they are.

A ``DequantizeLinear`` replaces its float initializer under the same name, so every consumer reads the float
weight it read before.

Calibration (4-bit): rounding each weight to its nearest code costs all-MiniLM-L6-v2 a mean cosine of 0.97 to its
torch model, although each layer alone keeps 0.99+: the inputs of the attention and FFN projections have channels
tens of times larger than the median, and the small errors of many layers add up. Given ``calibration`` feeds, the
float graph is run on them first and each 4-bit weight's inputs give E[x x^T]; the codes are then chosen by GPTQ
(``methods.lowbit.quantize_lowbit_gptq``), which keeps ``x @ W`` instead of W. Same layout, same bytes, same kernel.
Stored tensors chosen and tuned beforehand (``export --tune``, :mod:`.tune`) are passed as ``fixed``, keyed by
:func:`weight_digest` of the float weight they give; such a weight is written with them as they are.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods.int8 import quantize_int8
from .. import runtime
from ..methods.lowbit import SCALE_SUFFIX, ZERO_SUFFIX, LowBitConfig, quantize_lowbit, quantize_lowbit_gptq

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SCHEME = "asym"
MS_DOMAIN = "com.microsoft"
# int4: a float table of fewer rows keeps int8 rows (a token-type table: 4 bits save nothing there and cost
# all-MiniLM-L6-v2 0.001 of mean cosine, as its rows are added to every token)
SMALL_TABLE_ROWS = 64


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


def weight_digest(w_rows: np.ndarray) -> str:
    """A float32 weight's identity by value (N rows of K inputs, as ``nn.Linear`` holds it): how stored tensors
    chosen beforehand (``export.tune``) find the ONNX initializer they stand for, whatever the exporter named it."""
    w = np.ascontiguousarray(w_rows, dtype=np.float32)
    return hashlib.sha256(repr(w.shape).encode() + w.tobytes()).hexdigest()


def _lowbit(w_rows: np.ndarray, bits: int, block_size: int, scheme: str) -> dict[str, np.ndarray]:
    config = LowBitConfig(bits=bits, group_size=block_size, scheme=scheme)
    return {k: v.numpy() for k, v in quantize_lowbit(torch.from_numpy(w_rows), config).items()}


def _matmul_nbits(g: _Graph, node: Any, w: np.ndarray, a: str, bias: str | None, bits: int, block_size: int,
                  scheme: str, hessian: np.ndarray | None = None,
                  fixed: Mapping[str, np.ndarray] | None = None) -> Any:
    """One MatMulNBits node computing ``a @ w (+ bias)`` from the lowbit codes of w^T (N rows of K values); with
    ``hessian`` (E[a a^T], K x K) the codes are GPTQ's; ``fixed``: the stored tensors to write as they are."""
    import onnx

    K, N = w.shape
    if fixed is not None:
        stored = dict(fixed)
    elif hessian is None:
        stored = _lowbit(np.ascontiguousarray(w.T), bits, block_size, scheme)
    else:
        config = LowBitConfig(bits=bits, group_size=block_size, scheme=scheme)
        stored = {k: v.numpy() for k, v in quantize_lowbit_gptq(torch.from_numpy(np.ascontiguousarray(w.T)), config,
                                                                 torch.from_numpy(hessian)).items()}
    blocks = K // block_size
    base = node.input[1]
    scales = g.fresh(f"{base}_q{bits}_scale")
    half = g.add(f"{base}_q{bits}_scale_fp16", stored[SCALE_SUFFIX].reshape(-1))
    g.front.append(onnx.helper.make_node("Cast", [half], [scales], name=g.fresh(f"{base}_q{bits}_scale_cast"),
                                         to=onnx.TensorProto.FLOAT))
    inputs = [a, g.add(f"{base}_q{bits}", stored[""].reshape(N, blocks, block_size * bits // 8)), scales]
    inputs.append(g.add(f"{base}_q{bits}_zero", stored[ZERO_SUFFIX].reshape(-1)) if ZERO_SUFFIX in stored else "")
    if bias is not None:
        inputs += ["", bias]
    while inputs and inputs[-1] == "":
        inputs.pop()
    gptq = ", tuned" if fixed is not None else ", GPTQ" if hessian is not None else ""
    g.counts[f"MatMulNBits ({bits}-bit, blocks of {block_size}, {scheme}{gptq})"] += 1
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


def _nbits_weight(g: _Graph, node: Any, block_size: int) -> tuple[np.ndarray, str | None] | None:
    """(W as K x N, the bias) when ``node`` is a MatMul or plain Gemm by a float weight that MatMulNBits can hold
    (read by this node only, K a multiple of the block); None otherwise."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    w = g.float_matrix(node.input[1])
    if w is None or len(g.readers.get(node.input[1], [])) != 1:
        return None
    kn = w.T if node.op_type == "Gemm" and _attrs(node).get("transB", 0) else w
    plain, bias = (True, None) if node.op_type == "MatMul" else _gemm_bias(g, node, kn.shape[1])
    if not plain or kn.shape[0] % block_size or kn.shape[0] < block_size:
        return None
    return kn, bias


def _table(g: _Graph, name: str, w: np.ndarray, bits: int, block_size: int, scheme: str) -> dict[int, list[Any]]:
    """Every Gather of the float table ``name`` (axis 0) rewritten to read it in int8 rows or 4-bit groups."""
    import onnx

    readers = g.readers.get(name, [])
    if not readers or any(n.op_type != "Gather" or k != 0 or _attrs(n).get("axis", 0) != 0 for n, k in readers):
        return {}
    dim = w.shape[1]
    if bits == 4 and dim % block_size == 0 and w.shape[0] >= SMALL_TABLE_ROWS:
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


def input_moments(model: Any, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                  mask: str | None = None) -> dict[str, np.ndarray]:
    """E[x x^T] (float64, K x K) of each named float tensor of the graph over ``feeds`` (onnxruntime, CPU), its
    last axis the features and every other axis a sample. ``mask``: a feed input (batch x seq, 0 at padding) whose
    padded positions are left out of every tensor whose leading axes are batch x seq, so padded batches give the
    moments of their real tokens."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in known)
    ort = runtime.import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    count: Counter[str] = Counter()
    for feed in feeds:
        keep = feed[mask].reshape(-1) != 0 if mask is not None else None
        for name, x in zip(names, session.run(names, feed)):
            x = x.reshape(-1, x.shape[-1])
            if keep is not None and x.shape[0] == keep.shape[0]:
                x = x[keep]
            x = x.astype(np.float64)
            sums[name] = sums.get(name, 0.0) + x.T @ x
            count[name] += x.shape[0]
    return {n: sums[n] / count[n] for n in sums if count[n]}


def quantize_weights(src: Path, dst: Path, quantize: str, *, block_size: int = DEFAULT_BLOCK_SIZE,
                     scheme: str = DEFAULT_SCHEME,
                     calibration: Iterable[dict[str, np.ndarray]] | None = None,
                     calibration_mask: str | None = None,
                     fixed: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> list[str]:
    """Write ``src`` with its float weights quantized weight-only (``int8`` or ``int4``; see the module docstring)
    to ``dst``; returns one line per kind of weight rewritten, with counts. ``calibration``: the graph's inputs for
    GPTQ's 4-bit codes (None: each weight rounded to its nearest code); ``calibration_mask``: the input marking
    their padding (see :func:`input_moments`). ``fixed``: 4-bit stored tensors chosen beforehand, by
    :func:`weight_digest` of the weight they stand for (``export.tune``); those weights are written with them."""
    import onnx

    bits = BITS[quantize]
    g = _Graph(onnx.load(str(src)))
    fixed = fixed or {}

    def chosen(node: Any) -> Mapping[str, np.ndarray] | None:
        nbits = _nbits_weight(g, node, block_size)
        return fixed.get(weight_digest(nbits[0].T)) if nbits is not None and fixed else None

    moments: dict[str, np.ndarray] = {}
    if bits == 4 and calibration is not None:
        inputs = sorted({node.input[0] for node in g.graph.node
                         if _nbits_weight(g, node, block_size) is not None and chosen(node) is None})
        moments = input_moments(g.model, inputs, calibration, calibration_mask) if inputs else {}
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
            nbits = _nbits_weight(g, node, block_size) if bits == 4 else None
            if nbits is not None:
                kn, bias = nbits
                replace[id(node)] = [_matmul_nbits(g, node, kn, node.input[0], bias, bits, block_size, scheme,
                                                   moments.get(node.input[0]), chosen(node))]
                g.drop_if_unread(name, [node])
            else:
                trans_b = node.op_type == "Gemm" and bool(_attrs(node).get("transB", 0))
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
