"""The loop references against hand-worked cases of SPEC.md §1-§3, so that testing a fast path
against them means testing it against the contract."""
import math

import torch
import torch.nn.functional as F

from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.kernels import reference as R
from moefx.layers import SliceMoE, XMoE

P = torch.tensor([[0.05, 0.50, 0.30, 0.15], [0.70, 0.10, 0.12, 0.08]], dtype=torch.float64)


def test_threshold_keeps_smallest_prefix_reaching_t():
    idx, w = R.xmoe_select_reference(P, 0.75, 0, 0)
    assert idx.tolist() == [[1, 2, -1, -1], [0, 2, -1, -1]]
    assert torch.equal(w, torch.tensor([[0.5, 0.3, 0, 0], [0.7, 0.12, 0, 0]], dtype=torch.float64))


def test_threshold_edge_values():
    idx0, _ = R.xmoe_select_reference(P, 0.0, 0, 0)
    assert idx0[:, 0].tolist() == [1, 0] and (idx0[:, 1:] == -1).all()
    idx1, _ = R.xmoe_select_reference(P, 1.0, 0, 0)
    assert (idx1 >= 0).all()
    idx_cap, _ = R.xmoe_select_reference(P, 1.0, 0, 2)
    assert idx_cap.tolist() == [[1, 2], [0, 2]]


def test_top_k_keeps_k_in_descending_order_with_raw_probabilities():
    idx, w = R.xmoe_select_reference(P, 0.0, 3, 0)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 1]]
    assert torch.allclose(w.sum(1), torch.tensor([0.95, 0.92], dtype=torch.float64))


def test_capacity_is_rank_major_then_by_probability():
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    w = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.9, 0.05], [0.4, 0.35]], dtype=torch.float64)
    out_idx, out_w = R.capacity_drop_reference(idx, w, 2, 2)
    # rank 0: expert 0 gets tokens 2 (0.9) and 0 (0.5), token 3 (0.4) is dropped; expert 1 gets token 1.
    # rank 1: expert 1 has one slot left: token 3 (0.35) beats 0 (0.3) and 2 (0.05); expert 0 is full.
    assert out_idx.tolist() == [[0, -1], [1, -1], [0, -1], [-1, 1]]
    assert out_w[3, 1] == 0.35 and out_w[3, 0] == 0 and out_w[1, 1] == 0


def test_moe_ffn_reference_formula_by_hand():
    torch.manual_seed(0)
    E, h, d = 3, 4, 5
    w1, b1, w3, b3 = torch.randn(E, h, d), torch.randn(E, h), torch.randn(E, h, d), torch.randn(E, h)
    w2, b2 = torch.randn(E, d, h), torch.randn(E, d)
    x = torch.randn(1, d)
    idx = torch.tensor([[2, -1, 0]])
    weight = torch.tensor([[0.6, 0.0, 0.3]])

    def ffn(e, v):
        return w2[e] @ (F.silu(w1[e] @ v + b1[e]) * (w3[e] @ v + b3[e])) + b2[e]

    out = R.moe_ffn_reference(x, idx, weight, w1, b1, w3, b3, w2, b2, "silu", False)
    assert torch.allclose(out[0], 0.6 * ffn(2, x[0]) + 0.3 * ffn(0, x[0]), atol=1e-5)
    out = R.moe_ffn_reference(x, idx, weight, w1, b1, w3, b3, w2, b2, "silu", True)
    assert torch.allclose(out[0], ffn(2, 0.6 * x[0]) + ffn(0, 0.3 * x[0]), atol=1e-5)


def test_unit_combine_with_every_expert_kept_is_the_dense_ffn():
    """SPEC §3: the first test of every conversion path, on the reference itself."""
    torch.manual_seed(1)
    d, d_ff, E = 12, 40, 6  # h = ceil(40/6) = 7: the last group is padded with zero neurons
    W1, B1, W2, B2 = torch.randn(d_ff, d), torch.randn(d_ff), torch.randn(d, d_ff), torch.randn(d)
    layer = XMoE(XMoEConfig(num_experts=E, threshold=1.0), d, d_ff, converted=True)
    h = layer.expert_hidden
    with torch.no_grad():
        for p in (layer.w1, layer.b1, layer.w2):
            p.zero_()
        for e in range(E):
            rows = slice(e * h, min((e + 1) * h, d_ff))
            n = rows.stop - rows.start
            layer.w1[e, :n] = W1[rows]
            layer.b1[e, :n] = B1[rows]
            layer.w2[e, :, :n] = W2[:, rows]
        layer.bias.copy_(B2)
    x = torch.randn(3, 4, d)
    dense = F.linear(F.gelu(F.linear(x, W1, B1)), W2, B2)
    assert torch.allclose(R.xmoe_reference(layer, x), dense, rtol=1e-5, atol=1e-5)


def test_slicemoe_reference_routes_each_slice_alone():
    """Changing one slice of a token changes only that slice of the output."""
    torch.manual_seed(2)
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=5, top_k=2, router_hidden=8), 16, 24).double()
    x = torch.randn(2, 16, dtype=torch.float64)
    y = R.slicemoe_reference(layer, x)
    x2 = x.clone()
    x2[0, 4:8] += 1.0
    y2 = R.slicemoe_reference(layer, x2)
    changed = (y2 - y).abs().reshape(2, 4, 4).amax(-1) > 0
    assert changed.tolist() == [[False, True, False, False], [False, False, False, False]]


def test_router_dtype_rule():
    assert R.router_dtype(torch.bfloat16) == torch.float32
    assert R.router_dtype(torch.float64) == torch.float64
    assert R.xmoe_capacity(100, 16, 1.0) == 7 and R.xmoe_capacity(8, 16, 1.0) == 4
    assert R.xmoe_capacity(100, 16, None) is None
    assert R.xmoe_capacity(0, 16, 2.0) == 4 and math.ceil(100 / 16 * 2.0) == R.xmoe_capacity(100, 16, 2.0)
