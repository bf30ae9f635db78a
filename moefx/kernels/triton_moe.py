"""Triton kernels for moefx's MoE ops, and the Python launchers that call them.

Layout shared by every kernel (the "block layout"): the ``R = N·K`` routing slots of an
``idx [N, K]`` tensor (slot ``s`` is token ``s // K``, choice ``s % K``) are grouped by expert with
a stable counting sort, and each expert's slots are padded up to a multiple of ``BM`` rows, vLLM
``moe_align_block_size`` style. The result is two tensors whose sizes depend only on shapes:

- ``block_expert [B]``: the expert of each ``BM``-row block, ``-1`` for unused blocks;
- ``sorted_slot [B·BM]``: the slot held by each row, ``-1`` for padding rows;

with ``B = max_blocks(R, E, BM)``, the static bound ``ceil((R - E + 1) / BM) + E - 1`` (an
expert holding ``c`` rows needs ``ceil(c / BM)`` blocks; the sum is largest when ``E - 1``
experts take one row each). A static grid of ``B`` programs therefore covers every routing
outcome without reading a count back to the host: no synchronisation, and CUDA graphs and
``torch.export`` see fixed shapes. Unused blocks return at once.

Kernels gather token rows straight from ``x`` (ScatterMoE/vLLM style: no gathered copy of the
input), keep fp32 accumulators, apply the routing weight either to the input rows
(``scale_input``, SliceMoE's input gating) or in the epilogue (``apply_weight``), and add results
into an fp32 ``[N, d]`` buffer with atomic adds. An atomic scatter-add, not a per-slot output
buffer, because threshold routing makes ``K`` as large as ``E``: a ``[N, K, d]`` buffer would
cost gigabytes at XMoE's sizes. The price: on a GPU the order of the fp32 additions varies,
so results may differ from run to run in the last bits (the dispatch itself is deterministic).

Every width is allowed (SliceMoE's slices of 72 or 96 included): loads are masked and padded to
the power-of-two tile. All launchers run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``, which is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "quick_gelu": 5, "relu2": 6}

# Widest expert input/output that the fused expert MLP keeps in registers as one tile.
EXPERT_MLP_MAX_WIDTH = 256


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """The static upper bound on the number of ``block_m``-row blocks of the block layout."""
    if num_slots <= 0:
        return 0
    if num_slots < num_experts:
        return num_slots
    return min(num_slots, -(-(num_slots - num_experts + 1) // block_m) + num_experts - 1)


def choose_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per block: 16 when experts get few rows (decode), larger tiles for big batches
    (every block re-reads its expert's weights, so big batches want tall blocks)."""
    per_expert = num_slots / max(num_experts, 1)
    if per_expert <= 16:
        return 16
    if per_expert <= 64:
        return 32
    if per_expert <= 512:
        return 64
    return 128


def _warps(rows: int) -> int:
    """Warps per program: 8 from 64-row tiles on, else 4. Chosen from sm90 compiles (no GPU
    at hand): with 4 warps the 64-row tiles spill registers, with 8 they barely do."""
    return 8 if rows >= 64 else 4


# Per-kernel tile overrides, e.g. {"gemm2_scatter": {"BN": 64, "num_warps": 4}}: the tiles
# above are heuristics picked without a GPU; bench/gpu_moe.py --tiles sets these to tune.
TILE_OVERRIDES: dict = {}


def _tiles(kernel: str, **defaults) -> dict:
    cfg = dict(defaults)
    cfg.update(TILE_OVERRIDES.get(kernel, {}))
    return cfg


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def _dot_mode(dtype: torch.dtype) -> int:
    """How ``tl.dot`` runs: fp32 follows torch's own TF32 switch (1 = exact fp32, so results
    match torch's matmuls); 16-bit types use tensor cores directly (0). Triton 3.9's CPU
    interpreter multiplies bfloat16 tiles wrongly (it sees raw 16-bit integers), so under
    ``TRITON_INTERPRET=1`` bfloat16 tiles are widened to fp32 first (2); GPU code is unaffected."""
    if dtype == torch.float32:
        return 0 if torch.backends.cuda.matmul.allow_tf32 else 1
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return 2
    return 0


def _check_activation(activation: str) -> int:
    try:
        return ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(
            f"activation={activation!r} has no Triton kernel; use one of {sorted(ACTIVATION_CODES)}"
        ) from None


