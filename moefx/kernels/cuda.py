"""Registers the Triton kernels of :mod:`moefx.kernels.triton_moe` for the CUDA dispatch key
of the moefx ops: the layers' ``moefx::moe_ffn``, the grouping primitives ``moefx::dispatch`` and
``moefx::grouped_gemm``, and the fused ``route``, ``gather_gemm1``, ``gemm2_scatter`` and
``expert_mlp``. CPU keeps the PyTorch kernels.

Each ``*_cuda`` function below is what the dispatcher calls. They are plain functions so the
test suite can call them on CPU tensors under ``TRITON_INTERPRET=1``; :func:`register` runs at
import only when CUDA is available. Cases the kernels do not cover (float64, a router over more
than 256 experts) fall back to the PyTorch kernels rather than fail.
"""
from __future__ import annotations

import torch

from moefx.kernels import fused as _fused
from moefx.kernels import primitives as _prims
from moefx.kernels import triton_moe as tm

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_ok(*tensors, block_expert=None, rows=None) -> bool:
    """Triton takes fp32/fp16/bf16, and row blocks of at least 16 (``tl.dot``'s smallest tile;
    a graph lowered for the CPU uses 1-row blocks)."""
    if block_expert is not None and block_expert.numel() and rows // block_expert.numel() < 16:
        return False
    return all(t is None or t.dtype in _TRITON_DTYPES for t in tensors)


def moe_ffn_cuda(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
    if not _triton_ok(x, w1, w2):
        from moefx.kernels import cpu

        return cpu.moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input)
    return tm.moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input)


def dispatch_cuda(idx, num_experts, block_m):
    return tm.align_blocks(idx, num_experts, block_m)


def grouped_gemm_cuda(a, block_expert, w, b):
    if not _triton_ok(a, w, block_expert=block_expert, rows=a.shape[0]):
        return _prims.grouped_gemm_torch(a, block_expert, w, b)
    return tm.grouped_gemm(a, block_expert, w, b)


def route_cuda(x, weight, bias, threshold, top_k, max_experts, renormalize):
    if x.dtype not in _TRITON_DTYPES or weight.shape[0] > 256:
        return _route_torch(x, weight, bias, threshold, top_k, max_experts, renormalize)
    return tm.route(x, weight, bias, threshold, top_k, max_experts, renormalize)


def _route_torch(x, weight, bias, threshold, top_k, max_experts, renormalize):
    probs = torch.softmax(_prims.router_linear(x, weight, bias), dim=-1)
    idx, w = torch.ops.moefx.select_experts(probs, threshold, top_k, max_experts, renormalize)
    return idx, w, probs


def gather_gemm1_cuda(x, sorted_slot, block_expert, weight, scale_input, w1, b1, w3, b3, activation):
    if not _triton_ok(x, w1, block_expert=block_expert, rows=sorted_slot.shape[0]):
        return _fused.gather_gemm1_torch(x, sorted_slot, block_expert, weight, scale_input,
                                         w1, b1, w3, b3, activation)
    return tm.gather_gemm1(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, activation,
                           scale_input=scale_input)


def gemm2_scatter_cuda(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2):
    if not _triton_ok(hidden, w2, block_expert=block_expert, rows=sorted_slot.shape[0]):
        return _fused.gemm2_scatter_torch(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2)
    y = tm.gemm2_scatter(hidden, sorted_slot, block_expert, weight, w2, b2, apply_weight=apply_weight)
    return y.to(hidden.dtype)


def expert_mlp_cuda(x, sorted_slot, block_expert, weight, scale_input, apply_weight,
                    w1, b1, w3, b3, w2, b2, activation):
    if not _triton_ok(x, w1, w2, block_expert=block_expert, rows=sorted_slot.shape[0]):
        return _fused.expert_mlp_torch(x, sorted_slot, block_expert, weight, scale_input, apply_weight,
                                       w1, b1, w3, b3, w2, b2, activation)
    if x.shape[1] > tm.EXPERT_MLP_MAX_WIDTH:
        h = tm.gather_gemm1(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, activation,
                            scale_input=scale_input)
        y = tm.gemm2_scatter(h, sorted_slot, block_expert, weight, w2, b2, apply_weight=apply_weight)
    else:
        y = tm.expert_mlp(x, sorted_slot, block_expert, weight, w1, b1, w3, b3, w2, b2, activation,
                          scale_input=scale_input, apply_weight=apply_weight)
    return y.to(x.dtype)


KERNELS = {
    "moefx::moe_ffn": moe_ffn_cuda,
    "moefx::dispatch": dispatch_cuda,
    "moefx::grouped_gemm": grouped_gemm_cuda,
    "moefx::route": route_cuda,
    "moefx::gather_gemm1": gather_gemm1_cuda,
    "moefx::gemm2_scatter": gemm2_scatter_cuda,
    "moefx::expert_mlp": expert_mlp_cuda,
}

_registered: set = set()


def register() -> None:
    """Register the kernels of :data:`KERNELS` for ``"cuda"``, each once per process. Ops not
    defined yet are skipped: :mod:`primitives` and :mod:`fused` call this again at the end of
    their import, whatever order the modules load in."""
    for name, fn in KERNELS.items():
        short = name.split("::", 1)[1]
        if name in _registered or not hasattr(torch.ops.moefx, short):
            continue
        torch.library.register_kernel(name, "cuda", fn)
        _registered.add(name)


if torch.cuda.is_available():
    register()
