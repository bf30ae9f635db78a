"""Graph vocabulary shared by the canonicalisation passes and the FFN patterns.

After canonicalisation every graph moefx matches on speaks one dialect: ``aten.linear.default``
for every affine map (nn.Linear, GPT-2 Conv1D, ``F.linear``, ``x @ W.T + b``, ``addmm``/``mm``),
``aten.t.default`` for every 2-D transpose, and one node per activation (see
:mod:`moefx.patterns.activations`). The helpers here read that dialect.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

LINEAR = (aten.linear.default,)
TRANSPOSE = (aten.t.default,)
SPLITS = (aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default, aten.unsafe_split.Tensor,
          aten.unsafe_chunk.default)
DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
#: Ops that pass a tensor through unchanged in value (eval dropout, copies, aliases); the matcher
#: walks through them and counts them as part of the block they sit in.
TRANSPARENT = DROPOUTS + (
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
)
#: Nodes that assert or read metadata only; they never count as computation of a module.
META_ONLY = (
    aten._assert_tensor_metadata.default,
    aten.sym_size.int,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
)


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_getitem(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


def is_transparent(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in TRANSPARENT:
        return True
    if node.target in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default):
        src, dst = tensor_dtype(node.args[0]), tensor_dtype(node)
        return src is not None and src == dst
    return False


def is_meta_only(node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return True
    return node.op == "call_function" and node.target in META_ONLY


def strip_back(node, through: Optional[list] = None):
    """Follow ``node`` back through transparent ops; collect the skipped nodes in ``through``."""
    while is_transparent(node):
        if through is not None:
            through.append(node)
        node = node.args[0]
    return node


def tensor_meta(node):
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm
    return None


def tensor_shape(node, gm: Optional[fx.GraphModule] = None) -> Optional[tuple]:
    """Static shape of the tensor a node produces, from export's ``val`` or ShapeProp's
    ``tensor_meta``, or from the attribute itself for ``get_attr``; None when unknown or
    symbolic."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and gm is not None:
        t = fetch_attr(gm, node.target)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    meta = tensor_meta(node)
    if meta is None:
        return None
    try:
        return tuple(int(s) for s in meta.shape)
    except (TypeError, ValueError):
        return None


def tensor_dtype(node):
    meta = tensor_meta(node)
    return getattr(meta, "dtype", None)


def fetch_attr(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(fqn, type name), ...]`` outermost first, from ``nn_module_stack`` (export and the fx
    tracer both record it); the root module is written ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, typ = value[0], value[1]
        path = _clean_path(path)
        typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        out.append((path, typ))
    return out


def _clean_path(path: str) -> str:
    """Export writes plain fqns; dynamo-style stacks write ``L['self'].a.b[0]``: normalise."""
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def users_outside(nodes: Iterable[fx.Node], allowed: set) -> list[tuple[fx.Node, fx.Node]]:
    out = []
    for n in nodes:
        for u in n.users:
            if u not in allowed:
                out.append((n, u))
    return out
