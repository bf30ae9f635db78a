"""``fuse_gemm_scatter``: ``grouped_gemm(w2) -> combine`` becomes one ``moefx::gemm2_scatter``
op: the routing weight is applied and the rows are added into their tokens in the GEMM's
epilogue, so the per-row expert outputs are never written.

Fires only when the GEMM output feeds nothing but the combine, and rows and blocks come from
the same ``dispatch``.
"""
from __future__ import annotations

import torch.fx as fx

from moefx.passes.lower import OPS, FusionPass, is_op, op_args, same_dispatch, single_user, where


class FuseGemmScatter(FusionPass):
    name = "fuse_gemm_scatter"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if not is_op(node, "combine"):
            return False
        c = op_args(node)
        gemm = c["out"]
        if not is_op(gemm, "grouped_gemm"):
            return False
        if not single_user(gemm, node):
            self.fired.append(f"fuse_gemm_scatter: not fused at {where(node)}: the expert outputs have other users")
            return False
        m = op_args(gemm)
        if not same_dispatch(c["sorted_slot"], m["block_expert"]):
            return False
        graph = gm.graph
        with graph.inserting_before(node):
            fused = graph.call_function(OPS.gemm2_scatter.default, (
                m["a"], c["sorted_slot"], m["block_expert"], c["weight"], c["apply_weight"],
                m["w"], m["b"]))
            fused.meta.update({k: v for k, v in node.meta.items() if k == "moefx_layer"})
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(gemm)
        self.fired.append(f"fuse_gemm_scatter: grouped_gemm + combine -> gemm2_scatter at {where(fused)}")
        return True
