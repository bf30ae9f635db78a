"""Portable ONNX translations of the ops that ``moefx.optimize`` emits: the primitives of the
``lower`` pass (:mod:`moefx.kernels.primitives`) and the fused ops of the ``fuse_*`` passes
(:mod:`moefx.kernels.fused`), so that an optimized GraphModule exports like the model it came
from. Standard ONNX ops only (opset 18 and later); registered through
:func:`moefx.export.translations.register_translation` when that module is imported.

Each op is translated on its own, to exactly what its CPU kernel returns, so that any chain of
them composes as in PyTorch:

- routing reuses the ``xmoe_select`` / ``capacity_drop`` translations; ``apply_capacity``
  computes ``C = max(ceil(T / E · γ), 4)`` from the batch's ``T`` in float64, the very
  arithmetic of the Python kernel, so a boundary capacity agrees exactly;
- ``dispatch`` builds the *block layout* of the CPU kernel (every expert's slots padded to
  whole ``block_m``-row blocks, ``B = max_blocks(N·K, E, block_m)`` blocks, slots in token
  order inside an expert, unused blocks ``-1``) without a sort: a slot's place in its expert's
  queue is an exclusive ``CumSum`` over the one-hot expert matrix (the stable order of the CPU
  argsort), and one ``ScatterElements(reduction="max")`` into a ``-1``-filled buffer writes
  every slot where it belongs (``block_m = 1``, the CPU default, gives 1-row blocks and
  ``B = N·K``);
- the ops that read the layout (``grouped_gemm``, ``gather_gemm1``, ``gemm2_scatter``,
  ``expert_mlp``) find each row's expert as ``block_expert[row // block_m]`` (``block_m`` is
  ``len(sorted_slot) // len(block_expert)``) and run the per-expert loop of ``moe_ffn``
  (:func:`moefx.export.translations._expert_loop`) over the rows of each expert. As on the CPU,
  ``grouped_gemm`` computes every row of a used block (padding rows included: they come out as
  the bias), the fused ops compute only the routed rows and leave padding rows zero, and
  ``combine`` / ``gemm2_scatter`` / ``expert_mlp`` add slot by slot into token ``slot // K``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnxscript import DOUBLE, FLOAT, INT64
from onnxscript import opset18 as op

from moefx.export.translations import (
    TranslationError,
    _activation,
    _expert_hidden,
    _expert_loop,
    _i64,
    _i64_scalar,
    _linear,
    _rows_where,
    _scalar_like,
    _static_dim,
    capacity_drop_portable,
    register_translation,
    xmoe_select_portable,
)


def _num_experts(w, op_name: str, arg: str) -> int:
    num_experts = _static_dim(w, 0, arg)
    if num_experts is None:
        raise TranslationError(
            f"moefx::{op_name}: the expert weights {arg} must have a static expert count to export; "
            "pass the stacked expert weights as parameters or buffers"
        )
    return num_experts


def _dim(value, axis: int):
    """``value.shape[axis]`` as a 1-element int64 tensor."""
    return op.Shape(value, start=axis, end=axis + 1)


# ------------------------------------------------------------------ routing


def _router_dtype(x):
    """Routers run in float32 whatever the model dtype; float64 stays float64 (SPEC §1)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and dtype == DOUBLE.dtype:
        return x
    return op.Cast(x, to=FLOAT.dtype)


def router_linear_portable(x: FLOAT, weight: FLOAT, bias: Optional[FLOAT]):
    """``moefx::router_linear``: ``x @ weight.T + bias`` in the router dtype."""
    xr = _router_dtype(x)
    out = op.MatMul(xr, op.Transpose(op.CastLike(weight, xr), perm=[1, 0]))
    if bias is not None:
        out = op.Add(out, op.CastLike(bias, xr))
    return out


def router_softmax_portable(logits: FLOAT):
    """``moefx::router_softmax``: softmax over the experts."""
    return op.Softmax(logits, axis=-1)


def select_experts_portable(probs: FLOAT, threshold: float, top_k: int, max_experts: int, renormalize: bool):
    """``moefx::select_experts``: the ``xmoe_select`` translation, then (``renormalize``) the
    kept weights divided by their row sum."""
    idx, weight = xmoe_select_portable(probs, threshold, top_k, max_experts)
    if renormalize:
        weight = op.Div(weight, op.ReduceSum(weight, _i64([1]), keepdims=1))
    return idx, weight


