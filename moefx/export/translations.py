"""onnxscript translations of the moefx custom ops (docs/ARCHITECTURE.md) into ONNX.

``torch.onnx.export(dynamo=True)`` calls each function here in tracing mode with ONNX values for
tensors and plain Python values for ``int``/``float``/``str``/``bool`` arguments; a Python loop
therefore unrolls into the graph. That is how ``moe_ffn`` becomes one small subgraph per expert
(the expert count is static: it is the first dimension of the weights).

Portable forms use standard ONNX ops only (opset 18 and later):

- ``xmoe_select``: ``TopK`` over the experts, the mass before each rank as ``CumSum - value``
  (the very arithmetic of the CPU op, so boundary decisions agree bit for bit), ``Less`` than the
  threshold, rank 0 always kept; ``max_experts`` is the ``TopK`` width.
- ``capacity_drop``: one ``TopK`` per rank gives the rank-major, probability-descending queue
  (ONNX ``TopK`` breaks ties by lower index, i.e. lower token first, like the reference); a
  ``CumSum`` over the one-hot expert column of the queue gives each pair's place in its
  expert's queue.
- ``moe_ffn``: a per-expert loop: ``NonZero`` finds the rows that chose expert e, ``Gather``
  pulls them, two or three ``MatMul`` run the expert, and one ``ScatterND(reduction="add")``
  puts every expert's rows back. Work follows the routing (a dense-masked form would run every
  expert on every row: exact but as slow as the dense FFN, which defeats the point of exporting
  a sparse model); onnxruntime measured 88 ms for this form against 250 ms dense-masked
  (ANCHORS.md). Per-expert weight slices are constant-folded into initializers after export.

``ort_moe`` (the op the ``ort`` target swaps in, see :mod:`moefx.export.ort`) becomes one
``com.microsoft.MoE`` node fed with ``log(weight)`` for chosen experts and ``-1e4`` elsewhere
(one ``ScatterElements(reduction="max")`` of the ``[T, K]`` slots into a ``-1e4``-filled
``[T, E]``: unused slots scatter ``-1e4`` onto expert 0, which the max leaves unchanged).
onnxruntime's softmax over those logits yields ``weight / Σ weight``, so the node's output is
multiplied back by the row's weight total: exact for any routing weights, including the unit
weights of ``combine="unit"`` and probabilities that do not sum to one (checked on onnxruntime
1.32: without the rescale the output is wrong by the factor ``Σ weight``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import onnxscript
from onnxscript import BOOL, FLOAT, INT64
from onnxscript import opset18 as op

from moefx.export.schemas import MOE_DOMAIN, MOE_VERSION, register_ort_schemas

register_ort_schemas()
msft = onnxscript.values.Opset(MOE_DOMAIN, MOE_VERSION)

NEG_LOGIT = -1.0e4
"""Router logit of an expert not chosen: exp(-1e4 - max) is exactly 0 in float32 and float16."""


class TranslationError(RuntimeError):
    """A moefx op cannot be expressed in ONNX as asked; the message says which and what to do."""


# ------------------------------------------------------------------ small helpers


def _i64(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _i64_scalar(value: int):
    return op.Constant(value_int=int(value))


def _scalar_like(value: float, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _static_dim(value, axis: int, what: str) -> Optional[int]:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        dim = shape[axis]
    except (IndexError, TypeError):
        return None
    return dim if isinstance(dim, int) else None


def _activation(name: str, v):
    """SPEC activations in standard ops (explicit formulas, valid from opset 18)."""
    if name == "relu":
        return op.Relu(v)
    if name == "identity":
        return v
    if name == "silu":
        return op.Mul(v, op.Sigmoid(v))
    if name == "quick_gelu":
        return op.Mul(v, op.Sigmoid(op.Mul(v, _scalar_like(1.702, v))))
    if name == "relu2":
        r = op.Relu(v)
        return op.Mul(r, r)
    if name == "gelu":
        inner = op.Erf(op.Mul(v, _scalar_like(1.0 / math.sqrt(2.0), v)))
        return op.Mul(op.Mul(v, _scalar_like(0.5, v)), op.Add(inner, _scalar_like(1.0, v)))
    if name == "gelu_tanh":
        cube = op.Mul(op.Mul(v, v), v)
        inner = op.Mul(
            op.Add(v, op.Mul(cube, _scalar_like(0.044715, v))),
            _scalar_like(math.sqrt(2.0 / math.pi), v),
        )
        return op.Mul(op.Mul(v, _scalar_like(0.5, v)), op.Add(op.Tanh(inner), _scalar_like(1.0, v)))
    raise TranslationError(
        f"moe_ffn: activation {name!r} has no ONNX form; use one of relu, gelu, gelu_tanh, silu, "
        "quick_gelu, relu2, identity"
    )


def _linear(v, w, b, e: int):
    """``v @ w[e].T + b[e]`` with the expert's slice taken by a constant Gather (folded later)."""
    we = op.Gather(w, _i64_scalar(e), axis=0)
    out = op.MatMul(v, op.Transpose(we, perm=[1, 0]))
    if b is not None:
        out = op.Add(out, op.Gather(b, _i64_scalar(e), axis=0))
    return out


