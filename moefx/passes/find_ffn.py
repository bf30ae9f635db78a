"""Find the dense FFN blocks of a model: the ``find`` stage of the pipeline (annotate only).

``find_ffns(model, example_inputs)`` captures the model (:func:`moefx.capture`), canonicalises
the graph (:mod:`moefx.passes.canonicalize`), then runs every search of the pattern library
(:mod:`moefx.patterns.ffn`) from each ``aten.linear`` node, as a possible down-projection, in
graph order. One shared check accepts or rejects each candidate:

- widths agree (``W2`` maps d_ff back to the input width d; a d -> h -> classes head is not an
  FFN) and, for GLU, gate and up have the same shape;
- every weight is a model parameter (a ``get_attr``), so a rewrite can find it by fqn;
- the block is a closed region of the graph (networkx edge boundary): it has one output and no
  node inside it is used outside (a hidden activation reused elsewhere would change meaning if
  the block were replaced);
- it does not overlap a block already accepted (stacked ``Linear-act-Linear-act-Linear`` gives
  the first, in graph order).

Accepted blocks become :class:`FFNMatch` objects and are annotated into
``node.meta["moefx"]`` (pt2e style: a dry run a later pass or a person can read); near-matches
that fail are kept, with the reason, in :class:`FindReport` (``explain=True``).

Dropout: canonicalisation removes eval-mode dropout (the identity); training-mode dropout inside
or right after the block (in the same module) is walked through and counted as part of it. A
module whose forward is ``dropout(W2 act(W1 x))`` (GPT-2's ``mlp``) is therefore
``module_exact``: swapping the whole module is exact in eval mode, and the rewrite decides what
to do about dropout in training.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from ..patterns.activations import FFN_ACTIVATIONS
from ..patterns.common import (
    LINEAR,
    TRANSPOSE,
    fetch_attr,
    is_call,
    is_meta_only,
    is_transparent,
    module_stack,
    tensor_shape,
)
from ..patterns.ffn import PATTERNS, Candidate
from .canonicalize import canonicalize

ROLE_ORDER = ("w1", "b1", "w3", "b3", "w13", "b13", "w2", "b2")


@dataclasses.dataclass
class FFNMatch:
    """One dense FFN block: where it is, what it computes, and where its weights live.

    ``weights``/``modules``/``layout`` are keyed by role: ``w1`` (W1, or W_gate for GLU),
    ``w3`` (W_up), ``w2`` (down), ``b1``/``b3``/``b2`` (biases), or ``w13``/``b13`` for a
    fused gate_up Linear. ``layout`` says how a weight is stored: ``linear`` (``[out, in]`` of an
    nn.Linear), ``conv1d`` (``[in, out]``, HF Conv1D), ``functional_t`` (``x @ W.T``,
    ``F.linear``), ``functional`` (``x @ W``), ``fused_gate_first``/``fused_up_first`` (``w13``,
    ``[2 d_ff, d]``). :meth:`dense_weights` hides all of that.
    """

    name: str
    path: Optional[str]
    module_exact: bool
    kind: str
    d_model: int
    d_ff: int
    activation: str
    bias1: bool
    bias2: bool
    weights: dict
    modules: dict
    layout: dict
    nodes: list
    input_node: fx.Node
    output_node: fx.Node
    graph_module: Optional[fx.GraphModule] = dataclasses.field(default=None, repr=False)
    model: Optional[nn.Module] = dataclasses.field(default=None, repr=False)

    @property
    def num_params(self) -> int:
        n = self.d_model * self.d_ff * (3 if self.kind == "glu" else 2)
        n += self.d_ff * (self.bias1 + (self.kind == "glu" and ("b3" in self.weights or "b13" in self.weights)))
        return n + (self.d_model if self.bias2 else 0)

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds counted as 2 FLOPs; activation and gating are not counted."""
        return 2 * self.d_model * self.d_ff * (3 if self.kind == "glu" else 2)

    def dense_weights(self, model: Optional[nn.Module] = None) -> dict:
        """Canonical tensors of the block, whatever the storage layout.

        ``w1 [d_ff, d]``, ``b1 [d_ff]``, ``w3 [d_ff, d]``, ``b3 [d_ff]``, ``w2 [d, d_ff]``,
        ``b2 [d]``, each ``None`` where absent. Tensors are detached views of the parameters of
        ``model`` (default: the model the block was found in); copy before changing them.
        """
        model = model if model is not None else (self.model if self.model is not None else self.graph_module)
        if model is None:
            raise ValueError(f"FFN {self.name}: dense_weights needs the model that holds its weights")

        def get(role):
            fqn = self.weights.get(role)
            if fqn is None:
                return None
            t = fetch_attr(model, fqn)
            if not isinstance(t, torch.Tensor):
                raise KeyError(
                    f"FFN {self.name}: {type(model).__name__} has no tensor {fqn!r} ({role}); "
                    "pass the model the block was found in"
                )
            t = t.detach()
            lay = self.layout.get(role, "linear")
            if lay in ("conv1d", "functional") and t.dim() == 2:
                t = t.t()
            return t

        out = {k: None for k in ("w1", "b1", "w3", "b3", "w2", "b2")}
        if "w13" in self.weights:
            w13, b13 = get("w13"), get("b13")
            first, second = w13[: self.d_ff], w13[self.d_ff:]
            bf, bs = (b13[: self.d_ff], b13[self.d_ff:]) if b13 is not None else (None, None)
            if self.layout["w13"] == "fused_gate_first":
                out.update(w1=first, w3=second, b1=bf, b3=bs)
            else:
                out.update(w1=second, w3=first, b1=bs, b3=bf)
        else:
            for role in ("w1", "b1", "w3", "b3"):
                out[role] = get(role)
        out["w2"], out["b2"] = get("w2"), get("b2")
        return out

    def dense_reference(self, x: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
        """The block's output computed from :meth:`dense_weights` in plain PyTorch (any dtype:
        weights are cast to ``x``'s), the reference every conversion is checked against."""
        w = {k: (v.to(x.dtype) if v is not None else None) for k, v in self.dense_weights(model).items()}
        act = FFN_ACTIVATIONS[self.activation]
        h = act(nn.functional.linear(x, w["w1"], w["b1"]))
        if w["w3"] is not None:
            h = h * nn.functional.linear(x, w["w3"], w["b3"])
        return nn.functional.linear(h, w["w2"], w["b2"])

    def to_dict(self) -> dict:
        """JSON-able summary (for reports, ``moefx inspect --json`` and recipes)."""
        return {
            "name": self.name,
            "path": self.path,
            "module_exact": self.module_exact,
            "kind": self.kind,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "activation": self.activation,
            "bias1": self.bias1,
            "bias2": self.bias2,
            "weights": dict(self.weights),
            "modules": dict(self.modules),
            "layout": dict(self.layout),
            "params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "nodes": [n.name for n in self.nodes],
        }

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.kind} d_model={self.d_model} d_ff={self.d_ff} "
            f"act={self.activation} bias=({int(self.bias1)},{int(self.bias2)})"
            f"{'' if self.module_exact else ' (spans code; not a whole module)'}"
        )