def route_portable(x: FLOAT, weight: FLOAT, bias: Optional[FLOAT], threshold: float, top_k: int,
                   max_experts: int, renormalize: bool):
    """``moefx::route``: router linear + softmax + selection; ``(idx, weight, probs)``."""
    probs = router_softmax_portable(router_linear_portable(x, weight, bias))
    idx, w = select_experts_portable(probs, threshold, top_k, max_experts, renormalize)
    return idx, w, probs


def apply_capacity_portable(idx: INT64, weight: FLOAT, num_experts: int, capacity_factor: float):
    """``moefx::apply_capacity``: ``C = max(ceil(T / E · γ), 4)`` from this batch's ``T`` (float64
    like Python's arithmetic), then the ``capacity_drop`` translation."""
    tokens = op.Cast(_dim(idx, 0), to=DOUBLE.dtype)
    ratio = op.Mul(
        op.Div(tokens, op.Constant(value=_double(num_experts))),
        op.Constant(value=_double(capacity_factor)),
    )
    capacity = op.Max(op.Cast(op.Ceil(ratio), to=INT64.dtype), _i64([4]))
    return capacity_drop_portable(idx, weight, num_experts, capacity)


def _double(value: float):
    """A 1-element float64 tensor (``Constant(value_float=...)`` would round to float32)."""
    return onnx.numpy_helper.from_array(np.array([value], dtype=np.float64))


def unit_weights_portable(idx: INT64, weight: FLOAT):
    """``moefx::unit_weights``: 1 for every kept slot, 0 for the rest."""
    return op.CastLike(op.GreaterOrEqual(idx, _i64_scalar(0)), weight)


# ------------------------------------------------------------------ the block layout


def _max_blocks(slots, num_experts: int, block_m: int):
    """:func:`moefx.kernels.triton_moe.max_blocks` on a 1-element int64 tensor."""
    experts = _i64([num_experts])
    bound = op.Add(op.Div(op.Add(op.Sub(slots, experts), _i64([block_m])), _i64([block_m])), _i64([num_experts - 1]))
    return op.Where(op.Less(slots, experts), slots, op.Min(slots, bound))


def dispatch_portable(idx: INT64, num_experts: int, block_m: int):
    """``moefx::dispatch``: ``(sorted_slot [B·block_m], block_expert [B])`` exactly as the CPU
    kernel lays them out (see the module docstring)."""
    if block_m < 1:
        raise TranslationError(f"moefx::dispatch: block_m must be >= 1, got {block_m}")
    E = int(num_experts)
    flat = op.Reshape(idx, _i64([-1]))
    slots = op.Shape(flat)
    blocks = _max_blocks(slots, E, block_m)
    length = op.Mul(blocks, _i64([block_m]))
    onehot = op.Cast(
        op.Equal(op.Unsqueeze(flat, _i64([1])), op.Range(_i64_scalar(0), _i64_scalar(E), _i64_scalar(1))),
        to=INT64.dtype,
    )
    counts = op.ReduceSum(onehot, _i64([0]), keepdims=0)
    n_blocks = op.Div(op.Add(counts, _i64_scalar(block_m - 1)), _i64_scalar(block_m))
    block_end = op.CumSum(n_blocks, _i64_scalar(0))
    first_row = op.Mul(op.Sub(block_end, n_blocks), _i64_scalar(block_m))
    rank = op.ReduceSum(op.Mul(op.CumSum(onehot, _i64_scalar(0), exclusive=1), onehot), _i64([1]), keepdims=0)
    start = op.ReduceSum(op.Mul(onehot, op.Unsqueeze(first_row, _i64([0]))), _i64([1]), keepdims=0)
    valid = op.And(op.GreaterOrEqual(flat, _i64_scalar(0)), op.Less(flat, _i64_scalar(E)))
    dest = op.Where(valid, op.Add(start, rank), op.Squeeze(length, _i64([0])))
    order = op.Range(_i64_scalar(0), op.Squeeze(slots, _i64([0])), _i64_scalar(1))
    buffer = op.Expand(_i64([-1]), op.Add(length, _i64([1])))
    sorted_slot = op.ScatterElements(buffer, dest, op.Where(valid, order, _i64_scalar(-1)), axis=0, reduction="max")
    sorted_slot = op.Slice(sorted_slot, _i64([0]), length, _i64([0]))
    block = op.Range(_i64_scalar(0), op.Squeeze(blocks, _i64([0])), _i64_scalar(1))
    expert = op.ReduceSum(
        op.Cast(op.LessOrEqual(op.Unsqueeze(block_end, _i64([0])), op.Unsqueeze(block, _i64([1]))), to=INT64.dtype),
        _i64([1]),
        keepdims=0,
    )
    block_expert = op.Where(op.Less(expert, _i64_scalar(E)), expert, _i64_scalar(-1))
    return sorted_slot, block_expert


