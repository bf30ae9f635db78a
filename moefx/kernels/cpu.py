"""The fast PyTorch path of the moefx ops (CPU, and any device without a dedicated kernel).

Expert dispatch is sort-based: the (row, slot) pairs are ordered by expert once (a stable sort
of the flattened expert ids); then, expert by expert and in cache-sized chunks, its rows are
gathered into a reused contiguous buffer, multiplied by both GEMMs with the activation applied in
place, and added back into the output with ``index_add_``. Work is proportional to the experts
actually chosen; nothing loops over tokens in Python, only over the (few) experts. Routing
weights are folded into the gathered rows (input gating) or into the expert outputs in place
(output gating), and the all-ones weights of XMoE's ``combine="unit"`` skip that multiply.
Decode-sized calls take one of two small-shape paths instead (see :func:`moe_ffn`).

The backward (:func:`moe_ffn_backward`) uses the same grouping and recomputes each expert's
hidden activations instead of saving them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moefx.layers.activations import activation_, activation_backward, activation_fn


# ---------------------------------------------------------------- routing ops


def xmoe_select(probs: torch.Tensor, threshold: float, top_k: int, max_experts: int):
    """Sorted top-k, or SPEC §1's threshold prefix, in a handful of tensor ops."""
    T, E = probs.shape
    K = top_k if top_k > 0 else (max_experts if max_experts > 0 else E)
    if K < E:
        values, order = torch.topk(probs, K, dim=-1, largest=True, sorted=True)
    else:
        values, order = torch.sort(probs, dim=-1, descending=True)
    if top_k > 0:
        return order, values.clone()
    # exclusive prefix mass, accumulated in float64 in rank order like the reference, so that
    # a float32 model keeps the same experts as the float64 check of SPEC §3
    mass = torch.cumsum(values.to(torch.float64), dim=-1)
    before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    keep = before < threshold
    keep[:, 0] = True
    idx = torch.where(keep, order, torch.full_like(order, -1))
    weight = torch.where(keep, values, torch.zeros_like(values))
    return idx, weight


