"""``fuse_expert_mlp``: ``gather_gemm1 -> gemm2_scatter`` becomes one ``moefx::expert_mlp`` op
that runs the whole expert MLP per row tile with the hidden activations kept on chip
(FlashAttention-style chunks over the expert's hidden width), for experts narrow enough that a
tile of input rows and one of output rows fit in registers: SliceMoE's slices (d/S of 72 or 96)
are the case that matters. Their unfused GEMMs are memory-bound (about 77 FLOP per byte);
fused, the hidden activations cost no memory traffic at all.

Fires only when the expert input/output width is known and at most ``max_width`` (256 by
default, the Triton kernel's limit), the hidden activations feed nothing but the second GEMM,
and both halves use the same rows, blocks and routing weights.
"""
from __future__ import annotations

import torch.fx as fx

from moefx.kernels.triton_moe import EXPERT_MLP_MAX_WIDTH
from moefx.passes.lower import OPS, FusionPass, is_op, op_args, single_user, tensor_shape, where


class FuseExpertMLP(FusionPass):
    name = "fuse_expert_mlp"

    def __init__(self, max_width: int = EXPERT_MLP_MAX_WIDTH) -> None:
        super().__init__()
        if not isinstance(max_width, int) or not 1 <= max_width <= EXPERT_MLP_MAX_WIDTH:
            raise ValueError(
                f"FuseExpertMLP: max_width must be an integer in [1, {EXPERT_MLP_MAX_WIDTH}] "
                f"(the Triton kernel's on-chip tile), got {max_width!r}"
            )
        self.max_width = max_width

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if not is_op(node, "gemm2_scatter"):
            return False
        s = op_args(node)
        first = s["hidden"]
        if not is_op(first, "gather_gemm1"):
            return False
        g = op_args(first)
        if not single_user(first, node):
            self.fired.append(f"fuse_expert_mlp: not fused at {where(node)}: the hidden activations have other users")
            return False
        if not (g["sorted_slot"] is s["sorted_slot"] and g["block_expert"] is s["block_expert"]
                and g["weight"] is s["weight"]):
            return False
        shape = tensor_shape(gm, g["w1"])
        if shape is None or shape[2] > self.max_width:
            why = "width unknown" if shape is None else f"width {shape[2]} > {self.max_width}"
            self.fired.append(
                f"fuse_expert_mlp: not fused at {where(node)}: {why}, the tiles would not fit on chip"
            )
            return False
        graph = gm.graph
        with graph.inserting_before(node):
            fused = graph.call_function(OPS.expert_mlp.default, (
                g["x"], g["sorted_slot"], g["block_expert"], g["weight"], g["scale_input"],
                s["apply_weight"], g["w1"], g["b1"], g["w3"], g["b3"], s["w2"], s["b2"],
                g["activation"]))
            fused.meta.update({k: v for k, v in node.meta.items() if k == "moefx_layer"})
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(first)
        self.fired.append(f"fuse_expert_mlp: gather_gemm1 + gemm2_scatter -> expert_mlp at {where(fused)} (width {shape[2]})")
        return True