def _row_experts(rows_value, block_expert):
    """The expert of every row of the layout: ``block_expert[row // block_m]``."""
    rows = _dim(rows_value, 0)
    block_m = op.Div(rows, op.Max(_dim(block_expert, 0), _i64([1])))
    row = op.Range(_i64_scalar(0), op.Squeeze(rows, _i64([0])), _i64_scalar(1))
    return op.Gather(block_expert, op.Div(row, block_m), axis=0)


def _slots(sorted_slot, weight):
    """``(valid, slot, token)`` of every layout row: token ``slot // K``, ``K = weight.shape[1]``;
    padding rows read slot 0."""
    valid = op.GreaterOrEqual(sorted_slot, _i64_scalar(0))
    slot = op.Max(sorted_slot, _i64_scalar(0))
    return valid, slot, op.Div(slot, _dim(weight, 1))


def _slot_weights(weight, slot, like):
    """The routing weight of each slot as a ``[rows, 1]`` column in ``like``'s dtype."""
    flat = op.Reshape(weight, _i64([-1]))
    return op.Unsqueeze(op.CastLike(op.Gather(flat, slot, axis=0), like), _i64([1]))


def _routed_experts(sorted_slot, block_expert):
    """The expert of every layout row that holds a routed slot, ``-1`` for padding rows."""
    valid = op.GreaterOrEqual(sorted_slot, _i64_scalar(0))
    return op.Where(valid, _row_experts(sorted_slot, block_expert), _i64_scalar(-1))


def _shape2(rows, cols):
    return op.Concat(rows, cols, axis=0)


# ------------------------------------------------------------------ primitive grouped ops


def gather_rows_portable(x: FLOAT, sorted_slot: INT64, weight: FLOAT, scale: bool):
    """``moefx::gather_rows``: row r is ``x[slot // K]`` (times its weight with ``scale``), zero
    for padding rows."""
    valid, slot, token = _slots(sorted_slot, weight)
    rows = op.Gather(x, token, axis=0)
    if scale:
        rows = op.Mul(rows, _slot_weights(weight, slot, x))
    return op.Where(op.Unsqueeze(valid, _i64([1])), rows, _scalar_like(0.0, x))


def grouped_gemm_portable(a: FLOAT, block_expert: INT64, w: FLOAT, b: Optional[FLOAT]):
    """``moefx::grouped_gemm``: ``w[e] a[r] + b[e]`` for every row of a used block (padding rows
    too, like the CPU kernel), zero in unused blocks."""
    E = _num_experts(w, "grouped_gemm", "w")
    row_expert = _row_experts(a, block_expert)

    def expert(e: int):
        rows = _rows_where(op.Equal(row_expert, _i64_scalar(e)))
        return rows, _linear(op.Gather(a, rows, axis=0), w, b, e)

    return _expert_loop(E, expert, _shape2(_dim(a, 0), _dim(w, 1)), a)


def activation_portable(x: FLOAT, name: str):
    """``moefx::activation`` (``identity`` still emits a node: an op's output must be its own value)."""
    out = _activation(name, x)
    return op.Identity(out) if out is x else out


def glu_mul_portable(gate: FLOAT, up: FLOAT):
    """``moefx::glu_mul``: ``gate * up``."""
    return op.Mul(gate, up)


def combine_portable(out: FLOAT, sorted_slot: INT64, weight: FLOAT, apply_weight: bool):
    """``moefx::combine``: every routed row (times its weight) added into token ``slot // K``."""
    valid, slot, token = _slots(sorted_slot, weight)
    rows = out
    if apply_weight:
        rows = op.Mul(rows, _slot_weights(weight, slot, out))
    rows = op.Where(op.Unsqueeze(valid, _i64([1])), rows, _scalar_like(0.0, out))
    zeros = op.CastLike(op.ConstantOfShape(_shape2(_dim(weight, 0), _dim(out, 1))), out)
    return op.ScatterND(zeros, op.Unsqueeze(token, _i64([1])), rows, reduction="add")


# ------------------------------------------------------------------ fused grouped ops