# ------------------------------------------------------------------ moefx::xmoe_select


def xmoe_select_portable(probs: FLOAT, threshold: float, top_k: int, max_experts: int):
    """``moefx::xmoe_select`` (SPEC §1) in standard ops; returns ``(idx, weight)``."""
    num_experts = _static_dim(probs, 1, "probs")
    if top_k > 0:
        width = top_k
    elif max_experts > 0:
        width = max_experts
    else:
        width = num_experts
    k = _i64([width]) if width is not None else op.Slice(op.Shape(probs), _i64([1]), _i64([2]))
    values, order = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    if top_k > 0:
        return order, values
    before = op.Sub(op.CumSum(values, _i64_scalar(1)), values)
    keep = op.Less(before, _scalar_like(threshold, values))
    rank = op.Range(_i64_scalar(0), op.Squeeze(op.Shape(values, start=1, end=2), _i64([0])), _i64_scalar(1))
    keep = op.Or(keep, op.Equal(rank, _i64_scalar(0)))
    idx = op.Where(keep, order, _i64_scalar(-1))
    weight = op.Where(keep, values, _scalar_like(0.0, values))
    return idx, weight


# ------------------------------------------------------------------ moefx::capacity_drop


def capacity_drop_portable(idx: INT64, weight: FLOAT, num_experts: int, capacity):
    """``moefx::capacity_drop`` (SPEC §1): rank-major queue, probability-descending inside a
    rank, lower token first on ties; pairs past an expert's ``capacity`` become ``-1``/``0``.

    ``capacity`` is a Python int, or an ONNX scalar when torch.export kept it symbolic (it
    depends on the number of tokens)."""
    width = _static_dim(idx, 1, "idx")
    if width is None:
        raise TranslationError(
            "capacity_drop: the routing width K must be static to export the capacity rule; "
            "give the layer max_experts or top_k"
        )
    tokens = op.Shape(idx, start=0, end=1)
    queue_parts = []
    for j in range(width):
        column = op.Gather(weight, _i64_scalar(j), axis=1)
        _, order = op.TopK(column, tokens, axis=0, largest=1, sorted=1)
        queue_parts.append(op.Add(order, op.Mul(op.Squeeze(tokens, _i64([0])), _i64_scalar(j))))
    queue = op.Concat(*queue_parts, axis=0)
    rank_major = op.Reshape(op.Transpose(idx, perm=[1, 0]), _i64([-1]))
    experts = op.Gather(rank_major, queue, axis=0)
    onehot = op.Cast(
        op.Equal(op.Unsqueeze(experts, _i64([1])), op.Range(_i64_scalar(0), _i64_scalar(num_experts), _i64_scalar(1))),
        to=INT64.dtype,
    )
    position = op.ReduceSum(
        op.Mul(op.CumSum(onehot, _i64_scalar(0), exclusive=1), onehot), _i64([1]), keepdims=0
    )
    if isinstance(capacity, int):
        cap = _i64_scalar(capacity)
    else:
        cap = op.Cast(capacity, to=INT64.dtype)
    dropped_queue = op.Cast(
        op.And(op.GreaterOrEqual(position, cap), op.GreaterOrEqual(experts, _i64_scalar(0))),
        to=INT64.dtype,
    )
    dropped = op.ScatterElements(op.Mul(rank_major, _i64_scalar(0)), queue, dropped_queue, axis=0)
    dropped = op.Cast(
        op.Transpose(op.Reshape(dropped, op.Concat(_i64([width]), tokens, axis=0)), perm=[1, 0]),
        to=BOOL.dtype,
    )
    return (
        op.Where(dropped, _i64_scalar(-1), idx),
        op.Where(dropped, _scalar_like(0.0, weight), weight),
    )