# ------------------------------------------------------------------ shared device helpers


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 4:
        x = x * tl.sigmoid(x)
    elif ACT == 5:
        x = x * tl.sigmoid(1.702 * x)
    elif ACT == 6:
        x = tl.maximum(x, 0.0)
        x = x * x
    return x


@triton.jit
def _mm(a, b, acc, DOT: tl.constexpr):
    if DOT == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ------------------------------------------------------------------ dispatch: counting sort


@triton.jit
def _chunk_count_kernel(idx_ptr, counts_ptr, R, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(idx_ptr + offs, mask=offs < R, other=-1)
    offs_e = tl.arange(0, BLOCK_E)
    hits = (e[:, None] == offs_e[None, :]).to(tl.int32)
    tl.store(counts_ptr + pid * E + offs_e, tl.sum(hits, axis=0), mask=offs_e < E)


@triton.jit
def _block_map_kernel(totals_ptr, block_start_ptr, block_expert_ptr, E, B,
                      BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    counts = tl.load(totals_ptr + offs_e, mask=e_mask, other=0)
    n_blocks = (counts + BM - 1) // BM
    ends = tl.cumsum(n_blocks, 0)
    tl.store(block_start_ptr + offs_e, ends - n_blocks, mask=e_mask)
    ends = tl.where(e_mask, ends, 2147483647)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((ends[None, :] <= offs_b[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < E, expert, -1)
        tl.store(block_expert_ptr + offs_b, expert.to(tl.int64), mask=offs_b < B)


@triton.jit
def _place_kernel(idx_ptr, chunk_base_ptr, block_start_ptr, sorted_ptr, R, E,
                  BM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK)
    offs = pid * BLOCK + offs_i
    e = tl.load(idx_ptr + offs, mask=offs < R, other=-1)
    valid = (e >= 0) & (e < E)
    e_safe = tl.where(valid, e, 0)
    earlier = (offs_i[None, :] < offs_i[:, None]) & (e[None, :] == e[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    base = tl.load(chunk_base_ptr + pid * E + e_safe, mask=valid, other=0)
    start = tl.load(block_start_ptr + e_safe, mask=valid, other=0)
    dest = start.to(tl.int64) * BM + base + rank
    tl.store(sorted_ptr + dest, offs.to(tl.int64), mask=valid)


@triton.jit
def _align_small_kernel(idx_ptr, sorted_ptr, block_expert_ptr, R, E, B,
                        BM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_B: tl.constexpr):
    offs_i = tl.arange(0, BLOCK)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, R, BLOCK):
        offs = c0 + offs_i
        e = tl.load(idx_ptr + offs, mask=offs < R, other=-1)
        counts += tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    counts = tl.where(e_mask, counts, 0)
    n_blocks = (counts + BM - 1) // BM
    ends = tl.cumsum(n_blocks, 0)
    base = (ends - n_blocks) * BM
    ends = tl.where(e_mask, ends, 2147483647)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((ends[None, :] <= offs_b[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < E, expert, -1)
        tl.store(block_expert_ptr + offs_b, expert.to(tl.int64), mask=offs_b < B)
    for r0 in range(0, B * BM, BLOCK):
        rows = r0 + offs_i
        tl.store(sorted_ptr + rows, tl.full((BLOCK,), -1, dtype=tl.int64), mask=rows < B * BM)
    tl.debug_barrier()
    for c0 in range(0, R, BLOCK):
        offs = c0 + offs_i
        e = tl.load(idx_ptr + offs, mask=offs < R, other=-1)
        valid = (e >= 0) & (e < E)
        hit = e[:, None] == offs_e[None, :]
        earlier = (offs_i[None, :] < offs_i[:, None]) & (e[None, :] == e[:, None])
        dest = tl.sum(tl.where(hit, base[None, :], 0), axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + dest, offs.to(tl.int64), mask=valid)
        base += tl.sum(hit.to(tl.int32), axis=0)


# Up to this many routing slots, one program sorts them all (one launch instead of five: what
# decode-sized batches need); beyond, the work is spread over one program per 128 slots.
SINGLE_PROGRAM_SLOTS = 4096


def align_blocks(idx: torch.Tensor, num_experts: int, block_m: int,
                 single_program: Optional[bool] = None):
    """Group the slots of ``idx [N, K]`` by expert into the block layout (see the module doc).

    Stable: inside one expert, slots keep their order, so the result equals
    :func:`moefx.kernels.primitives.dispatch_torch` exactly. Nothing is read back to the host.
    Small batches (``single_program``, default: at most :data:`SINGLE_PROGRAM_SLOTS` slots) use
    one kernel; large ones three kernels and two device-side cumulative sums.
    """
    R = idx.numel()
    E = int(num_experts)
    B = max_blocks(R, E, block_m)
    device = idx.device
    BLOCK = 128
    BLOCK_E = _pow2(E, 2)
    BLOCK_B = max(16, min(256, 8192 // BLOCK_E))
    if single_program is None:
        single_program = R <= SINGLE_PROGRAM_SLOTS
    if single_program and R > 0:
        sorted_slot = torch.empty((B * block_m,), dtype=torch.int64, device=device)
        block_expert = torch.empty((B,), dtype=torch.int64, device=device)
        _align_small_kernel[(1,)](idx.reshape(-1).contiguous(), sorted_slot, block_expert, R, E, B,
                                  BM=block_m, BLOCK=BLOCK, BLOCK_E=BLOCK_E, BLOCK_B=BLOCK_B)
        return sorted_slot, block_expert
    sorted_slot = torch.full((B * block_m,), -1, dtype=torch.int64, device=device)
    block_expert = torch.full((B,), -1, dtype=torch.int64, device=device)
    if R == 0:
        return sorted_slot, block_expert
    flat = idx.reshape(-1).contiguous()
    n_chunks = triton.cdiv(R, BLOCK)
    counts = torch.empty((n_chunks, E), dtype=torch.int32, device=device)
    _chunk_count_kernel[(n_chunks,)](flat, counts, R, E, BLOCK=BLOCK, BLOCK_E=BLOCK_E)
    totals = counts.sum(0, dtype=torch.int32)
    chunk_base = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
    block_start = torch.empty((E,), dtype=torch.int32, device=device)
    _block_map_kernel[(1,)](totals, block_start, block_expert, E, B,
                            BM=block_m, BLOCK_E=BLOCK_E, BLOCK_B=BLOCK_B)
    _place_kernel[(n_chunks,)](flat, chunk_base, block_start, sorted_slot, R, E,
                               BM=block_m, BLOCK=BLOCK)
    return sorted_slot, block_expert


# ------------------------------------------------------------------ gather + GEMM1 (+ act, GLU)


@triton.jit
def _gather_gemm1_kernel(x_ptr, sorted_ptr, bexp_ptr, wt_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr, h_ptr,
                         D, H, K,
                         HAS_B1: tl.constexpr, HAS_W3: tl.constexpr, HAS_B3: tl.constexpr,
                         SCALE_INPUT: tl.constexpr, ACT: tl.constexpr, DOT: tl.constexpr,
                         GATHER: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_b)
    if e < 0:
        return
    offs_m = tl.arange(0, BM)
    rows = pid_b * BM + offs_m
    if GATHER:
        slot = tl.load(sorted_ptr + rows)
        valid = slot >= 0
        slot = tl.where(valid, slot, 0).to(tl.int32)
        tok = slot // K
    else:
        valid = offs_m >= 0
        slot = rows
        tok = rows
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < H
    if SCALE_INPUT:
        gate = tl.load(wt_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    w1_base = w1_ptr + e * H * D
    w3_base = w3_ptr + e * H * D
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < D
        a = tl.load(x_ptr + tok[:, None] * D + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        if SCALE_INPUT:
            a = (a.to(tl.float32) * gate[:, None]).to(x_ptr.dtype.element_ty)
        w_offs = offs_n[None, :] * D + offs_k[:, None]
        w_mask = n_mask[None, :] & k_mask[:, None]
        acc1 = _mm(a, tl.load(w1_base + w_offs, mask=w_mask, other=0.0), acc1, DOT)
        if HAS_W3:
            acc3 = _mm(a, tl.load(w3_base + w_offs, mask=w_mask, other=0.0), acc3, DOT)
    if HAS_B1:
        acc1 += tl.load(b1_ptr + e * H + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    hidden = _act(acc1, ACT)
    if HAS_W3:
        if HAS_B3:
            acc3 += tl.load(b3_ptr + e * H + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        hidden = hidden * acc3
    tl.store(h_ptr + rows[:, None] * H + offs_n[None, :], hidden.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


# ------------------------------------------------------------------ GEMM2 + weight + scatter-add


@triton.jit
def _gemm2_scatter_kernel(h_ptr, sorted_ptr, bexp_ptr, wt_ptr, w2_ptr, b2_ptr, y_ptr,
                          H, D, K,
                          HAS_B2: tl.constexpr, APPLY_WEIGHT: tl.constexpr, DOT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_b)
    if e < 0:
        return
    offs_m = tl.arange(0, BM)
    slot = tl.load(sorted_ptr + pid_b * BM + offs_m)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0).to(tl.int32)
    tok = slot // K
    rows = pid_b * BM + offs_m
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < D
    w2_base = w2_ptr + e * D * H
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < H
        a = tl.load(h_ptr + rows[:, None] * H + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w2_base + offs_n[None, :] * H + offs_k[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _mm(a, b, acc, DOT)
    if HAS_B2:
        acc += tl.load(b2_ptr + e * D + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_WEIGHT:
        acc = acc * tl.load(wt_ptr + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.atomic_add(y_ptr + tok[:, None] * D + offs_n[None, :], acc,
                  mask=valid[:, None] & n_mask[None, :])


# ------------------------------------------------------------------ whole expert MLP, hidden on chip


@triton.jit
def _expert_mlp_kernel(x_ptr, sorted_ptr, bexp_ptr, wt_ptr, w1_ptr, b1_ptr, w3_ptr, b3_ptr,
                       w2_ptr, b2_ptr, y_ptr, D, H, K,
                       HAS_B1: tl.constexpr, HAS_W3: tl.constexpr, HAS_B3: tl.constexpr,
                       HAS_B2: tl.constexpr, SCALE_INPUT: tl.constexpr, APPLY_WEIGHT: tl.constexpr,
                       ACT: tl.constexpr, DOT: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    pid_b = tl.program_id(0)
    e = tl.load(bexp_ptr + pid_b)
    if e < 0:
        return
    offs_m = tl.arange(0, BM)
    slot = tl.load(sorted_ptr + pid_b * BM + offs_m)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0).to(tl.int32)
    tok = slot // K
    offs_d = tl.arange(0, BD)
    d_mask = offs_d < D
    row_mask = valid[:, None] & d_mask[None, :]
    xt = tl.load(x_ptr + tok[:, None] * D + offs_d[None, :], mask=row_mask, other=0.0)
    gate = tl.load(wt_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    if SCALE_INPUT:
        xt = (xt.to(tl.float32) * gate[:, None]).to(x_ptr.dtype.element_ty)
    w1_base = w1_ptr + e * H * D
    w3_base = w3_ptr + e * H * D
    w2_base = w2_ptr + e * D * H
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for h0 in range(0, H, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_mask = offs_h < H
        w_offs = offs_h[None, :] * D + offs_d[:, None]
        w_mask = h_mask[None, :] & d_mask[:, None]
        h1 = _mm(xt, tl.load(w1_base + w_offs, mask=w_mask, other=0.0),
                 tl.zeros((BM, BH), dtype=tl.float32), DOT)
        if HAS_B1:
            h1 += tl.load(b1_ptr + e * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        hidden = _act(h1, ACT)
        if HAS_W3:
            h3 = _mm(xt, tl.load(w3_base + w_offs, mask=w_mask, other=0.0),
                     tl.zeros((BM, BH), dtype=tl.float32), DOT)
            if HAS_B3:
                h3 += tl.load(b3_ptr + e * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
            hidden = hidden * h3
        w2t = tl.load(w2_base + offs_d[None, :] * H + offs_h[:, None],
                      mask=d_mask[None, :] & h_mask[:, None], other=0.0)
        acc = _mm(hidden.to(x_ptr.dtype.element_ty), w2t, acc, DOT)
    if HAS_B2:
        acc += tl.load(b2_ptr + e * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_WEIGHT:
        acc = acc * gate[:, None]
    tl.atomic_add(y_ptr + tok[:, None] * D + offs_d[None, :], acc, mask=row_mask)


# ------------------------------------------------------------------ router: linear + softmax + select


@triton.jit
def _route_kernel(x_ptr, w_ptr, b_ptr, probs_ptr, idx_ptr, wout_ptr, T, D, E, threshold,
                  HAS_B: tl.constexpr, THRESHOLD: tl.constexpr, RENORM: tl.constexpr,
                  KMAX: tl.constexpr, BLOCK_KS: tl.constexpr,
                  BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    m_mask = offs_m < T
    offs_e = tl.arange(0, BE)
    e_mask = offs_e < E
    logits = tl.zeros((BM, BE), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < D
        a = tl.load(x_ptr + offs_m[:, None] * D + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_ptr + offs_e[None, :] * D + offs_k[:, None],
                    mask=e_mask[None, :] & k_mask[:, None], other=0.0).to(tl.float32)
        logits = tl.dot(a, b, logits, input_precision="ieee")
    if HAS_B:
        logits += tl.load(b_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    z = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = z / tl.sum(z, axis=1)[:, None]
    tl.store(probs_ptr + offs_m[:, None] * E + offs_e[None, :], probs,
             mask=m_mask[:, None] & e_mask[None, :])
    remaining = tl.where(e_mask[None, :], probs, -1.0)
    offs_s = tl.arange(0, BLOCK_KS)
    sel_idx = tl.full((BM, BLOCK_KS), -1, dtype=tl.int64)
    sel_w = tl.zeros((BM, BLOCK_KS), dtype=tl.float32)
    mass = tl.zeros((BM,), dtype=tl.float32)
    for j in range(KMAX):
        best = tl.max(remaining, axis=1)
        arg = tl.argmax(remaining, axis=1)
        if THRESHOLD:
            keep = (mass < threshold) | ((offs_m * 0 + j) == 0)
        else:
            keep = offs_m >= 0
        put = offs_s[None, :] == j
        sel_idx = tl.where(put & keep[:, None], arg.to(tl.int64)[:, None], sel_idx)
        sel_w = tl.where(put & keep[:, None], best[:, None], sel_w)
        mass += tl.where(keep, best, 0.0)
        remaining = tl.where(offs_e[None, :] == arg[:, None], -1.0, remaining)
    if RENORM:
        sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]
    out_mask = m_mask[:, None] & (offs_s[None, :] < KMAX)
    tl.store(idx_ptr + offs_m[:, None] * KMAX + offs_s[None, :], sel_idx, mask=out_mask)
    tl.store(wout_ptr + offs_m[:, None] * KMAX + offs_s[None, :], sel_w, mask=out_mask)


# ------------------------------------------------------------------ launchers


def _check_int32(op: str, **tensors) -> None:
    """Tile offsets are 32-bit (64-bit pointer tensors would double the registers per tile)."""
    for name, t in tensors.items():
        if t is not None and t.numel() >= 2**31:
            raise ValueError(
                f"triton_moe.{op}: {name} has {t.numel()} elements; the kernels index with 32-bit "
                "offsets (< 2**31 elements): split the batch"
            )


def _expert_args(w1, b1, w3, b3):
    dummy = w1
    return (w1.contiguous(), b1.contiguous() if b1 is not None else dummy,
            w3.contiguous() if w3 is not None else dummy, b3.contiguous() if b3 is not None else dummy)


def _block_m_of(sorted_slot: torch.Tensor, block_expert: torch.Tensor) -> int:
    B = block_expert.numel()
    return sorted_slot.numel() // B if B else 16


def gather_gemm1(x, sorted_slot, block_expert, weight, w1, b1=None, w3=None, b3=None,
                 activation: str = "identity", scale_input: bool = False) -> torch.Tensor:
    """``hidden[row] = act(w1[e] x[tok] + b1[e]) (* (w3[e] x[tok] + b3[e]))`` for every row of
    the block layout, gathering ``x[tok]`` (optionally scaled by its routing weight) straight
    from its token position. Returns ``[B·BM, h]`` in ``x``'s dtype; padding rows are left
    unwritten (their content is undefined and never read as a result)."""
    act = _check_activation(activation)
    N, D = x.shape
    K = weight.shape[1]
    E, H, _ = w1.shape
    B = block_expert.numel()
    BM = _block_m_of(sorted_slot, block_expert)
    hidden = torch.empty((B * BM, H), dtype=x.dtype, device=x.device)
    _check_int32("gather_gemm1", x=x, hidden=hidden, w1=w1)
    if B == 0 or H == 0:
        return hidden
    w1c, b1c, w3c, b3c = _expert_args(w1, b1, w3, b3)
    t = _tiles("gather_gemm1", BN=min(128 if w3 is None and BM < 128 else 64, _pow2(H)),
               BK=min(64, _pow2(D)), num_warps=_warps(BM))
    grid = (B, triton.cdiv(H, t["BN"]))
    _gather_gemm1_kernel[grid](
        x.contiguous(), sorted_slot, block_expert, weight.contiguous(), w1c, b1c, w3c, b3c, hidden,
        D, H, K,
        HAS_B1=b1 is not None, HAS_W3=w3 is not None, HAS_B3=b3 is not None,
        SCALE_INPUT=bool(scale_input), ACT=act, DOT=_dot_mode(x.dtype), GATHER=True, BM=BM, **t,
    )
    return hidden


def grouped_gemm(a, block_expert, w, b=None) -> torch.Tensor:
    """``out[row] = w[e] a[row] + b[e]`` for the rows of every used block of the block layout
    (rows already grouped, e.g. the hidden activations); unused blocks are left unwritten.
    ``a [B·BM, k]``, ``w [E, n, k]``; returns ``[B·BM, n]`` in ``a``'s dtype."""
    P, Kd = a.shape
    E, Nn, _ = w.shape
    B = block_expert.numel()
    out = torch.empty((P, Nn), dtype=a.dtype, device=a.device)
    _check_int32("grouped_gemm", a=a, out=out, w=w)
    if B == 0 or Nn == 0:
        return out
    BM = P // B
    t = _tiles("grouped_gemm", BN=min(64 if BM >= 128 else 128, _pow2(Nn)), BK=min(64, _pow2(Kd)),
               num_warps=_warps(BM))
    grid = (B, triton.cdiv(Nn, t["BN"]))
    wc = w.contiguous()
    _gather_gemm1_kernel[grid](
        a.contiguous(), block_expert, block_expert, a, wc, b.contiguous() if b is not None else wc,
        wc, wc, out, Kd, Nn, 1,
        HAS_B1=b is not None, HAS_W3=False, HAS_B3=False, SCALE_INPUT=False, ACT=0,
        DOT=_dot_mode(a.dtype), GATHER=False, BM=BM, **t,
    )
    return out


def gemm2_scatter(hidden, sorted_slot, block_expert, weight, w2, b2=None,
                  apply_weight: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y[tok] += (w2[e] hidden[row] + b2[e]) (· weight[slot])`` over the block layout.

    Accumulates into the fp32 ``out [N, d]`` (a fresh zero buffer when None) and returns it; the
    caller casts once at the end, so several partial sums share one rounding."""
    N, K = weight.shape
    E, D, H = w2.shape
    if out is None:
        out = torch.zeros((N, D), dtype=torch.float32, device=hidden.device)
    _check_int32("gemm2_scatter", hidden=hidden, out=out, w2=w2)
    B = block_expert.numel()
    if B == 0 or D == 0:
        return out
    BM = _block_m_of(sorted_slot, block_expert)
    t = _tiles("gemm2_scatter", BN=min(64 if BM >= 128 else 128, _pow2(D)), BK=min(64, _pow2(H)),
               num_warps=_warps(BM))
    grid = (B, triton.cdiv(D, t["BN"]))
    _gemm2_scatter_kernel[grid](
        hidden, sorted_slot, block_expert, weight.contiguous(), w2.contiguous(),
        b2.contiguous() if b2 is not None else w2, out, H, D, K,
        HAS_B2=b2 is not None, APPLY_WEIGHT=bool(apply_weight), DOT=_dot_mode(hidden.dtype),
        BM=BM, **t,
    )
    return out


def expert_mlp(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, w2, b2,
               activation: str = "identity", scale_input: bool = False, apply_weight: bool = True,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole expert MLP per ``BM``-row tile, the hidden activations kept on chip in
    ``BH``-wide chunks (FlashAttention style). Needs ``d <= EXPERT_MLP_MAX_WIDTH`` so the
    ``[BM, d]`` input and output tiles stay in registers. Returns the fp32 ``[N, d]`` sum."""
    act = _check_activation(activation)
    N, D = x.shape
    K = weight.shape[1]
    E, H, _ = w1.shape
    if D > EXPERT_MLP_MAX_WIDTH:
        raise ValueError(
            f"expert_mlp keeps a [rows, d] tile on chip and supports d <= {EXPERT_MLP_MAX_WIDTH}, "
            f"got d={D}; use gather_gemm1 + gemm2_scatter for wide experts"
        )
    if out is None:
        out = torch.zeros((N, D), dtype=torch.float32, device=x.device)
    _check_int32("expert_mlp", x=x, w1=w1, w2=w2)
    B = block_expert.numel()
    if B == 0 or D == 0:
        return out
    BM = _block_m_of(sorted_slot, block_expert)
    BD = _pow2(D)
    t = _tiles("expert_mlp", BH=32 if BD > 128 or BM >= 128 else 64, num_warps=_warps(BM))
    w1c, b1c, w3c, b3c = _expert_args(w1, b1, w3, b3)
    _expert_mlp_kernel[(B,)](
        x.contiguous(), sorted_slot, block_expert, weight.contiguous(), w1c, b1c, w3c, b3c,
        w2.contiguous(), b2.contiguous() if b2 is not None else w2, out, D, H, K,
        HAS_B1=b1 is not None, HAS_W3=w3 is not None, HAS_B3=b3 is not None,
        HAS_B2=b2 is not None, SCALE_INPUT=bool(scale_input), APPLY_WEIGHT=bool(apply_weight),
        ACT=act, DOT=_dot_mode(x.dtype), BM=BM, BD=BD, **t,
    )
    return out


def moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation: str, gate_input: bool,
            block_m: Optional[int] = None, fuse_mlp: Optional[bool] = None) -> torch.Tensor:
    """``moefx::moe_ffn`` (docs/ARCHITECTURE.md) on the Triton path: counting sort, then either
    the fused expert MLP (narrow experts) or gather+GEMM1 and GEMM2+scatter. Output in ``x``'s
    dtype."""
    N, D = x.shape
    E = w1.shape[0]
    if N == 0:
        return x.new_zeros((0, D))
    if block_m is None:
        block_m = choose_block_m(idx.numel(), E)
    if fuse_mlp is None:
        fuse_mlp = D <= EXPERT_MLP_MAX_WIDTH
    sorted_slot, block_expert = align_blocks(idx, E, block_m)
    if fuse_mlp:
        y = expert_mlp(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, w2, b2,
                       activation, scale_input=gate_input, apply_weight=not gate_input)
    else:
        hidden = gather_gemm1(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, activation,
                              scale_input=gate_input)
        y = gemm2_scatter(hidden, sorted_slot, block_expert, weight, w2, b2,
                          apply_weight=not gate_input)
    return y.to(x.dtype)


def route(x, weight, bias, threshold: float, top_k: int, max_experts: int, renormalize: bool):
    """Router linear (fp32) + softmax + selection in one kernel: returns ``(idx [T, K] int64,
    weight [T, K] fp32, probs [T, E] fp32)`` with the conventions of ``moefx::xmoe_select``
    (descending probability, unused slots ``-1``/``0``). ``top_k > 0`` picks a fixed top-k,
    ``top_k == 0`` the threshold prefix (SPEC §1), capped at ``max_experts`` when positive.
    ``renormalize`` rescales the kept weights to sum to one (SliceMoE). Needs ``E <= 256``."""
    T, D = x.shape
    E = weight.shape[0]
    if E > 256:
        raise ValueError(f"the Triton router keeps all E logits of a row in one tile; E={E} > 256")
    K = top_k if top_k > 0 else (max_experts if max_experts > 0 else E)
    idx = torch.empty((T, K), dtype=torch.int64, device=x.device)
    w_out = torch.empty((T, K), dtype=torch.float32, device=x.device)
    probs = torch.empty((T, E), dtype=torch.float32, device=x.device)
    if T == 0:
        return idx, w_out, probs
    BM = 16
    BE = _pow2(E)
    BK = min(64, _pow2(D))
    _route_kernel[(triton.cdiv(T, BM),)](
        x.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else weight,
        probs, idx, w_out, T, D, E, float(threshold),
        HAS_B=bias is not None, THRESHOLD=top_k == 0, RENORM=bool(renormalize),
        KMAX=K, BLOCK_KS=_pow2(K, 1), BM=BM, BE=BE, BK=BK,
    )
    return idx, w_out, probs
