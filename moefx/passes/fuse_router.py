"""``fuse_router``: ``router_linear -> router_softmax -> select_experts`` becomes one
``moefx::route`` op (one Triton kernel on CUDA: the logits and probabilities of a row never
leave the chip before the experts are chosen).

Both forms are matched: the primitives the ``lower`` pass emits for a layer module, and the
``aten.linear -> aten.softmax`` router of a graph captured with ``torch.export`` (there only
when the linear already runs in float32/float64, so that the fused op computes in the same
dtype, and the softmax is over the experts).

Fires only when the logits feed nothing but the softmax: a graph that reads the raw logits
elsewhere (a z-loss, a logging hook) keeps them. Other readers of the probabilities are fine:
``route`` returns them as its third output.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moefx.passes.lower import OPS, FusionPass, is_op, op_args, single_user, where


class FuseRouter(FusionPass):
    name = "fuse_router"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if not is_op(node, "select_experts"):
            return False
        sel = op_args(node)
        probs = sel["probs"]
        lin = self._router(probs)
        if lin is None:
            return False
        logits = lin["logits"]
        if not single_user(logits, probs):
            self.fired.append(f"fuse_router: not fused at {where(node)}: the router logits have other users")
            return False
        graph = gm.graph
        with graph.inserting_before(logits):
            route = graph.call_function(OPS.route.default, (
                lin["x"], lin["weight"], lin["bias"], sel["threshold"], sel["top_k"],
                sel["max_experts"], sel["renormalize"]))
            route.meta.update({k: v for k, v in node.meta.items() if k == "moefx_layer"})
            probs_out = graph.call_function(operator.getitem, (route, 2))
        node.replace_all_uses_with(route)
        graph.erase_node(node)
        probs.replace_all_uses_with(probs_out)
        graph.erase_node(probs)
        graph.erase_node(logits)
        if not probs_out.users:
            graph.erase_node(probs_out)
        self.fired.append(f"fuse_router: router linear + softmax + select_experts -> route at {where(route)}")
        return True

    @staticmethod
    def _router(probs):
        """``{x, weight, bias, logits}`` when ``probs`` is a softmax over a router linear."""
        if is_op(probs, "router_softmax"):
            logits = op_args(probs)["logits"]
            if is_op(logits, "router_linear"):
                return dict(op_args(logits), logits=logits)
            return None
        aten = torch.ops.aten
        if not (isinstance(probs, fx.Node) and probs.op == "call_function"
                and probs.target in (aten.softmax.int, aten._softmax.default)):
            return None
        logits = probs.args[0]
        if not (isinstance(logits, fx.Node) and logits.op == "call_function"
                and logits.target is aten.linear.default):
            return None
        val = logits.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float32, torch.float64):
            return None
        if probs.args[1] not in (-1, val.dim() - 1):
            return None
        x, weight = logits.args[0], logits.args[1]
        bias = logits.args[2] if len(logits.args) > 2 else logits.kwargs.get("bias")
        return dict(x=x, weight=weight, bias=bias, logits=logits)
