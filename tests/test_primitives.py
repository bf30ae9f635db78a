"""The primitive ops the lowering emits (moefx/kernels/primitives.py), PyTorch kernels on CPU,
against the loop references of moefx/kernels/reference.py."""
import pytest
import torch

from moefx.kernels import primitives as P
from moefx.kernels.reference import (
    capacity_drop_reference,
    moe_ffn_reference,
    xmoe_capacity,
    xmoe_select_reference,
)
from moefx.kernels.triton_moe import max_blocks

OPS = torch.ops.moefx


def _routing(N, K, E, drop=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    idx[torch.rand(N, K, generator=gen) < drop] = -1
    weight = torch.rand(N, K, generator=gen) * (idx >= 0)
    return idx, weight


def test_max_blocks_bounds_every_routing_and_is_attained():
    """The static grid bound ``ceil((R - E + 1) / BM) + E - 1`` covers every routing and the
    worst case (E-1 experts with one row each) reaches it."""
    gen = torch.Generator().manual_seed(1)
    for R, E, BM in [(40, 5, 16), (7, 4, 16), (33, 3, 8), (64, 16, 16), (200, 7, 32)]:
        bound = max_blocks(R, E, BM)
        for _ in range(50):
            used = torch.randint(0, E, (R,), generator=gen)
            counts = torch.bincount(used[torch.rand(R, generator=gen) < 0.9], minlength=E)
            assert int(((counts + BM - 1) // BM).sum()) <= bound
        if R >= E:
            worst = [1] * (E - 1) + [R - E + 1]
            assert sum(-(-c // BM) for c in worst) == bound
    assert max_blocks(0, 4, 16) == 0


@pytest.mark.parametrize("N,K,E,BM", [(13, 3, 5, 4), (1, 2, 8, 16), (40, 2, 3, 16)])
def test_dispatch_block_layout(N, K, E, BM):
    """Every routed slot appears once, in its expert's blocks, in slot order (stable); blocks
    are in expert order, unused blocks are -1; the sizes are the static bound."""
    idx, _ = _routing(N, K, E)
    ss, be = OPS.dispatch(idx, E, BM)
    B = max_blocks(N * K, E, BM)
    assert ss.shape == (B * BM,) and be.shape == (B,)
    flat = idx.reshape(-1)
    seen = []
    for b, e in enumerate(be.tolist()):
        rows = ss[b * BM:(b + 1) * BM]
        if e < 0:
            assert (rows == -1).all()
            continue
        valid = rows[rows >= 0]
        assert len(valid) > 0 and (flat[valid] == e).all()
        seen += valid.tolist()
    used = [e for e in be.tolist() if e >= 0]
    assert used == sorted(used)
    expected = sorted(range(N * K), key=lambda s: (int(flat[s]), s))
    assert seen == [s for s in expected if flat[s] >= 0]


def test_dispatch_zero_tokens_and_fake_shapes():
    ss, be = OPS.dispatch(torch.empty(0, 2, dtype=torch.long), 4, 16)
    assert ss.shape == (0,) and be.shape == (0,)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        idx = torch.empty(10, 3, dtype=torch.long)
        fss, fbe = OPS.dispatch(idx, 4, 8)
    assert fss.shape == (max_blocks(30, 4, 8) * 8,) and fbe.shape == (max_blocks(30, 4, 8),)


@pytest.mark.parametrize("threshold,top_k,max_experts,renorm", [
    (0.0, 2, 0, True), (0.0, 3, 0, False), (0.75, 0, 0, False), (0.9, 0, 3, False),
])
def test_select_experts_matches_reference(threshold, top_k, max_experts, renorm):
    probs = torch.softmax(torch.randn(9, 6) * 2, -1)
    idx, weight = OPS.select_experts(probs, threshold, top_k, max_experts, renorm)
    ref_idx, ref_w = xmoe_select_reference(probs, threshold, top_k, max_experts)
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weight, ref_w, rtol=1e-6, atol=1e-7)


def test_apply_capacity_uses_the_batch_size():
    """C = max(ceil(T / E * γ), 4) from the batch itself, then SPEC §1's drop rule."""
    T, E, gamma = 24, 4, 1.0
    probs = torch.softmax(torch.randn(T, E) * 2, -1)
    idx, weight = xmoe_select_reference(probs, 0.0, 2, 0)
    out_idx, out_w = OPS.apply_capacity(idx, weight, E, gamma)
    ref_idx, ref_w = capacity_drop_reference(idx, weight, E, xmoe_capacity(T, E, gamma))
    assert torch.equal(out_idx, ref_idx) and torch.equal(out_w, ref_w)
    assert (out_idx == -1).any()


@pytest.mark.parametrize("glu,gate_input,dtype", [
    (False, False, torch.float32), (True, True, torch.float32), (True, False, torch.float64),
])
def test_primitive_chain_equals_moe_ffn_reference(glu, gate_input, dtype):
    """dispatch -> gather_rows -> grouped_gemm -> activation (-> glu_mul) -> grouped_gemm ->
    combine computes ``moefx::moe_ffn``."""
    N, K, E, d, h = 10, 2, 5, 12, 9
    x = torch.randn(N, d, dtype=dtype)
    idx, weight = _routing(N, K, E)
    weight = weight.to(dtype)
    w1, w3 = torch.randn(E, h, d, dtype=dtype), torch.randn(E, h, d, dtype=dtype) if glu else None
    b1, b3 = torch.randn(E, h, dtype=dtype), torch.randn(E, h, dtype=dtype) if glu else None
    w2, b2 = torch.randn(E, d, h, dtype=dtype), torch.randn(E, d, dtype=dtype)
    ss, be = OPS.dispatch(idx, E, 4)
    rows = OPS.gather_rows(x, ss, weight, gate_input)
    hid = OPS.activation(OPS.grouped_gemm(rows, be, w1, b1), "silu")
    if glu:
        hid = OPS.glu_mul(hid, OPS.grouped_gemm(rows, be, w3, b3))
    y = OPS.combine(OPS.grouped_gemm(hid, be, w2, b2), ss, weight, not gate_input)
    ref = moe_ffn_reference(x.double(), idx, weight.double(), w1.double(), b1.double(),
                            None if w3 is None else w3.double(), None if b3 is None else b3.double(),
                            w2.double(), b2.double(), "silu", gate_input)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert y.dtype == dtype


def test_router_linear_runs_in_float32():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    w = torch.randn(3, 8, dtype=torch.bfloat16)
    out = OPS.router_linear(x, w, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ w.float().t())


def test_grouped_gemm_width_mismatch_names_the_op():
    with pytest.raises(Exception, match="moefx::grouped_gemm"):
        OPS.grouped_gemm(torch.randn(16, 5), torch.tensor([0]), torch.randn(2, 3, 4), None)


def test_opcheck_primitives():
    """Schema, fake kernels and dynamic-shape tracing agree with the real kernels."""
    N, K, E, d, h = 6, 2, 4, 8, 5
    idx, weight = _routing(N, K, E, drop=0.0)
    ss, be = P.dispatch_torch(idx, E, 4)
    x = torch.randn(N, d)
    rows = P.gather_rows_torch(x, ss, weight, False)
    w1 = torch.randn(E, h, d)
    cases = [
        (OPS.dispatch.default, (idx, E, 4)),
        (OPS.gather_rows.default, (x, ss, weight, True)),
        (OPS.grouped_gemm.default, (rows, be, w1, torch.randn(E, h))),
        (OPS.combine.default, (torch.randn(ss.shape[0], d), ss, weight, True)),
        (OPS.select_experts.default, (torch.softmax(torch.randn(N, E), -1), 0.5, 0, 0, False)),
        (OPS.router_linear.default, (x, torch.randn(E, d), None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_cuda_kernel_table_matches_the_op_schemas():
    """Every function moefx/kernels/cuda.py registers for CUDA exists as an op and takes the
    op's arguments in the op's order (checked here, where no GPU runs them)."""
    import inspect

    import moefx.kernels.fused  # noqa: F401
    from moefx.kernels import cuda

    for name, fn in cuda.KERNELS.items():
        op = getattr(torch.ops.moefx, name.split("::")[1]).default
        assert list(inspect.signature(fn).parameters) == [a.name for a in op._schema.arguments], name


@pytest.mark.parametrize("first", ["moefx.layers", "moefx.kernels.primitives"])
def test_cuda_registration_survives_every_import_order(first):
    """On a CUDA machine kernels/__init__ imports cuda.py, which imports fused and primitives,
    which call back into cuda.py: whichever module loads first, all kernels end up registered.
    Simulated here (a fresh interpreter told that CUDA is available)."""
    import subprocess
    import sys

    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        f"import importlib; importlib.import_module({first!r})\n"
        "import moefx.kernels.fused, moefx.kernels.primitives\n"
        "from moefx.kernels import cuda\n"
        "assert cuda._registered == set(cuda.KERNELS), cuda._registered\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
