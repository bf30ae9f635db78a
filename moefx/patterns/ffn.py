"""The FFN pattern library: one small search function per FFN variant, registered by a loop.

This follows the *style* of Inductor's ``fx_passes/fuse_attention.py`` (one search description
per variant, a registry, one shared ``extra_check``), but each search is an explicit walk
backwards from a candidate down-projection (``aten.linear``) instead of a traced pattern graph:
after canonicalisation the variants differ only in what feeds the down-projection, the walk
reads as the FFN formula, it tolerates transparent ops (dropout, clones) anywhere without one
pattern per placement, and it can say *why* a near-match is not an FFN, which a traced pattern
cannot. The shared check (widths, parameters, a closed region with one output) lives in
:mod:`moefx.passes.find_ffn`.

A search returns a :class:`Candidate` (possibly carrying a ``reject`` reason for a near-match:
two Linears without a nonlinearity, an activation moefx cannot convert) or ``None`` when the
down-projection is fed by something unrelated (attention, a norm, embeddings).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.fx as fx

from .activations import FFN_ACTIVATION_NAMES, activation_of, describe_cone, other_nonlinearity, pointwise_cone
from .common import LINEAR, SPLITS, aten, is_call, is_getitem, strip_back


@dataclasses.dataclass
class Candidate:
    variant: str
    kind: str
    down: fx.Node
    x: Optional[fx.Node] = None
    activation: Optional[str] = None
    linears: dict = dataclasses.field(default_factory=dict)
    act: Optional[fx.Node] = None
    mul: Optional[fx.Node] = None
    split: Optional[fx.Node] = None
    fused_order: Optional[str] = None
    through: list = dataclasses.field(default_factory=list)
    reject: Optional[str] = None

    def region(self) -> set:
        nodes = set(self.linears.values()) | set(self.through)
        for n in (self.act, self.mul, self.split):
            if n is not None:
                nodes.add(n)
        if self.split is not None:
            nodes.update(u for u in self.split.users if is_getitem(u))
        return nodes


PATTERNS: dict[str, Callable[[fx.Node], Optional[Candidate]]] = {}


def register(name: str):
    def deco(fn):
        PATTERNS[name] = fn
        return fn
    return deco


def _split_part(node: fx.Node):
    """``(split_node, index, linear)`` when ``node`` is one half of a split of a Linear's output."""
    if not is_getitem(node):
        return None
    split = node.args[0]
    if not is_call(split, SPLITS):
        return None
    src = strip_back(split.args[0])
    if not is_call(src, LINEAR):
        return None
    return split, node.args[1], src


@register("glu")
def search_glu(down: fx.Node) -> Optional[Candidate]:
    """``down(act(gate(x)) * up(x))`` in either operand order (SwiGLU, GeGLU), separate or fused
    ``gate_up`` Linear split in two (``chunk``/``split``)."""
    through: list = []
    h = strip_back(down.args[0], through)
    if not is_call(h, (aten.mul.Tensor,)) or len(h.args) != 2:
        return None
    a, b = h.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for g, u in ((a, b), (b, a)):
        path = list(through)
        g_act = strip_back(g, path)
        name = activation_of(g_act)
        other = other_nonlinearity(g_act) if name is None else None
        g_src = g_act.args[0] if g_act.args else None
        if name is None and other is None:
            cone = pointwise_cone(g_act)
            if cone is None:
                continue
            members, g_src = cone
            other = f"an elementwise function ({describe_cone(members)})"
            path += [m for m in members if m is not g_act]
        g_in = strip_back(g_src, path)
        u_in = strip_back(u, path)
        cand = Candidate("glu", "glu", down, activation=name or other, act=g_act, mul=h, through=path)
        if is_call(g_in, LINEAR) and is_call(u_in, LINEAR):
            xg, xu = strip_back(g_in.args[0]), strip_back(u_in.args[0])
            if xg is not xu or g_in is u_in:
                continue
            cand.x = g_in.args[0] if g_in.args[0] is u_in.args[0] else xg
            cand.linears = {"w1": g_in, "w3": u_in, "w2": down}
        else:
            gp, up = _split_part(g_in), _split_part(u_in)
            if gp is None or up is None or gp[0] is not up[0] or gp[1] == up[1]:
                continue
            split, lin = gp[0], gp[2]
            cand.variant = "fused_glu"
            cand.split = split
            cand.x = lin.args[0]
            cand.linears = {"w13": lin, "w2": down}
            cand.fused_order = "fused_gate_first" if gp[1] < up[1] else "fused_up_first"
            if split.args[0] is not lin:
                cand.through.append(split.args[0])
        if name is None:
            cand.reject = (
                f"gated block {g_act.name} uses {other}, which is not an FFN activation moefx "
                f"converts ({FFN_ACTIVATION_NAMES})"
            )
        return cand
    return None


@register("mlp")
def search_mlp(down: fx.Node) -> Optional[Candidate]:
    """``down(act(up(x)))``: Linear -> activation -> Linear, dropout allowed anywhere inside."""
    through: list = []
    h = strip_back(down.args[0], through)
    name = activation_of(h)
    if name is not None:
        up = strip_back(h.args[0], through)
        if not is_call(up, LINEAR):
            return None
        return Candidate("mlp", "mlp", down, x=up.args[0], activation=name, act=h,
                         linears={"w1": up, "w2": down}, through=through)
    other = other_nonlinearity(h)
    if other is not None and h.args:
        up = strip_back(h.args[0], through)
        if is_call(up, LINEAR):
            cand = Candidate("mlp", "mlp", down, x=up.args[0], activation=other, act=h,
                             linears={"w1": up, "w2": down}, through=through)
            cand.reject = (
                f"{up.name} -> {other} -> {down.name}: {other} is not an FFN activation moefx "
                f"converts ({FFN_ACTIVATION_NAMES}); a pooler or classifier head looks like this"
            )
            return cand
    cone = pointwise_cone(h)
    if cone is not None:
        members, src = cone
        up = strip_back(src, through)
        if is_call(up, LINEAR):
            cand = Candidate("mlp", "mlp", down, x=up.args[0], activation="unrecognised", act=h,
                             linears={"w1": up, "w2": down}, through=through + members)
            cand.reject = (
                f"{up.name} -> {len(members)} elementwise op(s) ({describe_cone(members)}) -> "
                f"{down.name}: that function matches none of the activations moefx converts "
                f"({FFN_ACTIVATION_NAMES}) on probe values"
            )
            return cand
    if is_call(h, LINEAR):
        cand = Candidate("linear_linear", "mlp", down, x=h.args[0], linears={"w1": h, "w2": down},
                         through=through)
        cand.reject = (
            f"{h.name} -> {down.name}: two Linears with no nonlinearity between them compose to "
            "one linear map, not an FFN"
        )
        return cand
    return None
