"""Putting MoE layers where dense FFNs were: module swaps when possible, graph edits otherwise.

Three placements, most useful first, so that the user's model stays the user's model:

1. ``module``: the match's ``path`` module computes exactly ``x -> FFN(x)``
   (``match.module_exact``): replace that submodule (a Hugging Face model keeps
   ``forward(labels=...)`` and ``generate``). ``path == ""`` means the whole model is the FFN:
   the MoE layer itself is the result.
2. ``chain``: the block is a chain of whole submodules called one after the other inside a
   parent's forward (BERT/ViT ``intermediate`` = Linear+act then ``output.dense``; OPT ``fc1``,
   ``activation_fn``, ``fc2``): the first module becomes the MoE layer, the others
   ``nn.Identity``. Checked on the graph: every node of each module is inside the block, each
   module reads only the previous one's output, and the last one produces the block's output.
3. ``graph``: anything else (an FFN written functionally inside a bigger forward). The
   captured GraphModule is edited: a ``call_module`` to the new layer is inserted before the
   block's output, uses are redirected, the dead block removed, the graph linted and
   recompiled. If any selected block needs this, all are placed in the graph, and the
   GraphModule is returned.

Selection: ``filter_fn(module, fqn)`` is asked with the module at the match's ``path`` (the
model itself for functional blocks, with ``fqn`` the match name) and ``configs`` may map a
path (or match name) to its own config; a path absent from the map is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch.fx as fx
from torch import nn

from ..config import SliceMoEConfig, XMoEConfig

Config = Union[XMoEConfig, SliceMoEConfig]


class ConversionError(ValueError):
    """The model cannot be converted as asked; the message says where and what to do."""


@dataclass
class Placement:
    match: object
    how: str  # "module" | "chain" | "graph"
    chain: Optional[List[str]] = None


def _parent(model: nn.Module, fqn: str):
    parent_name, _, attr = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, attr = _parent(model, fqn)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _stack_paths(node: fx.Node) -> List[str]:
    from ..patterns.common import module_stack

    return [p for p, _ in module_stack(node)]


def _compute_nodes(nodes) -> List[fx.Node]:
    from ..patterns.common import is_meta_only

    return [n for n in nodes if not is_meta_only(n)]


def find_chain(match) -> Optional[List[str]]:
    """The ordered submodule paths forming the block (see the module docstring), or None."""
    gm = match.graph_module
    if gm is None or match.path is None:
        return None
    block = set(_compute_nodes(match.nodes))
    if not block:
        return None
    from ..patterns.common import is_meta_only

    prefix = match.path + "." if match.path else ""
    members: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        if is_meta_only(n):
            continue
        for p in _stack_paths(n):
            members.setdefault(p, []).append(n)
    order: List[str] = []
    for n in gm.graph.nodes:
        if n not in block:
            continue
        paths = [p for p in _stack_paths(n) if p.startswith(prefix) and p != match.path]
        whole = [p for p in paths if all(x in block for x in members[p])]
        if not whole:
            return None  # written in the parent's own forward, or in a module doing more
        if whole[0] not in order:
            order.append(whole[0])
    prev_out = match.input_node
    for i, p in enumerate(order):
        inside = set(members[p])
        ext = {a for n in inside for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        if ext != {prev_out}:
            return None
        outs = [n for n in inside if any(u not in inside for u in n.users)]
        if len(outs) != 1:
            return None
        prev_out = outs[0]
    if prev_out is not match.output_node:
        return None
    return order


def plan(matches) -> List[Placement]:
    out = []
    for m in matches:
        if m.module_exact and m.path is not None:
            out.append(Placement(m, "module"))
            continue
        chain = find_chain(m)
        out.append(Placement(m, "chain", chain) if chain else Placement(m, "graph"))
    return out


def select(
    model: nn.Module,
    matches,
    config: Union[Config, Dict[str, Config]],
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
):
    """``[(match, config)]`` for the blocks chosen by ``filter_fn`` and the config map."""
    chosen = []
    for m in matches:
        fqn = m.path if m.path is not None else m.name
        if isinstance(config, dict):
            cfg = config.get(fqn, config.get(m.name))
            if cfg is None:
                continue
        else:
            cfg = config
        if filter_fn is not None:
            module = model.get_submodule(m.path) if m.path else model
            if not filter_fn(module, fqn):
                continue
        chosen.append((m, cfg))
    return chosen


def graph_replace(gm: fx.GraphModule, match, layer: nn.Module, name: str) -> None:
    """Replace the block's nodes in ``gm`` by one ``call_module`` to ``layer`` (registered as
    ``name``, or already there under it: one layer may serve several call sites)."""
    if getattr(gm, name, None) is not layer:
        gm.add_submodule(name, layer)
    graph = gm.graph
    with graph.inserting_before(match.output_node):
        new = graph.call_module(name, (match.input_node,))
    new.meta = dict(match.output_node.meta)
    new.meta.pop("moefx", None)
    new.meta["moefx_layer"] = type(layer).__name__
    match.output_node.replace_all_uses_with(new)
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def occurrences(matches) -> dict:
    """``{id(match): (name, k)}``: the k-th block of that name in graph order (a block called at
    several places has one name per call)."""
    seen: dict = {}
    keys = {}
    for m in matches:
        k = seen.get(m.name, 0)
        seen[m.name] = k + 1
        keys[id(m)] = (m.name, k)
    return keys


def drop_unused_weights(gm: fx.GraphModule, fqns) -> None:
    """Delete from ``gm`` the dense weights ``fqns`` that no node reads any more (the rewritten
    blocks' own copies live in their MoE layers): a GraphModule result would otherwise carry
    every converted FFN twice."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for fqn in dict.fromkeys(fqns):
        if fqn in used:
            continue
        owner_path, _, attr = fqn.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:  # the graph reads it under another path, or not at all
            continue
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    gm.delete_all_unused_submodules()


def unique_name(gm: nn.Module, base: str) -> str:
    import re

    base = re.sub(r"\W", "_", base) or "root"
    name, i = base, 1
    while hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, tolerating exported GraphModules, which refuse ``eval()``
    (their dropout and batch-norm are already fixed at capture)."""
    try:
        model.train(training)
    except NotImplementedError:
        for m in model.modules():
            if m is not model:
                try:
                    m.train(training)
                except NotImplementedError:
                    pass


def replace_forwards(modules: Dict[str, nn.Module], forwards: Dict[str, Callable]) -> Dict[str, Optional[Callable]]:
    """Set ``modules[name].forward = forwards[name]`` for each name of ``forwards``, as an instance
    attribute (``__call__`` and the module's hooks run as before); returns what
    :func:`restore_forwards` puts back."""
    saved = {}
    for name, forward in forwards.items():
        saved[name] = modules[name].__dict__.get("forward")
        modules[name].forward = forward
    return saved


def restore_forwards(modules: Dict[str, nn.Module], saved: Dict[str, Optional[Callable]]) -> None:
    """Undo :func:`replace_forwards`: each module's own ``forward`` (or the instance attribute it
    had before) comes back."""
    for name, forward in saved.items():
        if forward is None:
            modules[name].__dict__.pop("forward", None)
        else:
            modules[name].forward = forward