def _expert_input(x, sorted_slot, weight, rows, scale_input: bool):
    """``(tokens, slot weights, input rows)`` of the layout rows ``rows``."""
    slot = op.Gather(sorted_slot, rows, axis=0)
    token = op.Div(slot, _dim(weight, 1))
    gate = _slot_weights(weight, slot, x)
    xe = op.Gather(x, token, axis=0)
    if scale_input:
        xe = op.Mul(xe, gate)
    return token, gate, xe


def gather_gemm1_portable(x: FLOAT, sorted_slot: INT64, block_expert: INT64, weight: FLOAT, scale_input: bool,
                          w1: FLOAT, b1: Optional[FLOAT], w3: Optional[FLOAT], b3: Optional[FLOAT],
                          activation: str):
    """``moefx::gather_gemm1``: the hidden activations of the routed layout rows, zero in padding
    rows (as the CPU kernel writes them)."""
    E = _num_experts(w1, "gather_gemm1", "w1")
    row_expert = _routed_experts(sorted_slot, block_expert)

    def expert(e: int):
        rows = _rows_where(op.Equal(row_expert, _i64_scalar(e)))
        _, _, xe = _expert_input(x, sorted_slot, weight, rows, scale_input)
        return rows, _expert_hidden(xe, e, w1, b1, w3, b3, activation)

    return _expert_loop(E, expert, _shape2(_dim(sorted_slot, 0), _dim(w1, 1)), x)


def gemm2_scatter_portable(hidden: FLOAT, sorted_slot: INT64, block_expert: INT64, weight: FLOAT,
                           apply_weight: bool, w2: FLOAT, b2: Optional[FLOAT]):
    """``moefx::gemm2_scatter``: ``w2[e] hidden[r] + b2[e]`` (times the weight) of every routed
    row, added into its token."""
    E = _num_experts(w2, "gemm2_scatter", "w2")
    row_expert = _routed_experts(sorted_slot, block_expert)

    def expert(e: int):
        rows = _rows_where(op.Equal(row_expert, _i64_scalar(e)))
        slot = op.Gather(sorted_slot, rows, axis=0)
        out = _linear(op.Gather(hidden, rows, axis=0), w2, b2, e)
        if apply_weight:
            out = op.Mul(out, _slot_weights(weight, slot, hidden))
        return op.Div(slot, _dim(weight, 1)), out

    return _expert_loop(E, expert, _shape2(_dim(weight, 0), _dim(w2, 1)), hidden)


def expert_mlp_portable(x: FLOAT, sorted_slot: INT64, block_expert: INT64, weight: FLOAT, scale_input: bool,
                        apply_weight: bool, w1: FLOAT, b1: Optional[FLOAT], w3: Optional[FLOAT],
                        b3: Optional[FLOAT], w2: FLOAT, b2: Optional[FLOAT], activation: str):
    """``moefx::expert_mlp``: ``gemm2_scatter(gather_gemm1(...))`` in one per-expert loop."""
    E = _num_experts(w1, "expert_mlp", "w1")
    row_expert = _routed_experts(sorted_slot, block_expert)

    def expert(e: int):
        rows = _rows_where(op.Equal(row_expert, _i64_scalar(e)))
        token, gate, xe = _expert_input(x, sorted_slot, weight, rows, scale_input)
        out = _linear(_expert_hidden(xe, e, w1, b1, w3, b3, activation), w2, b2, e)
        if apply_weight:
            out = op.Mul(out, gate)
        return token, out

    return _expert_loop(E, expert, _shape2(_dim(weight, 0), _dim(w2, 1)), x)


TRANSLATIONS = {
    "moefx::router_linear": router_linear_portable,
    "moefx::router_softmax": router_softmax_portable,
    "moefx::select_experts": select_experts_portable,
    "moefx::apply_capacity": apply_capacity_portable,
    "moefx::unit_weights": unit_weights_portable,
    "moefx::dispatch": dispatch_portable,
    "moefx::gather_rows": gather_rows_portable,
    "moefx::grouped_gemm": grouped_gemm_portable,
    "moefx::activation": activation_portable,
    "moefx::glu_mul": glu_mul_portable,
    "moefx::combine": combine_portable,
    "moefx::route": route_portable,
    "moefx::gather_gemm1": gather_gemm1_portable,
    "moefx::gemm2_scatter": gemm2_scatter_portable,
    "moefx::expert_mlp": expert_mlp_portable,
}

for _name, _fn in TRANSLATIONS.items():
    register_translation(_name, _fn)