# ------------------------------------------------------------------ moefx::moe_ffn


def moe_ffn_portable(
    x: FLOAT,
    idx: INT64,
    weight: FLOAT,
    w1: FLOAT,
    b1: Optional[FLOAT],
    w3: Optional[FLOAT],
    b3: Optional[FLOAT],
    w2: FLOAT,
    b2: Optional[FLOAT],
    activation: str,
    gate_input: bool,
):
    """``moefx::moe_ffn`` as an unrolled per-expert loop (see the module docstring).

    An expert appears at most once in a row (every moefx router picks distinct experts), so a
    row's weight for expert e is the sum of its slots that name e."""
    num_experts = _static_dim(w1, 0, "w1")
    if num_experts is None:
        raise TranslationError(
            "moe_ffn: the expert weights w1 must have a static expert count to export; "
            "pass the stacked expert weights as parameters or buffers"
        )
    gate = op.CastLike(weight, x)
    zero = _scalar_like(0.0, x)

    def expert(e: int):
        hit = op.Equal(idx, _i64_scalar(e))
        rows = _rows_where(op.ReduceSum(op.Cast(hit, to=INT64.dtype), _i64([1]), keepdims=0))
        g = op.Unsqueeze(op.Gather(op.ReduceSum(op.Where(hit, gate, zero), _i64([1]), keepdims=0), rows, axis=0), _i64([1]))
        xe = op.Gather(x, rows, axis=0)
        if gate_input:
            xe = op.Mul(xe, g)
        out = _linear(_expert_hidden(xe, e, w1, b1, w3, b3, activation), w2, b2, e)
        if not gate_input:
            out = op.Mul(out, g)
        return rows, out

    return _expert_loop(num_experts, expert, op.Shape(x), x)


def _rows_where(mask):
    """The indices of the nonzero entries of a 1-D mask, as a 1-D int64 tensor."""
    return op.Reshape(op.NonZero(mask), _i64([-1]))


def _expert_hidden(xe, e: int, w1, b1, w3, b3, activation: str):
    """``act(w1[e] v + b1[e]) (* (w3[e] v + b3[e]))`` on the rows ``xe`` routed to expert e."""
    hidden = _activation(activation, _linear(xe, w1, b1, e))
    if w3 is not None:
        hidden = op.Mul(hidden, _linear(xe, w3, b3, e))
    return hidden


def _expert_loop(num_experts: int, expert: Callable, shape, like):
    """The unrolled per-expert loop: ``expert(e)`` gives ``(rows, out)`` (target rows of the
    result and their values); every expert's rows are added into ``zeros(shape)`` (dtype of
    ``like``) by one ``ScatterND(reduction="add")``."""
    rows_all, outs_all = [], []
    for e in range(num_experts):
        rows, out = expert(e)
        rows_all.append(rows)
        outs_all.append(out)
    rows_cat = op.Unsqueeze(op.Concat(*rows_all, axis=0), _i64([1]))
    outs_cat = op.Concat(*outs_all, axis=0)
    if _is_half(like):
        # onnxruntime's CPU ScatterND has no float16 "add" reduction; summing the experts' rows
        # in float32 is also the more accurate order (SPEC §3: half-precision paths accumulate in
        # float32)
        total = op.ScatterND(op.ConstantOfShape(shape), rows_cat, op.Cast(outs_cat, to=FLOAT.dtype), reduction="add")
        return op.CastLike(total, like)
    zeros = op.CastLike(op.ConstantOfShape(shape), like)
    return op.ScatterND(zeros, rows_cat, outs_cat, reduction="add")


def _is_half(value) -> bool:
    """Whether a traced value is float16/bfloat16 (its dtype as the exporter records it)."""
    return str(getattr(value, "dtype", "")).rsplit(".", 1)[-1].upper() in ("FLOAT16", "BFLOAT16")


# ------------------------------------------------------------------ moefx::ort_moe


def _moe_attributes(activation_type: str, k: int, normalize: int, swiglu_fusion: int, alpha: float,
                    beta: float) -> dict:
    """The ``com.microsoft.MoE`` node's attributes (SwiGLU's only when it is one)."""
    attributes = dict(activation_type=activation_type, k=int(k), normalize_routing_weights=int(normalize))
    if swiglu_fusion:
        attributes.update(swiglu_fusion=int(swiglu_fusion), activation_alpha=float(alpha),
                          activation_beta=float(beta))
    return attributes


