"""``lower``: inline each MoE layer of a GraphModule into primitive moefx ops.

Two forms are lowered:

- a ``call_module`` of an :class:`~moefx.layers.XMoE` or :class:`~moefx.layers.SliceMoE` (a graph
  traced with the layers as leaf modules, as :func:`moefx.passes.optimize.optimize` does): the
  routing and the expert compute become the primitive chain of :mod:`moefx.kernels.primitives`;
- a ``moefx::moe_ffn`` call (a graph captured with ``torch.export``, where the layers are
  already inlined into ops): its expert compute becomes the primitive chain, and each
  ``moefx::xmoe_select`` becomes ``select_experts`` (the router's ``aten`` linear and softmax
  stay as captured; ``fuse_router`` matches that form too).

Only eval-mode layers are lowered: the primitives reproduce inference routing, not cross-slice
dropout or the auxiliary losses. A training-mode layer is left as it is and the record says why.
The layer's parameters are read through ``get_attr`` nodes, so the lowered graph shares them
with the module (no copy). The helpers at the bottom (op matching, the fusion-pass base class)
are shared by the ``fuse_*`` passes.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.kernels import fused as _fused  # noqa: F401  (registers the fused ops)
from moefx.kernels import primitives as _prims  # noqa: F401  (registers the primitive ops)
from moefx.kernels.triton_moe import choose_block_m
from moefx.layers import SliceMoE, XMoE

OPS = torch.ops.moefx


# ------------------------------------------------------------------ matching helpers


def is_op(node: Any, name: str) -> bool:
    """Whether ``node`` calls ``moefx::name`` (the packet or its ``.default`` overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    packet = getattr(OPS, name)
    return node.target is packet or node.target is packet.default


def op_args(node: fx.Node) -> dict:
    """The arguments of a moefx op call by schema name, positional or keyword."""
    schema = node.target._schema if hasattr(node.target, "_schema") else node.target.default._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def getitem_of(node: Any) -> Optional[tuple[fx.Node, int]]:
    """``(source, index)`` when ``node`` is ``source[index]``, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return None


def same_dispatch(sorted_slot: Any, block_expert: Any) -> bool:
    """Both tensors come from one ``moefx::dispatch`` call (outputs 0 and 1)."""
    a, b = getitem_of(sorted_slot), getitem_of(block_expert)
    return bool(a and b and a[0] is b[0] and a[1] == 0 and b[1] == 1 and is_op(a[0], "dispatch"))


def tensor_shape(gm: fx.GraphModule, node: Any) -> Optional[tuple]:
    """The shape of the tensor a node yields, from the module (``get_attr``) or from the
    ``val`` / ``tensor_meta`` metadata that export and ShapeProp leave; None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return tuple(obj.shape) if isinstance(obj, torch.Tensor) else None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    return None


def where(node: fx.Node) -> str:
    """Where a node came from, for the record: the MoE layer's module path when known."""
    layer = node.meta.get("moefx_layer")
    return f"layer '{layer}' (node {node.name})" if layer else f"node {node.name}"


class FusionPass(PassBase):
    """A pass that walks the graph once and rewrites every match of :meth:`rewrite`, keeping
    a readable line per rewrite (or per refusal worth reporting) in ``self.fired``."""

    name = "fusion"

    def __init__(self) -> None:
        super().__init__()
        self.fired: list[str] = []

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or getattr(node, "_erased", False):
                continue
            if self.rewrite(gm, node):
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def single_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


# ------------------------------------------------------------------ emission


class _Emitter:
    """Appends nodes before ``anchor``, tagging each with the layer it was lowered from."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, layer: str) -> None:
        self.graph = graph
        self.anchor = anchor
        self.layer = layer

    def _tag(self, node: fx.Node) -> fx.Node:
        node.meta["moefx_layer"] = self.layer
        return node

    def op(self, name: str, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.call_function(getattr(OPS, name).default, args))

    def fn(self, target: Callable, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.call_function(target, args))

    def method(self, name: str, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.call_method(name, args))

    def items(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self.fn(operator.getitem, node, i) for i in range(n)]

    def attr(self, module_path: str, name: str, module: torch.nn.Module) -> Optional[fx.Node]:
        if getattr(module, name, None) is None:
            return None
        target = f"{module_path}.{name}" if module_path else name
        with self.graph.inserting_before(self.anchor):
            return self._tag(self.graph.get_attr(target))


def emit_experts(em: _Emitter, x2d, idx, weight, w1, b1, w3, b3, w2, b2, activation: str,
                 scale_input: bool, apply_weight: bool, num_experts: int, block_m: int) -> fx.Node:
    """The expert half of an MoE layer as primitives; returns the ``[N, d]`` result node."""
    sorted_slot, block_expert = em.items(em.op("dispatch", idx, num_experts, block_m), 2)
    rows = em.op("gather_rows", x2d, sorted_slot, weight, scale_input)
    hidden = em.op("activation", em.op("grouped_gemm", rows, block_expert, w1, b1), activation)
    if w3 is not None:
        hidden = em.op("glu_mul", hidden, em.op("grouped_gemm", rows, block_expert, w3, b3))
    out = em.op("grouped_gemm", hidden, block_expert, w2, b2)
    return em.op("combine", out, sorted_slot, weight, apply_weight)


def _num_tokens(node: Any) -> Optional[int]:
    shape = None
    if isinstance(node, fx.Node):
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        n = 1
        for s in shape[:-1]:
            n *= int(s)
        return n
    except TypeError:
        return None


class LowerMoE(PassBase):
    """Inline MoE layers (and ``moefx::moe_ffn`` calls) into primitive moefx ops.

    ``block_m`` fixes the rows per block of the grouped layout; None picks it per layer: 1 for
    weights off the GPU (no padding), else from the example batch recorded in the node
    metadata (16 when none is recorded). The Triton kernels need at least 16: a graph lowered
    for the CPU and moved to CUDA runs its grouped ops on the PyTorch path.
    """

    name = "lower"

    def __init__(self, block_m: Optional[int] = None) -> None:
        super().__init__()
        if block_m is not None and (not isinstance(block_m, int) or block_m < 1):
            raise ValueError(f"LowerMoE: block_m must be a positive integer or None, got {block_m!r}")
        self.block_m = block_m
        self.fired: list[str] = []

    def _block_m(self, node: fx.Node, slots_per_token: int, num_experts: int, device) -> int:
        """Rows per block: 1 (no padding at all) for weights off the GPU, where the PyTorch
        kernels gain nothing from padded tiles; else sized from the example batch."""
        if self.block_m is not None:
            return self.block_m
        if device is not None and torch.device(device).type != "cuda":
            return 1
        T = _num_tokens(node)
        return 16 if T is None else choose_block_m(T * slots_per_token, num_experts)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if isinstance(module, (XMoE, SliceMoE)):
                    modified |= self._lower_layer(gm, node, module)
            elif is_op(node, "moe_ffn"):
                modified |= self._lower_moe_ffn(gm, node)
            elif is_op(node, "xmoe_select"):
                modified |= self._lower_select(gm, node)
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _layer_input(self, node: fx.Node, module) -> fx.Node:
        if len(node.args) == 1 and not node.kwargs:
            return node.args[0]
        if not node.args and set(node.kwargs) == {"x"}:
            return node.kwargs["x"]
        raise ValueError(
            f"lower: {type(module).__name__} at '{node.target}' (node {node.name}) is called with "
            f"args={node.args!r} kwargs={dict(node.kwargs)!r}; it takes exactly one input tensor x"
        )

    def _lower_layer(self, gm: fx.GraphModule, node: fx.Node, module) -> bool:
        path = node.target
        kind = type(module).__name__
        if module.training:
            self.fired.append(
                f"lower: skipped {kind} at '{path}': the module is in training mode; lowering "
                "reproduces eval-mode routing only (call model.eval() first)"
            )
            return False
        x = self._layer_input(node, module)
        em = _Emitter(gm.graph, node, path)
        n_before = len(gm.graph.nodes)
        if isinstance(module, XMoE):
            out = self._emit_xmoe(em, x, module, path, node)
        else:
            out = self._emit_slicemoe(em, x, module, path, node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        self.fired.append(
            f"lower: {kind} at '{path}' -> {len(gm.graph.nodes) - n_before + 1} nodes of primitive ops"
        )
        return True

    def _emit_xmoe(self, em: _Emitter, x, m: XMoE, path: str, node: fx.Node) -> fx.Node:
        cfg = m.config
        E = cfg.num_experts
        x2d = em.method("reshape", x, (-1, m.d_model))
        logits = em.op("router_linear", x2d, em.attr(f"{path}.router", "weight", m.router), None)
        probs = em.op("router_softmax", logits)
        threshold = float(cfg.threshold) if cfg.threshold is not None else 0.0
        idx, weight = em.items(
            em.op("select_experts", probs, threshold, cfg.top_k or 0, cfg.max_experts or 0, False), 2)
        if cfg.capacity_factor is not None:
            idx, weight = em.items(em.op("apply_capacity", idx, weight, E, float(cfg.capacity_factor)), 2)
        if m.combine == "unit":
            weight = em.op("unit_weights", idx, weight)
        p = {n: em.attr(path, n, m) for n in ("w1", "b1", "w3", "b3", "w2")}
        y = emit_experts(em, x2d, idx, weight, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], None,
                         m.activation, False, True, E,
                         self._block_m(x, cfg.max_selected, E, m.w1.device))
        if cfg.num_shared:
            s = {n: em.attr(path, f"shared_{n}", m) for n in ("w1", "b1", "w3", "b3", "w2")}
            hid = em.op("activation", em.fn(torch.nn.functional.linear, x2d, s["w1"], s["b1"]), m.activation)
            if s["w3"] is not None:
                hid = em.op("glu_mul", hid, em.fn(torch.nn.functional.linear, x2d, s["w3"], s["b3"]))
            y = em.fn(operator.add, y, em.fn(torch.nn.functional.linear, hid, s["w2"], None))
        bias = em.attr(path, "bias", m)
        if bias is not None:
            y = em.fn(operator.add, y, bias)
        return em.method("reshape_as", y, x)

    def _emit_slicemoe(self, em: _Emitter, x, m: SliceMoE, path: str, node: fx.Node) -> fx.Node:
        cfg = m.config
        E = cfg.num_experts
        if not (isinstance(m.router, torch.nn.Sequential) and len(m.router) == 3
                and isinstance(m.router[0], torch.nn.Linear) and isinstance(m.router[1], torch.nn.ReLU)
                and isinstance(m.router[2], torch.nn.Linear)):
            raise ValueError(
                f"lower: SliceMoE at '{path}' has router {m.router!r}; lowering expects "
                "Sequential(Linear, ReLU, Linear) (docs/ARCHITECTURE.md)"
            )
        slices = em.method("reshape", x, (-1, m.slice_dim))
        hid = em.op("router_linear", slices, em.attr(f"{path}.router.0", "weight", m.router[0]),
                    em.attr(f"{path}.router.0", "bias", m.router[0]))
        hid = em.fn(torch.relu, hid)
        logits = em.op("router_linear", hid, em.attr(f"{path}.router.2", "weight", m.router[2]),
                       em.attr(f"{path}.router.2", "bias", m.router[2]))
        probs = em.op("router_softmax", logits)
        idx, weight = em.items(em.op("select_experts", probs, 0.0, cfg.top_k, 0, True), 2)
        p = {n: em.attr(path, n, m) for n in ("w1", "b1", "w3", "b3", "w2", "b2")}
        gate_input = cfg.gate == "input"
        y = emit_experts(em, slices, idx, weight, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"],
                         p["b2"], m.activation, gate_input, not gate_input, E,
                         self._block_m(x, cfg.num_slices * cfg.top_k, E, m.w1.device))
        return em.method("reshape_as", y, x)

    def _lower_moe_ffn(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        a = op_args(node)
        w1_shape = tensor_shape(gm, a["w1"])
        if w1_shape is None:
            self.fired.append(
                f"lower: skipped moefx::moe_ffn at {where(node)}: the number of experts is unknown "
                "(w1 has no shape metadata; capture with torch.export or run ShapeProp first)"
            )
            return False
        if not isinstance(a["activation"], str) or not isinstance(a["gate_input"], bool):
            self.fired.append(f"lower: skipped moefx::moe_ffn at {where(node)}: non-constant activation/gate_input")
            return False
        E = int(w1_shape[0])
        idx_shape = tensor_shape(gm, a["idx"])
        K = int(idx_shape[1]) if idx_shape is not None else 1
        layer = node.meta.get("moefx_layer") or _module_path(node) or node.name
        em = _Emitter(gm.graph, node, layer)
        y = emit_experts(em, a["x"], a["idx"], a["weight"], a["w1"], a["b1"], a["w3"], a["b3"],
                         a["w2"], a["b2"], a["activation"], a["gate_input"], not a["gate_input"], E,
                         self._block_m(a["x"], K, E, _device_of(gm, a["w1"])))
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        self.fired.append(f"lower: moefx::moe_ffn at {where(y)} -> primitive expert ops")
        return True


    def _lower_select(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        a = op_args(node)
        with gm.graph.inserting_before(node):
            sel = gm.graph.call_function(OPS.select_experts.default, (
                a["probs"], a["threshold"], a["top_k"], a["max_experts"], False))
        sel.meta.update(node.meta)
        sel.meta.setdefault("moefx_layer", _module_path(node))
        node.replace_all_uses_with(sel)
        gm.graph.erase_node(node)
        self.fired.append(f"lower: moefx::xmoe_select at {where(sel)} -> select_experts")
        return True


def _device_of(gm: fx.GraphModule, node: Any):
    """The device of the tensor a node yields, when the module or the metadata tells."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj.device if isinstance(obj, torch.Tensor) else None
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else None


def _module_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def lower(gm: fx.GraphModule, block_m: Optional[int] = None) -> fx.GraphModule:
    """Run :class:`LowerMoE` on ``gm`` (in place) and return it."""
    return LowerMoE(block_m)(gm).graph_module
