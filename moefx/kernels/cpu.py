"""The fast PyTorch path of the moefx ops (CPU, and any device without a dedicated kernel).

Expert dispatch is sort-based: the (row, slot) pairs are ordered by expert once (a stable sort
of the flattened expert ids); then, expert by expert and in cache-sized chunks, its rows are
gathered into a reused contiguous buffer, multiplied by both GEMMs with the activation applied in
place, and added back into the output. Work is proportional to the experts actually chosen;
nothing loops over tokens in Python, only over the (few) experts. Routing weights are folded into
the gathered rows (input gating) or into the expert outputs (output gating), and the all-ones
weights of XMoE's ``combine="unit"`` skip that multiply. Wide rows (XMoE tokens) use MKL GEMMs
into reused buffers and an ``index_add_`` per chunk; narrow rows (SliceMoE slices) use oneDNN
GEMMs and one combine at the end (:func:`_grouped_narrow`). Decode-sized calls take one of two
small-shape paths instead (see :func:`moe_ffn`).

Everything here is measured on the project's 2-core AVX2 CPU (bench/layers.py): small calls
cost microseconds whatever their size (and a parallel one wakes the thread pool), so the
decode paths count calls; big transient buffers churn glibc's heap, so the large-T paths keep
them small and reused within a call.

The backward (:func:`moe_ffn_backward`) uses the same grouping and recomputes each expert's
hidden activations instead of saving them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moefx.kernels import native
from moefx.layers.activations import activation_ as _activation_
from moefx.layers.activations import activation_backward, activation_fn


def activation_(name: str, z: torch.Tensor) -> torch.Tensor:
    """The activation in place: the native GELU kernel where it applies
    (:mod:`moefx.kernels.native`: SliceMoE's experts spend a sixth of their time in GELU),
    :func:`moefx.layers.activations.activation_` otherwise."""
    if name == "gelu" and native.gelu_(z):
        return z
    return _activation_(name, z)


# ---------------------------------------------------------------- routing ops


def xmoe_select(probs: torch.Tensor, threshold: float, top_k: int, max_experts: int):
    """Sorted top-k, or SPEC §1's threshold prefix, in a handful of tensor ops."""
    T, E = probs.shape
    K = top_k if top_k > 0 else (max_experts if max_experts > 0 else E)
    if top_k > 0 and K <= 2 and K < E and T >= TOP2_MIN_ROWS:
        values, order = _top2(probs, K)
        return order, values
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


TOP2_MIN_ROWS = 1024
"""Fewer rows than this take ``topk`` (one call beats two ``max`` passes there)."""


def _top2(probs: torch.Tensor, K: int):
    """Top-1 or top-2 by one or two ``max`` passes: half the time of ``topk`` on SliceMoE's
    ``[T·S, E]`` router output (1.7 vs 3.4 ms at T=2048). ``max`` returns the first of equal values, so ties keep the
    lower expert first, as in the reference."""
    v1, i1 = probs.max(dim=-1, keepdim=True)
    if K == 1:
        return v1, i1
    rest = probs.scatter(1, i1, float("-inf"))
    v2, i2 = rest.max(dim=-1, keepdim=True)
    return torch.cat([v1, v2], dim=1), torch.cat([i1, i2], dim=1)


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


NARROW_ROWS = 128
"""Rows at most this wide (SliceMoE's slices) take :func:`_grouped_narrow`: oneDNN GEMMs and one
combine at the end. Wider rows (XMoE's tokens) keep the MKL path with an ``index_add_`` per
chunk, measured as fast or faster for their shapes."""


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


ONEDNN_MIN_ROWS = 128
"""From this many rows on, float32 GEMMs go to oneDNN (``mkldnn::_linear_pointwise``, the
kernel inductor uses for linear layers on CPU) instead of ``addmm``'s MKL: on this project's
AVX2 CPU (AMD EPYC) it runs SliceMoE's narrow expert GEMMs ([rows, 72] x [72, 768] and
[rows, 768] x [768, 72]) 10-15% faster, with the bias (and the router's ReLU) fused. Below it,
oneDNN's ~40 us of per-call setup loses to MKL (measured crossover 64-256 rows)."""


def _find_onednn_linear():
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN_LINEAR = _find_onednn_linear()


def _onednn_ok(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and a.shape[0] >= ONEDNN_MIN_ROWS
        and a.dtype == torch.float32 and w.dtype == torch.float32 and (b is None or b.dtype == torch.float32)
        and a.device.type == "cpu"
        and a.is_contiguous() and w.is_contiguous() and (b is None or b.is_contiguous())
        and torch._C._get_mkldnn_enabled()
    )


def linear(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
           relu: bool = False, onednn: Optional[bool] = None) -> torch.Tensor:
    """``a @ w.T + b`` (then ReLU in place with ``relu``), written into ``out`` when given.
    ``onednn``: True/False forces the kernel (True only where :func:`_onednn_ok` holds);
    None picks oneDNN for large float32 calls (see :data:`ONEDNN_MIN_ROWS`; it allocates its
    result, so ``out`` costs a copy there), MKL's ``addmm`` otherwise."""
    if onednn if onednn is not None else _onednn_ok(a, w, b):
        y = _ONEDNN_LINEAR(a, w, b, "relu" if relu else "none", [], "")
        return out.copy_(y) if out is not None else y
    if out is not None:
        y = _linear_out(a, w, b, out)
    else:
        y = torch.mm(a, w.t()) if b is None else torch.addmm(b, a, w.t())
    return y.relu_() if relu else y


ROUTER_CHUNK_ROWS = 2048
"""The router MLP runs over at most this many rows at a time, so that its hidden activations
(``rows x H_r``, 2 MiB at H_r = 256) are a small, reused allocation: at T=2048 SliceMoE has
16384 slices, and a 16 MiB buffer per call made glibc hand memory back and forth to the kernel
(thousands of page faults, ~10 ms of system time per call, depending on the heap's history)."""


def router_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits ``relu(x W1^T + b1) W2^T + b2`` of SliceMoE's router, in row chunks of
    :data:`ROUTER_CHUNK_ROWS` (each through :func:`linear`, the ReLU fused)."""
    n = x.shape[0]
    if n <= ROUTER_CHUNK_ROWS:
        return linear(linear(x, w1, b1, relu=True), w2, b2)
    logits = torch.empty((n, w2.shape[0]), dtype=x.dtype, device=x.device)
    for s in range(0, n, ROUTER_CHUNK_ROWS):
        linear(linear(x[s:s + ROUTER_CHUNK_ROWS], w1, b1, relu=True), w2, b2, out=logits[s:s + ROUTER_CHUNK_ROWS])
    return logits


def _gemv_out(w, v, b, out):
    """``out = w @ v + b``: a matrix-vector product (faster than a one-row matmul here)."""
    if b is None:
        return torch.mv(w, v, out=out)
    return torch.addmv(b, w, v, out=out)


def moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation: str, gate_input: bool, expert_views=None):
    """``moefx::moe_ffn`` forward (docs/ARCHITECTURE.md).

    Three regimes, picked from shapes alone: at most E (row, slot) pairs (decode): a GEMV chain
    per pair, no sort; few rows (``N·E <= ALL_EXPERTS_MAX_ROWS``): every expert on every row in
    batched matmuls; otherwise sort-grouped, one expert at a time: gather its rows into a reused
    buffer, both GEMMs and the activation in place, scale by the routing weight if any (never
    for all-ones weights), ``index_add_`` into the output.
    Gathering per expert (rather than all rows at once) keeps the working set of one expert in
    cache and avoids allocating (and page-faulting) ``N·K·d``-sized buffers on every call.
    ``expert_views``: optional ``(w1, b1, w3, b3, w2, b2)`` already split per expert (each a
    sequence indexed by expert, or None), which the decode path then need not build (a view
    costs a microsecond or two, and a decode step wants dozens).
    """
    N, d = x.shape
    E, h, _ = w1.shape
    if N == 0 or idx.numel() == 0:
        return torch.zeros_like(x)
    if idx.numel() <= E:
        return _moe_ffn_pairs(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input, expert_views)
    unit = _is_unit(idx, weight)
    if N * E <= ALL_EXPERTS_MAX_ROWS:
        return _moe_ffn_all_experts(x, idx, None if unit else weight, w1, b1, w3, b3, w2, b2, activation, gate_input)
    groups = group_by_expert(idx, E)
    M = groups.pairs.numel()
    if M == 0:
        return torch.zeros_like(x)
    wg = None if unit else weight.reshape(-1).index_select(0, groups.pairs).to(x.dtype).unsqueeze(1)
    if d <= NARROW_ROWS:
        # the native fused MLP (transposed tiles: rows as lanes) wins big on narrow rows with wide
        # experts (SliceMoE: 50 vs 73 ms at T=2048); on XMoE's wide rows and narrow experts its
        # row transposes cost what the fusion saves (top-4 3% faster, top-8 5% slower): MKL path
        out = native.expert_mlp(x, groups.rows, groups.counts, None if wg is None else wg.reshape(-1), gate_input,
                                w1, b1, w3, b3, w2, b2, activation)
        if out is not None:
            return _combine_slots(out, groups.pairs, N, idx.shape[1])
        return _grouped_narrow(x, groups, wg, idx.shape[1], w1, b1, w3, b3, w2, b2, activation, gate_input)
    cmax = min(max(groups.counts), CHUNK_ROWS)
    xbuf = torch.empty((cmax, d), dtype=x.dtype, device=x.device)
    hbuf = torch.empty((cmax, h), dtype=x.dtype, device=x.device)
    ubuf = torch.empty((cmax, h), dtype=x.dtype, device=x.device) if w3 is not None else None
    ybuf = torch.empty((cmax, d), dtype=x.dtype, device=x.device)
    y = torch.zeros_like(x)
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


def _grouped_narrow(x, groups, wg, K, w1, b1, w3, b3, w2, b2, activation, gate_input):
    """The grouped path for narrow rows (SliceMoE's slices, ``d <= NARROW_ROWS``): per expert
    chunk, gather (and gate) its rows into a reused buffer, GEMM, activation, GEMM (oneDNN where
    :func:`_onednn_ok` allows: 10-15% faster than MKL on these [rows, 72] x [72, h] and
    [rows, h] x [h, 72] shapes), and copy the result into one buffer of pair outputs in grouped
    order, combined once at the end by :func:`_combine_slots` (an ``index_add_`` per chunk
    costs per row). Buffers stay small and are reused within the call: gathering all rows up
    front or keeping every chunk's output alive doubled the peak memory, and made glibc return
    memory to the kernel and fault it back in on every call (measured thousands of page faults
    per call)."""
    N, d = x.shape
    M = groups.pairs.numel()
    cmax = min(max(groups.counts), CHUNK_ROWS)
    xbuf = torch.empty((cmax, d), dtype=x.dtype, device=x.device)
    onednn = _onednn_ok(xbuf, w1[0], None if b1 is None else b1[0])
    out = torch.empty((M + 1, d), dtype=x.dtype, device=x.device)
    end = 0
    for e, count in enumerate(groups.counts):
        first, end = end, end + count
        for start in range(first, end, CHUNK_ROWS):
            c = min(CHUNK_ROWS, end - start)
            ue = torch.index_select(x, 0, groups.rows[start:start + c], out=xbuf[:c])
            if wg is not None and gate_input:
                ue.mul_(wg[start:start + c])
            dnn = onednn and c >= ONEDNN_MIN_ROWS
            hid = linear(ue, w1[e], None if b1 is None else b1[e], onednn=dnn)
            activation_(activation, hid)
            if w3 is not None:
                hid.mul_(linear(ue, w3[e], None if b3 is None else b3[e], onednn=dnn))
            linear(hid, w2[e], None if b2 is None else b2[e], out=out[start:start + c], onednn=dnn)
    if wg is not None and not gate_input:
        out[:M].mul_(wg)
    out[M].zero_()
    return _combine_slots(out, groups.pairs, N, K)


def _combine_slots(out, pairs, N: int, K: int):
    """``y[n] = Σ_j out[pos(n, j)]`` where ``out`` holds the pair outputs in grouped order
    (``pairs`` the flat slot ids ``n·K + j``) plus a trailing zero row for unused slots: K row
    gathers and adds, cheaper than zero-filling ``y`` and an ``index_add_`` of every pair."""
    M = pairs.numel()
    pos = torch.full((N * K,), M, dtype=torch.long, device=out.device)
    pos[pairs] = torch.arange(M, device=out.device)
    pos = pos.view(N, K).t().contiguous()
    y = out.index_select(0, pos[0])
    for j in range(1, K):
        y.add_(out.index_select(0, pos[j]))
    return y


def _moe_ffn_pairs(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input, expert_views=None):
    """The decode path for a handful of pairs: one matrix-vector product per pair and layer
    (MKL's GEMV beats a one- or two-row GEMM here, and reads the weights once per pair as the
    dense FFN reads its own). Everything else is a few calls in all, since a call costs
    microseconds whatever its size: the routing weight rides in the GEMVs' scalars
    (``addmv(b, W, v, alpha=p)`` is ``W (p v) + b`` for input gating; ``beta=alpha=p`` gives
    ``p (W v + b)`` for output gating), every pair writes its output row into slot ``n·K + j``
    of one zeroed buffer, and a sum over the K slots combines them. Slots run expert-major so
    that a second pair of the same expert finds its weights in cache."""
    N, K = idx.shape
    h, d = w1.shape[1], x.shape[1]
    ids = idx.tolist()
    gates = weight.tolist()
    pairs = sorted((e, n, j) for n, row in enumerate(ids) for j, e in enumerate(row) if e >= 0)
    out = torch.zeros((N * K, d), dtype=x.dtype, device=x.device)
    if not pairs:
        return out.view(N, K, d).sum(1)
    if expert_views is None:
        expert_views = (w1, b1, w3, b3, w2, b2)
    w1v, b1v, w3v, b3v, w2v, b2v = expert_views
    glu = w3 is not None
    M = len(pairs)
    hid = torch.empty((M, h), dtype=x.dtype, device=x.device)
    up = torch.empty((M, h), dtype=x.dtype, device=x.device) if glu else None
    xs, hs, os_ = x.unbind(0), hid.unbind(0), out.unbind(0)
    us = up.unbind(0) if glu else None
    zero_h = torch.zeros((h,), dtype=x.dtype, device=x.device) if b1 is None or (glu and b3 is None) else None
    zero_d = torch.zeros((d,), dtype=x.dtype, device=x.device) if b2 is None else None
    last = None
    for p, (e, n, j) in enumerate(pairs):
        if e != last:
            last = e
            w1e, b1e = w1v[e], zero_h if b1 is None else b1v[e]
            if glu:
                w3e, b3e = w3v[e], zero_h if b3 is None else b3v[e]
        a_in = gates[n][j] if gate_input else 1.0
        torch.addmv(b1e, w1e, xs[n], alpha=a_in, out=hs[p])
        if glu:
            torch.addmv(b3e, w3e, xs[n], alpha=a_in, out=us[p])
    activation_(activation, hid)
    if glu:
        hid.mul_(up)
    last = None
    for p, (e, n, j) in enumerate(pairs):
        if e != last:
            last = e
            w2e, b2e = w2v[e], zero_d if b2 is None else b2v[e]
        g = 1.0 if gate_input else gates[n][j]
        torch.addmv(b2e, w2e, hs[p], beta=g, alpha=g, out=os_[n * K + j])
    return out.view(N, K, d).sum(1) if K > 1 else out


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
