"""Canonicalisation passes: make every spelling of an FFN look the same before matching.

Each pass is a ``PassBase`` whose ``call(gm)`` rewrites the graph in place, preserves what the
graph computes (eval-mode dropout aside, which is the identity), and returns
``PassResult(gm, modified)``. Run them with :func:`canonicalize`, which uses the shared
:class:`~moefx.passes.manager.PassManager` (lint after each pass). All are idempotent.

- :class:`NormalizeTorchOps`  graphs from moefx's own fx tracer (the capture fallback) call
  ``nn.Linear``/HF ``Conv1D``/activation *modules*, ``torch``/``F`` functions and tensor methods;
  this rewrites them into the aten ops that ``torch.export`` produces, so one matcher serves both.
- :class:`RemoveEvalDropout`   ``dropout(x, p, train=False)`` is the identity: drop it.
- :class:`CanonicalizeLinear`  every affine map becomes ``aten.linear(x, W, b)``: 2-D transposes
  become ``aten.t``; ``addmm``/``mm``/``matmul`` by a weight become ``linear(x, t(W))``;
  ``linear(x, W) + b`` folds the bias; GPT-2 ``Conv1D``'s ``view -> addmm -> view`` becomes
  ``linear(x, t(W), b)``; ``t(t(W))`` becomes ``W``.
- :class:`CanonicalizeActivations`  any small single-input pointwise cone that evaluates to a
  known activation becomes one node (``aten.gelu(x, approximate="tanh")`` for HF
  ``NewGELUActivation``, ``quick_gelu`` for CLIP, ...); see :mod:`moefx.patterns.activations`.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..patterns import activations as acts
from ..patterns.common import (
    DROPOUTS,
    LINEAR,
    TRANSPOSE,
    aten,
    fetch_attr,
    is_call,
    tensor_shape,
)
from .manager import PassManager


def _replace(gm: fx.GraphModule, old: fx.Node, target, args, kwargs=None) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def _erase_if_dead(gm: fx.GraphModule, nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and n.graph is gm.graph and not n.users and n.op == "call_function":
            gm.graph.erase_node(n)


def _weight_source(node) -> Optional[fx.Node]:
    """The get_attr/placeholder a weight comes from, through transposes; None when computed."""
    while is_call(node, TRANSPOSE):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op in ("get_attr", "placeholder"):
        return node
    return None


# ---------------------------------------------------------------------------------------------
_HF_ACT_NAMES = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "ReLUActivation": "relu",
    "ReLUSquaredActivation": "relu2",
}


def _module_activation(mod: nn.Module) -> Optional[str]:
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.SiLU):
        return "silu"
    if isinstance(mod, nn.GELU):
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    return _HF_ACT_NAMES.get(type(mod).__name__)


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


_FUNCTION_MAP = {
    F.linear: aten.linear.default,
    torch._C._nn.linear: aten.linear.default,
    F.relu: aten.relu.default,
    torch.relu: aten.relu.default,
    F.silu: aten.silu.default,
    torch.sigmoid: aten.sigmoid.default,
    torch.tanh: aten.tanh.default,
    torch.erf: aten.erf.default,
    torch.exp: aten.exp.default,
    torch.pow: aten.pow.Tensor_Scalar,
    operator.pow: aten.pow.Tensor_Scalar,
    operator.mul: aten.mul.Tensor,
    torch.mul: aten.mul.Tensor,
    operator.add: aten.add.Tensor,
    torch.add: aten.add.Tensor,
    operator.sub: aten.sub.Tensor,
    operator.truediv: aten.div.Tensor,
    torch.matmul: aten.matmul.default,
    operator.matmul: aten.matmul.default,
    torch.mm: aten.mm.default,
    torch.addmm: aten.addmm.default,
    torch.t: aten.t.default,
    torch.chunk: aten.chunk.default,
}
_METHOD_MAP = {
    "relu": aten.relu.default,
    "sigmoid": aten.sigmoid.default,
    "tanh": aten.tanh.default,
    "exp": aten.exp.default,
    "mul": aten.mul.Tensor,
    "add": aten.add.Tensor,
    "matmul": aten.matmul.default,
    "mm": aten.mm.default,
    "t": aten.t.default,
    "chunk": aten.chunk.default,
    "contiguous": aten.contiguous.default,
    "pow": aten.pow.Tensor_Scalar,
}


class NormalizeTorchOps(PassBase):
    """Rewrite module calls, torch functions and tensor methods (fx-tracer graphs) into aten."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                mod = fetch_attr(gm, node.target)
                if mod is None:
                    continue
                if isinstance(mod, nn.Linear) or _is_conv1d(mod):
                    self._lower_linear(gm, node, mod)
                    modified = True
                elif isinstance(mod, nn.Dropout):
                    _replace(gm, node, aten.dropout.default, (node.args[0], mod.p, mod.training))
                    modified = True
                else:
                    name = _module_activation(mod)
                    if name is not None:
                        target, extra, kwargs = acts.canonical_call(name)
                        _replace(gm, node, target, (node.args[0], *extra), kwargs)
                        modified = True
            elif node.op == "call_function":
                modified |= self._function(gm, node)
            elif node.op == "call_method":
                target = _METHOD_MAP.get(node.target)
                if target is not None:
                    _replace(gm, node, target, node.args, node.kwargs)
                    modified = True
                elif node.target == "split" and isinstance(node.args[1] if len(node.args) > 1 else
                                                           node.kwargs.get("split_size"), int):
                    _replace(gm, node, aten.split.Tensor, node.args, node.kwargs)
                    modified = True
        if modified:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified)

    @staticmethod
    def _lower_linear(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> None:
        prefix = node.target
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{prefix}.weight")
            if _is_conv1d(mod):
                w = gm.graph.call_function(aten.t.default, (w,))
            b = gm.graph.get_attr(f"{prefix}.bias") if getattr(mod, "bias", None) is not None else None
        args = (node.args[0], w) if b is None else (node.args[0], w, b)
        stack = dict(node.meta.get("nn_module_stack") or {})
        stack.setdefault(prefix, (prefix, f"{type(mod).__module__}.{type(mod).__qualname__}"))
        new = _replace(gm, node, aten.linear.default, args)
        new.meta["nn_module_stack"] = stack
        if w.op != "get_attr":
            w.meta["nn_module_stack"] = stack

    @staticmethod
    def _function(gm: fx.GraphModule, node: fx.Node) -> bool:
        t = node.target
        if t is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            kwargs = {"approximate": "tanh"} if approx == "tanh" else {}
            _replace(gm, node, aten.gelu.default, (node.args[0],), kwargs)
            return True
        if t is F.dropout:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            train = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            _replace(gm, node, aten.dropout.default, (node.args[0], p, train))
            return True
        if t is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            _replace(gm, node, aten.t.default, (node.args[0],))
            return True
        if t is torch.split and isinstance(node.args[1] if len(node.args) > 1 else None, int):
            _replace(gm, node, aten.split.Tensor, node.args, node.kwargs)
            return True
        target = _FUNCTION_MAP.get(t) if _hashable(t) else None
        if target is None:
            return False
        kwargs = dict(node.kwargs)
        if target is aten.linear.default:
            args = list(node.args) + [kwargs.pop(k) for k in ("weight", "bias") if k in kwargs]
            _replace(gm, node, target, args)
            return True
        _replace(gm, node, target, node.args, kwargs)
        return True


def _hashable(x) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------
class RemoveEvalDropout(PassBase):
    """``dropout(x, p, train=False)`` is the identity; removing it makes blocks contiguous."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if is_call(node, DROPOUTS):
                train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
                if train is False:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    modified = True
        return PassResult(gm, modified)


# ---------------------------------------------------------------------------------------------
class CanonicalizeLinear(PassBase):
    """Turn every affine map into ``aten.linear(x, W, b)`` (see the module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for rule in (self._transposes, self._matmuls, self._fold_views, self._fold_bias,
                     self._double_transpose):
            modified |= rule(gm)
        if modified:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified)

    @staticmethod
    def _transposes(gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            src = node.args[0] if node.args else None
            shape = tensor_shape(src, gm)
            if shape is None or len(shape) != 2:
                continue
            t = node.target
            is_t = t in (aten.numpy_T.default, aten.mT.default if hasattr(aten, "mT") else None)
            if t is aten.transpose.int:
                dims = {d % 2 for d in node.args[1:3]}
                is_t = dims == {0, 1}
            elif t is aten.permute.default:
                is_t = list(node.args[1]) in ([1, 0], [-1, -2], [-1, 0], [1, -2])
            if is_t:
                _replace(gm, node, aten.t.default, (src,))
                modified = True
        return modified

    @staticmethod
    def _matmuls(gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            t = node.target
            if t is aten.addmm.default:
                bias, x, w = node.args[:3]
                beta = node.kwargs.get("beta", 1)
                alpha = node.kwargs.get("alpha", 1)
                if beta != 1 or alpha != 1 or _weight_source(w) is None:
                    continue
                bshape = tensor_shape(bias, gm)
                if bshape is None or len(bshape) != 1:
                    continue
                with gm.graph.inserting_before(node):
                    wt = gm.graph.call_function(aten.t.default, (w,))
                _replace(gm, node, aten.linear.default, (x, wt, bias))
                modified = True
            elif t in (aten.mm.default, aten.matmul.default):
                x, w = node.args[:2]
                wshape = tensor_shape(w, gm)
                if _weight_source(w) is None or wshape is None or len(wshape) != 2:
                    continue
                with gm.graph.inserting_before(node):
                    wt = gm.graph.call_function(aten.t.default, (w,))
                _replace(gm, node, aten.linear.default, (x, wt))
                modified = True
        return modified

    @staticmethod
    def _fold_views(gm: fx.GraphModule) -> bool:
        """``view(x, [-1, in]) -> linear -> view(.., x.shape[:-1] + [out])`` is ``linear(x)``."""
        views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
        modified = False
        for node in list(gm.graph.nodes):
            if not is_call(node, LINEAR):
                continue
            inner = node.args[0]
            if not is_call(inner, views) or len(inner.users) != 1 or len(node.users) != 1:
                continue
            outer = next(iter(node.users))
            if not is_call(outer, views):
                continue
            x = inner.args[0]
            xs, ins, outs, lin = (tensor_shape(x, gm), tensor_shape(inner, gm),
                                  tensor_shape(outer, gm), tensor_shape(node, gm))
            if None in (xs, ins, outs, lin) or len(ins) != 2 or len(xs) < 1:
                continue
            if ins[-1] != xs[-1] or math.prod(xs[:-1]) != ins[0] or tuple(outs) != tuple(xs[:-1]) + (lin[-1],):
                continue
            new = _replace(gm, outer, aten.linear.default, (x, *node.args[1:]))
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", outer.meta.get("nn_module_stack"))
            gm.graph.erase_node(node)
            gm.graph.erase_node(inner)
            modified = True
        return modified

    @staticmethod
    def _fold_bias(gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if not is_call(node, (aten.add.Tensor,)) or node.kwargs.get("alpha", 1) != 1:
                continue
            a, b = node.args[:2]
            for lin, bias in ((a, b), (b, a)):
                if not (is_call(lin, LINEAR) and len(lin.args) == 2 and len(lin.users) == 1):
                    continue
                if not isinstance(bias, fx.Node) or bias.op not in ("get_attr", "placeholder"):
                    continue
                bshape, lshape = tensor_shape(bias, gm), tensor_shape(lin, gm)
                if bshape is None or lshape is None or len(bshape) != 1 or bshape[0] != lshape[-1]:
                    continue
                new = _replace(gm, node, aten.linear.default, (*lin.args, bias))
                new.meta["nn_module_stack"] = lin.meta.get("nn_module_stack", new.meta.get("nn_module_stack"))
                gm.graph.erase_node(lin)
                modified = True
                break
        return modified

    @staticmethod
    def _double_transpose(gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if is_call(node, TRANSPOSE) and is_call(node.args[0], TRANSPOSE):
                inner = node.args[0]
                node.replace_all_uses_with(inner.args[0])
                gm.graph.erase_node(node)
                _erase_if_dead(gm, [inner])
                modified = True
        return modified


# ---------------------------------------------------------------------------------------------
class CanonicalizeActivations(PassBase):
    """Replace each spelled-out activation (a pointwise cone of one input) with one node.

    Cones are tried from the last node backwards so the largest formula wins; a cone whose inner
    nodes are used outside it is left alone (replacing it would change those users).
    """

    max_cone = acts.MAX_CONE

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        consumed: set = set()
        self._order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in reversed(list(gm.graph.nodes)):
            if node in consumed or node.graph is not gm.graph:
                continue
            if not is_call(node, acts.POINTWISE):
                continue
            cone = self._cone(node)
            if cone is None:
                continue
            members, x = cone
            if len(members) == 1 and acts.activation_of(node) is not None:
                continue
            inner = set(members) - {node}
            if any(u not in members for m in inner for u in m.users):
                continue
            name = self._evaluate(members, x)
            if name is None:
                continue
            target, extra, kwargs = acts.canonical_call(name)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(target, (x, *extra), kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            for m in reversed(members):
                if not m.users:
                    gm.graph.erase_node(m)
            consumed.update(members)
            modified = True
        return PassResult(gm, modified)

    def _cone(self, root: fx.Node):
        """Nodes of the pointwise cone ending at ``root`` in graph order, and its one input."""
        cone = acts.pointwise_cone(root, self.max_cone)
        if cone is None:
            return None
        members, x = cone
        members.sort(key=self._order.__getitem__)
        return members, x

    @staticmethod
    def _evaluate(members: list, x: fx.Node) -> Optional[str]:
        env = {x: acts.PROBE}

        def value(a):
            return env[a] if isinstance(a, fx.Node) else a

        try:
            for m in members:
                args = [value(a) for a in m.args]
                kwargs = {k: value(v) for k, v in m.kwargs.items()}
                env[m] = m.target(*args, **kwargs)
        except Exception:
            return None
        out = env[members[-1]]
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float64:
            return None
        return acts.identify(out)


#: The canonicalisation pipeline, in order.
def default_passes() -> list:
    return [NormalizeTorchOps(), RemoveEvalDropout(), CanonicalizeLinear(), CanonicalizeActivations()]


def canonicalize(gm: fx.GraphModule, verbose: bool = False) -> PassResult:
    """Run the canonicalisation passes on ``gm`` in place (idempotent)."""
    return PassManager(default_passes(), verbose=verbose).run(gm)
