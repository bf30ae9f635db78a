"""``fuse_gather_gemm``: ``gather_rows -> grouped_gemm(w1) -> activation`` (and, for GLU experts,
``-> glu_mul(·, grouped_gemm(w3))`` on the same gathered rows) becomes one
``moefx::gather_gemm1`` op, which reads every token row straight from where it lies: the
gathered copy of the input is never written.

Fires only when the gathered rows feed nothing but these GEMMs and every intermediate has the
fused chain as its only reader, and when rows and blocks come from the same ``dispatch``.
"""
from __future__ import annotations

import torch.fx as fx

from moefx.passes.lower import OPS, FusionPass, is_op, op_args, same_dispatch, single_user, where


class FuseGatherGemm(FusionPass):
    name = "fuse_gather_gemm"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if not is_op(node, "gather_rows"):
            return False
        g = op_args(node)
        gemms = list(node.users)
        if not gemms or not all(is_op(u, "grouped_gemm") and op_args(u)["a"] is node for u in gemms):
            self.fired.append(f"fuse_gather_gemm: not fused at {where(node)}: the gathered rows have other users")
            return False
        if len(gemms) > 2:
            return False
        block_expert = op_args(gemms[0])["block_expert"]
        if any(op_args(u)["block_expert"] is not block_expert for u in gemms):
            return False
        if not same_dispatch(g["sorted_slot"], block_expert):
            return False
        gate = up = act = glu = None
        for cand in gemms:
            users = list(cand.users)
            if len(users) == 1 and is_op(users[0], "activation"):
                gate, act = cand, users[0]
        if gate is None:
            return False
        if len(gemms) == 2:
            up = gemms[0] if gemms[1] is gate else gemms[1]
            users = list(act.users)
            if not (len(users) == 1 and is_op(users[0], "glu_mul")):
                return False
            glu = users[0]
            ga = op_args(glu)
            if not (ga["gate"] is act and ga["up"] is up and single_user(up, glu)):
                return False
        w1 = op_args(gate)
        w3 = op_args(up) if up is not None else {"w": None, "b": None}
        last = glu if glu is not None else act
        graph = gm.graph
        with graph.inserting_before(last):
            fused = graph.call_function(OPS.gather_gemm1.default, (
                g["x"], g["sorted_slot"], block_expert, g["weight"], g["scale"],
                w1["w"], w1["b"], w3["w"], w3["b"], op_args(act)["name"]))
            fused.meta.update({k: v for k, v in node.meta.items() if k == "moefx_layer"})
        last.replace_all_uses_with(fused)
        for dead in (glu, act, up, gate, node):
            if dead is not None:
                graph.erase_node(dead)
        what = "gather_rows + grouped_gemm + activation" + (" + grouped_gemm + glu_mul" if glu else "")
        self.fired.append(f"fuse_gather_gemm: {what} -> gather_gemm1 at {where(fused)}")
        return True