@dataclasses.dataclass
class Rejection:
    """A near-match that is not an FFN, and why."""

    name: str
    reason: str
    nodes: list

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclasses.dataclass
class FindReport:
    """What ``find_ffns(..., explain=True)`` returns: the matches and the rejected near-matches."""

    matches: list
    rejected: list
    capture_method: Optional[str] = None

    def __iter__(self):
        return iter(self.matches)

    def __len__(self) -> int:
        return len(self.matches)

    def __str__(self) -> str:
        lines = [f"{len(self.matches)} FFN block(s) found"
                 + (f" (graph captured with {self.capture_method})" if self.capture_method else "")]
        lines += [f"  + {m}" for m in self.matches]
        lines.append(f"{len(self.rejected)} near-match(es) rejected")
        lines += [f"  - {r}" for r in self.rejected]
        return "\n".join(lines)


class _Rejected(Exception):
    pass


def _weight_info(node, gm: fx.GraphModule):
    """``(source get_attr/placeholder node, transposed?, [out, in] as used)`` of a weight arg."""
    transposed = False
    n = node
    while is_call(n, TRANSPOSE):
        transposed = not transposed
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op not in ("get_attr", "placeholder"):
        return None, transposed, None
    shape = tensor_shape(n, gm)
    if shape is not None and len(shape) == 2 and transposed:
        shape = (shape[1], shape[0])
    return n, transposed, shape