def ort_moe_to_contrib(
    x: FLOAT,
    idx: INT64,
    weight: FLOAT,
    fc1: FLOAT,
    fc1_bias: Optional[FLOAT],
    fc2: FLOAT,
    fc2_bias: Optional[FLOAT],
    activation_type: str,
    k: int,
    swiglu_fusion: int,
    activation_alpha: float,
    activation_beta: float,
) -> FLOAT:
    """``moefx::ort_moe`` as one ``com.microsoft.MoE`` node (SPEC §4), output rescaled by the
    row's weight total (see the module docstring)."""
    num_experts = _static_dim(fc1, 0, "fc1")
    if num_experts is None:
        raise TranslationError("ort_moe: fc1 must have a static expert count")
    gate = op.CastLike(weight, x)
    valid = op.GreaterOrEqual(idx, _i64_scalar(0))
    zero = _scalar_like(0.0, x)
    floor = _scalar_like(NEG_LOGIT, x)
    rows_by_experts = op.Concat(op.Shape(idx, start=0, end=1), _i64([num_experts]), axis=0)
    logits = op.ScatterElements(
        op.Expand(floor, rows_by_experts),
        op.Max(idx, _i64_scalar(0)),
        op.Where(valid, op.Max(op.Log(gate), floor), floor),
        axis=1,
        reduction="max",
    )
    total = op.ReduceSum(op.Where(valid, gate, zero), _i64([1]), keepdims=1)
    attributes = _moe_attributes(activation_type, k, 0, swiglu_fusion, activation_alpha, activation_beta)
    y = msft.MoE(x, logits, fc1, fc1_bias, fc2, fc2_bias, **attributes)
    return op.Mul(y, total)


def ort_moe_routed_to_contrib(
    x: FLOAT,
    logits: FLOAT,
    fc1: FLOAT,
    fc1_bias: Optional[FLOAT],
    fc2: FLOAT,
    fc2_bias: Optional[FLOAT],
    activation_type: str,
    k: int,
    normalize: int,
    swiglu_fusion: int,
    activation_alpha: float,
    activation_beta: float,
) -> FLOAT:
    """``moefx::ort_moe_routed``: one ``com.microsoft.MoE`` node on the router's logits; the
    node's own softmax and top-k are the layer's routing."""
    attributes = _moe_attributes(activation_type, k, normalize, swiglu_fusion, activation_alpha, activation_beta)
    return msft.MoE(x, op.CastLike(logits, x), fc1, fc1_bias, fc2, fc2_bias, **attributes)


# ------------------------------------------------------------------ the table

_EXTRA: dict[str, Callable] = {}


def register_translation(qualified_name: str, fn: Callable) -> None:
    """Let another room (fused ops, new routers) add the ONNX form of its own op.

    ``qualified_name`` is ``"namespace::op"`` (overload ``default``); ``fn`` is called like the
    functions of this module."""
    if "::" not in qualified_name:
        raise ValueError(f"register_translation: expected 'namespace::op', got {qualified_name!r}")
    _EXTRA[qualified_name] = fn


_PORTABLE = {
    "moefx::xmoe_select": xmoe_select_portable,
    "moefx::capacity_drop": capacity_drop_portable,
    "moefx::moe_ffn": moe_ffn_portable,
    "moefx::ort_moe": ort_moe_to_contrib,
    "moefx::ort_moe_routed": ort_moe_routed_to_contrib,
}


def _overload(qualified_name: str):
    import torch

    namespace, name = qualified_name.split("::")
    packet = getattr(getattr(torch.ops, namespace), name, None) if hasattr(torch.ops, namespace) else None
    if packet is None:
        return None
    try:
        return packet.default
    except AttributeError:
        return None


def translation_table() -> dict:
    """``{OpOverload: fn}`` for every moefx op that exists in this process (keys must be
    OpOverloads, not packets: the exporter ignores packets silently)."""
    import moefx.kernels  # noqa: F401  (registers torch.ops.moefx.*)
    from moefx.export import ort  # noqa: F401  (registers torch.ops.moefx.ort_moe)

    table = {}
    for name, fn in {**_PORTABLE, **_EXTRA}.items():
        overload = _overload(name)
        if overload is not None:
            table[overload] = fn
    return table


def translated_names() -> set:
    """Qualified names ("moefx::moe_ffn") of the ops that have a translation."""
    return set(_PORTABLE) | set(_EXTRA)


from moefx.export import translations_fused as _fused  # noqa: E402,F401  (registers the lowered/fused ops)