def capacity_drop(idx: torch.Tensor, weight: torch.Tensor, num_experts: int, capacity: int):
    """SPEC §1 capacity: queue every (token, slot) pair rank-major, higher probability first
    inside a rank (ties: lower token first), and drop each pair beyond an expert's capacity."""
    T, K = idx.shape
    if T == 0 or K == 0:
        return idx.clone(), torch.where(idx >= 0, weight, torch.zeros_like(weight))
    by_prob = torch.argsort(-weight.t().to(torch.float64), dim=1, stable=True)  # [K, T]
    queue = (by_prob + torch.arange(K, device=idx.device).unsqueeze(1) * T).reshape(-1)  # rank-major flat ids
    experts = idx.t().reshape(-1)[queue]
    keyed = torch.where(experts >= 0, experts, torch.full_like(experts, num_experts))
    grouped = torch.argsort(keyed, stable=True)
    counts = torch.bincount(keyed, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(grouped)
    position[grouped] = torch.arange(grouped.numel(), device=idx.device) - starts[keyed[grouped]]
    dropped_queue = (position >= capacity) & (experts >= 0)
    dropped = torch.zeros(K * T, dtype=torch.bool, device=idx.device)
    dropped[queue] = dropped_queue
    dropped = dropped.reshape(K, T).t().contiguous()
    idx = torch.where(dropped, torch.full_like(idx, -1), idx)
    weight = torch.where(idx >= 0, weight, torch.zeros_like(weight))
    return idx, weight


# ---------------------------------------------------------------- grouping


ALL_EXPERTS_MAX_ROWS = 256
"""Below this many (row, expert) combinations, running every expert on every row with two
batched matmuls beats grouping: the cost is reading each expert's weights once, as the dense FFN
does, and a few calls instead of a few per expert."""


CHUNK_ROWS = 1024
"""An expert's rows are processed in chunks of at most this many, so that its hidden activations
stay in cache between the first GEMM, the activation and the second GEMM (measured ~6% on
SliceMoE at T=2048, whose experts are 768 wide)."""


class Groups(NamedTuple):
    """(row, slot) pairs of valid routing slots, ordered by expert."""

    pairs: torch.Tensor  # flat ids n*K + j of the valid pairs, grouped by expert
    rows: torch.Tensor  # n of each pair
    counts: list  # pairs per expert (host ints)


def group_by_expert(idx: torch.Tensor, num_experts: int) -> Groups:
    flat = idx.reshape(-1)
    K = idx.shape[1] if idx.dim() == 2 else 1
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()
    pairs = order[counts[0]:]
    rows = torch.div(pairs, K, rounding_mode="floor") if K != 1 else pairs
    return Groups(pairs, rows, counts[1:num_experts + 1])


def _is_unit(idx: torch.Tensor, weight: torch.Tensor) -> bool:
    return bool(torch.equal(weight, (idx >= 0).to(weight.dtype)))


def _linear_out(x, w, b, out):
    """``out = x @ w.T + b`` without allocating."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def _gemv_out(w, v, b, out):
    """``out = w @ v + b``: a matrix-vector product (faster than a one-row matmul here)."""
    if b is None:
        return torch.mv(w, v, out=out)
    return torch.addmv(b, w, v, out=out)


def moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation: str, gate_input: bool):
    """``moefx::moe_ffn`` forward (docs/ARCHITECTURE.md).

    Three regimes, picked from shapes alone: at most E (row, slot) pairs (decode): a GEMV chain
    per pair, no sort; few rows (``N·E <= ALL_EXPERTS_MAX_ROWS``): every expert on every row in
    batched matmuls; otherwise sort-grouped, one expert at a time: gather its rows into a reused
    buffer, both GEMMs and the activation in place, scale by the routing weight if any (never
    for all-ones weights), ``index_add_`` into the output.
    Gathering per expert (rather than all rows at once) keeps the working set of one expert in
    cache and avoids allocating (and page-faulting) ``N·K·d``-sized buffers on every call.
    """
    N, d = x.shape
    E, h, _ = w1.shape
    y = torch.zeros_like(x)
    if N == 0 or idx.numel() == 0:
        return y
    unit = _is_unit(idx, weight)
    if idx.numel() <= E:
        return _moe_ffn_pairs(y, x, idx, None if unit else weight, w1, b1, w3, b3, w2, b2, activation, gate_input)
    if N * E <= ALL_EXPERTS_MAX_ROWS:
        return _moe_ffn_all_experts(x, idx, None if unit else weight, w1, b1, w3, b3, w2, b2, activation, gate_input)
    groups = group_by_expert(idx, E)
    M = groups.pairs.numel()
    if M == 0:
        return y
    wg = None if unit else weight.reshape(-1).index_select(0, groups.pairs).to(x.dtype).unsqueeze(1)
    cmax = min(max(groups.counts), CHUNK_ROWS)
    xbuf = torch.empty((cmax, d), dtype=x.dtype, device=x.device)
    ybuf = torch.empty((cmax, d), dtype=x.dtype, device=x.device)
    hbuf = torch.empty((cmax, h), dtype=x.dtype, device=x.device)
    ubuf = torch.empty((cmax, h), dtype=x.dtype, device=x.device) if w3 is not None else None
    end = 0
    for e, count in enumerate(groups.counts):
        first, end = end, end + count
        for start in range(first, end, CHUNK_ROWS):
            c = min(CHUNK_ROWS, end - start)
            rows = groups.rows[start:start + c]
            xe = torch.index_select(x, 0, rows, out=xbuf[:c])
            if wg is not None and gate_input:
                xe.mul_(wg[start:start + c])
            hid = _linear_out(xe, w1[e], None if b1 is None else b1[e], hbuf[:c])
            activation_(activation, hid)
            if w3 is not None:
                hid.mul_(_linear_out(xe, w3[e], None if b3 is None else b3[e], ubuf[:c]))
            ye = _linear_out(hid, w2[e], None if b2 is None else b2[e], ybuf[:c])
            if wg is not None and not gate_input:
                ye.mul_(wg[start:start + c])
            y.index_add_(0, rows, ye)
    return y


def _moe_ffn_pairs(y, x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
    """The decode path for a handful of pairs: one matrix-vector product per pair and layer, written
    into shared buffers so that the gather, gating, activation and combine are one call each
    (an elementwise call costs a thread wake-up, tens of microseconds, whatever its size). The
    combine is a tiny ``[N, M] @ [M, d]`` matmul whose matrix holds the routing weights."""
    ids = idx.tolist()
    # expert-major order: a second row of the same expert finds its weights in cache
    pairs = sorted((e, n, j) for n, row in enumerate(ids) for j, e in enumerate(row) if e >= 0)
    pairs = [(n, j, e) for e, n, j in pairs]
    M = len(pairs)
    if M == 0:
        return y
    h, d = w1.shape[1], x.shape[1]
    rows = torch.tensor([n for n, _, _ in pairs], device=x.device)
    u = x.index_select(0, rows)
    combine = torch.zeros((x.shape[0], M), dtype=x.dtype, device=x.device)
    if weight is not None:
        w = weight[rows, torch.tensor([j for _, j, _ in pairs], device=x.device)].to(x.dtype)
        if gate_input:
            u.mul_(w.unsqueeze(1))
            w = torch.ones_like(w)
    else:
        w = torch.ones((M,), dtype=x.dtype, device=x.device)
    combine[rows, torch.arange(M, device=x.device)] = w
    hid = torch.empty((M, h), dtype=x.dtype, device=x.device)
    up = torch.empty((M, h), dtype=x.dtype, device=x.device) if w3 is not None else None
    out = torch.empty((M, d), dtype=x.dtype, device=x.device)
    for p, (_, _, e) in enumerate(pairs):
        _gemv_out(w1[e], u[p], None if b1 is None else b1[e], hid[p])
        if w3 is not None:
            _gemv_out(w3[e], u[p], None if b3 is None else b3[e], up[p])
    activation_(activation, hid)
    if w3 is not None:
        hid.mul_(up)
    for p, (_, _, e) in enumerate(pairs):
        _gemv_out(w2[e], hid[p], None if b2 is None else b2[e], out[p])
    return torch.mm(combine, out)


def _moe_ffn_all_experts(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
    """Few rows, many experts touched (decode with large K, SliceMoE at T=1, XMoE at T=16):
    every expert runs on every row as ``[E, N, ·]`` batched matmuls, the outputs of unchosen
    (expert, row) combinations are zeroed (``masked_fill``, so that an unchosen expert that
    overflowed in low precision cannot leak a NaN), and the rest are scaled and summed over
    experts. ``weight=None`` means all-ones weights (no multiply)."""
    N, d = x.shape
    E = w1.shape[0]
    valid = idx >= 0
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    hits = torch.zeros((N, E), dtype=x.dtype, device=x.device).scatter_add_(1, safe, valid.to(x.dtype))
    scale = None
    if weight is not None:
        w = torch.where(valid, weight.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
        scale = torch.zeros((N, E), dtype=x.dtype, device=x.device).scatter_add_(1, safe, w).t().unsqueeze(-1)
    if gate_input and scale is not None:
        xe = scale * x.unsqueeze(0)
        scale = None
    else:
        xe = x.unsqueeze(0).expand(E, N, d)
    hid = torch.bmm(xe, w1.transpose(1, 2)) if b1 is None else torch.baddbmm(b1.unsqueeze(1), xe, w1.transpose(1, 2))
    activation_(activation, hid)
    if w3 is not None:
        hid.mul_(torch.bmm(xe, w3.transpose(1, 2)) if b3 is None else torch.baddbmm(b3.unsqueeze(1), xe, w3.transpose(1, 2)))
    out = torch.bmm(hid, w2.transpose(1, 2)) if b2 is None else torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2))
    out.masked_fill_((hits == 0).t().unsqueeze(-1), 0)
    if scale is not None:
        out.mul_(scale)
    return out.sum(0)


def moe_ffn_backward(grad, x, idx, weight, w1, b1, w3, b3, w2, b2, activation: str, gate_input: bool):
    """Gradients of ``moe_ffn`` w.r.t. (x, weight, w1, b1, w3, b3, w2, b2), with the same
    grouping as the forward. Expert activations are recomputed per segment rather than saved,
    which keeps the forward op's memory at one output buffer."""
    N, d = x.shape
    E, h, _ = w1.shape
    K = idx.shape[1]
    gx = torch.zeros_like(x)
    gweight = torch.zeros((N * K,), dtype=x.dtype, device=x.device)
    gw1 = torch.zeros_like(w1)
    gb1 = torch.zeros_like(b1) if b1 is not None else None
    gw3 = torch.zeros_like(w3) if w3 is not None else None
    gb3 = torch.zeros_like(b3) if b3 is not None else None
    gw2 = torch.zeros_like(w2)
    gb2 = torch.zeros_like(b2) if b2 is not None else None

    def done():
        return (gx, gweight.reshape(N, K).to(weight.dtype), gw1, gb1, gw3, gb3, gw2, gb2)

    if N == 0 or idx.numel() == 0:
        return done()
    groups = group_by_expert(idx, E)
    M = groups.pairs.numel()
    if M == 0:
        return done()
    act = activation_fn(activation)
    xr = x.index_select(0, groups.rows)
    wg = weight.reshape(-1).index_select(0, groups.pairs).to(x.dtype).unsqueeze(1)
    u = xr * wg if gate_input else xr
    gg = grad.index_select(0, groups.rows)
    go = gg if gate_input else gg * wg
    gu = torch.empty((M, d), dtype=x.dtype, device=x.device)
    gw_pair = torch.empty((M,), dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(groups.counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        us = u[sl]
        z1 = us @ w1[e].t()
        if b1 is not None:
            z1 = z1 + b1[e]
        a = act(z1)
        if w3 is not None:
            z3 = us @ w3[e].t()
            if b3 is not None:
                z3 = z3 + b3[e]
            hid = a * z3
        else:
            hid = a
        gos = go[sl]
        if not gate_input:
            out = hid @ w2[e].t()
            if b2 is not None:
                out = out + b2[e]
            gw_pair[sl] = (gg[sl] * out).sum(1)
        gw2[e] = gos.t() @ hid
        if gb2 is not None:
            gb2[e] = gos.sum(0)
        ghid = gos @ w2[e]
        if w3 is not None:
            gz3 = ghid * a
            ga = ghid * z3
            gw3[e] = gz3.t() @ us
            if gb3 is not None:
                gb3[e] = gz3.sum(0)
        else:
            ga = ghid
        gz1 = activation_backward(activation, ga, z1)
        gw1[e] = gz1.t() @ us
        if gb1 is not None:
            gb1[e] = gz1.sum(0)
        gus = gz1 @ w1[e]
        if w3 is not None:
            gus = gus + gz3 @ w3[e]
        gu[sl] = gus
        start += c
    if gate_input:
        gw_pair = (gu * xr).sum(1)
        gu.mul_(wg)
    gx.index_add_(0, groups.rows, gu)
    gweight[groups.pairs] = gw_pair
    return done()