def _common_path(nodes) -> Optional[str]:
    stacks = []
    for n in nodes:
        st = [p for p, _ in module_stack(n)]
        if not st:
            continue
        if st[0] != "":
            st = [""] + st
        stacks.append(st)
    if not stacks:
        return None
    common = stacks[0]
    for st in stacks[1:]:
        i = 0
        while i < min(len(common), len(st)) and common[i] == st[i]:
            i += 1
        common = common[:i]
    return common[-1] if common else ""


MOE_LAYER_TYPES = ("moefx.layers.xmoe.XMoE", "moefx.layers.slicemoe.SliceMoE")
"""moefx's own MoE layers: the small FFNs inside them (shared experts) are never dense FFNs to
convert again."""


def inside_moe_layer(node: fx.Node) -> Optional[str]:
    """Path of the moefx MoE layer whose forward computed ``node``, or None."""
    for path, typ in module_stack(node):
        if typ in MOE_LAYER_TYPES:
            return path
    return None


def _owner_type(node: fx.Node, owner: str) -> Optional[str]:
    for path, typ in module_stack(node):
        if path == owner:
            return typ.rsplit(".", 1)[-1]
    return None


class _Finder:
    def __init__(self, gm: fx.GraphModule, model: Optional[nn.Module]):
        self.gm = gm
        self.model = model
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.dg = nx.DiGraph()
        for n in gm.graph.nodes:
            self.dg.add_node(n)
            for u in n.users:
                self.dg.add_edge(n, u)
        self.paths = {n: {""} | {p for p, _ in module_stack(n)} for n in gm.graph.nodes}
        self.claimed: dict = {}
        self.matches: list = []
        self.rejected: list = []

    def run(self):
        for node in list(self.gm.graph.nodes):
            if not is_call(node, LINEAR):
                continue
            for search in PATTERNS.values():
                cand = search(node)
                if cand is None:
                    continue
                try:
                    if cand.reject:
                        raise _Rejected(cand.reject)
                    self.accept(cand)
                except _Rejected as why:
                    stack = module_stack(node)
                    where = f"{stack[-1][0]} ({node.name})" if stack and stack[-1][0] else node.name
                    self.rejected.append(Rejection(
                        name=where, reason=str(why),
                        nodes=sorted((n.name for n in cand.region()), key=str)))
                break
        return self.matches, self.rejected

    def _weight(self, lin: fx.Node, role: str, weights, modules, layout, shapes, biases):
        w_src, transposed, shape = _weight_info(lin.args[1], self.gm)
        if w_src is None or shape is None:
            raise _Rejected(f"{lin.name}: its weight is computed in the graph, not a parameter")
        if w_src.op == "placeholder":
            raise _Rejected(
                f"{lin.name}: its weight {w_src.name} is a graph input, not a model parameter; "
                "register it as an nn.Parameter so a rewrite can replace it"
            )
        fqn = str(w_src.target)
        weights[role] = fqn
        owner = fqn.rsplit(".", 1)[0] if "." in fqn else ""
        owner_type = self._owner_class(owner, lin) or ""
        if transposed and owner_type == "Conv1D":
            modules[role], layout[role] = owner, "conv1d"
        elif not transposed and owner_type.endswith("Linear"):
            modules[role], layout[role] = owner, "linear"
        else:
            layout[role] = "functional" if transposed else "functional_t"
        shapes[role] = shape
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if bias is not None:
            b_role = "b" + role[1:]
            if not isinstance(bias, fx.Node) or bias.op != "get_attr":
                raise _Rejected(f"{lin.name}: its bias is computed in the graph, not a parameter")
            weights[b_role] = str(bias.target)
            layout[b_role] = layout[role]
            if role in modules:
                modules[b_role] = modules[role]
        biases[role] = bias is not None

    def _owner_class(self, owner: str, lin: fx.Node) -> Optional[str]:
        if self.model is not None:
            mod = fetch_attr(self.model, owner) if owner else self.model
            if isinstance(mod, nn.Module):
                if isinstance(mod, nn.Linear):
                    return "Linear"
                return type(mod).__name__
        return _owner_type(lin, owner)

    def accept(self, cand: Candidate) -> None:
        moe = inside_moe_layer(cand.down)
        if moe is not None:
            raise _Rejected(f"inside the moefx MoE layer {moe or '<root>'}, already converted (its "
                            "shared experts are computed as a small dense FFN)")
        weights, modules, layout, shapes, biases = {}, {}, {}, {}, {}
        for role, lin in cand.linears.items():
            self._weight(lin, role, weights, modules, layout, shapes, biases)
        if cand.activation not in FFN_ACTIVATIONS:
            raise _Rejected(f"activation {cand.activation} is not one moefx converts")
        d_ff2, d_out_w2 = shapes["w2"][1], shapes["w2"][0]
        if "w13" in shapes:
            if layout["w13"] != "linear" and layout["w13"] != "functional_t":
                raise _Rejected(f"{cand.linears['w13'].name}: a fused gate_up weight stored "
                                "transposed is not supported")
            two_ff, d = shapes["w13"]
            split = cand.split
            if two_ff % 2 or not self._halves(split, two_ff):
                raise _Rejected(f"{split.name} does not cut the fused gate_up output into two "
                                "equal halves along the last dimension")
            d_ff = two_ff // 2
            layout["w13"] = cand.fused_order
            if "b13" in layout:
                layout["b13"] = cand.fused_order
        else:
            d_ff, d = shapes["w1"]
            if "w3" in shapes and shapes["w3"] != shapes["w1"]:
                raise _Rejected(f"gate {shapes['w1']} and up {shapes['w3']} weights differ in shape")
        if d_ff2 != d_ff:
            raise _Rejected(f"hidden widths disagree ({d_ff} vs {d_ff2})")
        if d_out_w2 != d:
            raise _Rejected(
                f"{cand.down.name} maps back to width {d_out_w2}, not the input width {d}: "
                "a projection or classifier head, not an FFN"
            )
        region = cand.region()
        clash = [n for n in region if n in self.claimed]
        if clash:
            raise _Rejected(f"overlaps FFN {self.claimed[clash[0]]} (shares {clash[0].name})")
        # Close the region with networkx: one output, nothing inside used outside.
        output = cand.down
        leaving = {(u, v) for u, v in nx.edge_boundary(self.dg, region)}
        inner_leaks = sorted(((u, v) for u, v in leaving if u is not output), key=lambda e: self.order[e[0]])
        if inner_leaks:
            u, v = inner_leaks[0]
            raise _Rejected(
                f"{u.name} inside the block is also used by {v.name} outside it; replacing the "
                "block would change that use"
            )
        entering = {u for u, v in nx.edge_boundary(self.dg, set(self.dg) - region, region)}
        foreign = [u for u in entering if u is not cand.x and _weight_info(u, self.gm)[0] is None
                   and not (u.op == "get_attr")]
        if foreign:
            raise _Rejected(f"the block also reads {foreign[0].name}, not only its input {cand.x.name}")

        core = sorted(region, key=self.order.__getitem__)
        path = _common_path([n for n in core if not is_meta_only(n)])
        output = self._extend_tail(output, path)
        nodes = sorted(set(core) | self._tail(cand.down, output), key=self.order.__getitem__)
        exact = self._module_exact(path, set(nodes), cand.x)
        if path == "" and not exact:
            path = None
        root_name = type(self.model).__name__ if self.model is not None else "<root>"
        name = path if exact else (modules.get("w2") or f"{root_name}:{output.name}")
        if exact and path == "":
            name = root_name
        bias1 = biases.get("w1", biases.get("w13", False))
        match = FFNMatch(
            name=name, path=path, module_exact=exact, kind=cand.kind, d_model=d, d_ff=d_ff,
            activation=cand.activation, bias1=bool(bias1), bias2=bool(biases["w2"]),
            weights={r: weights[r] for r in ROLE_ORDER if r in weights},
            modules={r: modules[r] for r in ROLE_ORDER if r in modules},
            layout={r: layout[r] for r in ROLE_ORDER if r in layout},
            nodes=nodes, input_node=cand.x, output_node=output, graph_module=self.gm,
            model=self.model,
        )
        roles = {v: k for k, v in cand.linears.items()}
        for n in nodes:
            self.claimed[n] = name
            role = roles.get(n) or ("act" if n is cand.act else "mul" if n is cand.mul else "inner")
            n.meta["moefx"] = {"ffn": name, "kind": cand.kind, "role": role}
        self.matches.append(match)

    def _halves(self, split: fx.Node, two_ff: int) -> bool:
        shape = tensor_shape(split.args[0], self.gm)
        ndim = len(shape) if shape else None
        args = list(split.args[1:]) + list(split.kwargs.values())
        size = args[0] if args else None
        dim = args[1] if len(args) > 1 else 0
        if ndim is None or dim % ndim != ndim - 1:
            return False
        if split.target is torch.ops.aten.chunk.default:
            return size == 2
        if isinstance(size, int):
            return size * 2 == two_ff
        return list(size) == [two_ff // 2, two_ff // 2]

    def _extend_tail(self, out: fx.Node, path: Optional[str]) -> fx.Node:
        if path is None:
            return out
        while len(out.users) == 1:
            nxt = next(iter(out.users))
            if not is_transparent(nxt) or path not in [""] + [p for p, _ in module_stack(nxt)]:
                break
            out = nxt
        return out

    def _tail(self, down: fx.Node, out: fx.Node) -> set:
        tail, n = set(), out
        while n is not down:
            tail.add(n)
            n = n.args[0]
        return tail

    def _module_exact(self, path: Optional[str], nodes: set, x: fx.Node) -> bool:
        if path is None:
            return False
        inside = []
        for n in self.gm.graph.nodes:
            if is_meta_only(n) or is_call(n, TRANSPOSE) and _weight_info(n, self.gm)[0] is not None:
                continue
            if path in self.paths[n]:
                inside.append(n)
        return x not in inside and all(n in nodes for n in inside)


def find_ffns_in_graph(gm: fx.GraphModule, model: Optional[nn.Module] = None, explain: bool = False):
    """Find FFN blocks in an already captured GraphModule (canonicalised here, in place).

    ``model`` is the module the graph was captured from; it resolves weight owners and is what
    :meth:`FFNMatch.dense_weights` reads by default (``gm`` itself when omitted: an unlifted
    export keeps the original fqns). Returns ``list[FFNMatch]`` in graph order, or a
    :class:`FindReport` with the rejected near-matches when ``explain=True``.
    """
    canonicalize(gm)
    matches, rejected = _Finder(gm, model).run()
    if explain:
        return FindReport(matches, rejected, gm.meta.get("moefx_capture"))
    return matches


def find_ffns(
    model: nn.Module,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
    explain: bool = False,
    leaf_modules: Sequence = (),
    dynamic: bool = False,
):
    """Capture ``model`` on the example inputs and find its dense FFN blocks.

    Returns ``list[FFNMatch]`` in graph order; with ``explain=True`` a :class:`FindReport`
    whose ``rejected`` lists each near-match that is not an FFN, with the reason. ``dynamic``
    captures with dynamic batch/sequence dimensions (:func:`moefx.capture`), for a graph that
    is rewritten and returned.
    """
    from ..capture import capture

    gm = capture(model, example_inputs, example_kwargs, leaf_modules=leaf_modules, dynamic=dynamic)
    return find_ffns_in_graph(gm, model=model, explain=explain)
