"""A small pass manager shared by every moefx room.

torch's own ``torch.fx.passes.infra.pass_manager.PassManager`` handles ordering constraints we do
not need and does not report what each pass changed; this one keeps the interface to one call,
``PassManager(passes, verbose=False).run(gm) -> PassResult``, lints the graph after every pass
(so a broken rewrite fails at the pass that broke it, not three passes later), recompiles the
module when a pass changed it, and keeps a per-pass log (``manager.log``) that the CLI and the
tests can read.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Callable, Sequence, Union

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

PassLike = Union[PassBase, Callable[[fx.GraphModule], "PassResult | None"]]


class PassError(RuntimeError):
    """A pass failed or left an invalid graph; the message names the pass."""


@dataclasses.dataclass
class PassLogEntry:
    """What one pass did: whether it said it modified the graph and how the op counts moved."""

    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    added: dict
    removed: dict

    def __str__(self) -> str:
        if not self.modified:
            return f"{self.name}: unchanged ({self.seconds * 1e3:.1f} ms)"
        delta = []
        for key, n in sorted(self.removed.items()):
            delta.append(f"-{n} {key}")
        for key, n in sorted(self.added.items()):
            delta.append(f"+{n} {key}")
        return (
            f"{self.name}: {self.nodes_before} -> {self.nodes_after} nodes"
            f" ({', '.join(delta) or 'same ops, rewired'}; {self.seconds * 1e3:.1f} ms)"
        )


def pass_name(p: PassLike) -> str:
    if isinstance(p, PassBase):
        return getattr(p, "name", None) or type(p).__name__
    return getattr(p, "__name__", type(p).__name__)


def _op_key(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        try:
            return f"call_module:{type(gm.get_submodule(node.target)).__name__}"
        except AttributeError:
            return "call_module:?"
    if node.op in ("call_function", "call_method"):
        target = node.target
        name = getattr(target, "__name__", None) or str(target)
        if hasattr(target, "_schema"):
            name = str(target)
        return f"{node.op}:{name}"
    return node.op


def _op_counts(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(_op_key(gm, n) for n in gm.graph.nodes)


class PassManager:
    """Run passes in order on one GraphModule; lint after each; log what changed.

    ``run`` returns ``PassResult(gm, modified)`` where ``modified`` is true when any pass changed
    the graph. A pass may return ``None`` (treated as "unchanged") or a ``PassResult`` whose
    ``graph_module`` replaces the current one for the following passes.
    """

    def __init__(self, passes: Sequence[PassLike], verbose: bool = False, stream=None) -> None:
        self.passes = list(passes)
        self.verbose = verbose
        self.stream = stream
        self.log: list[PassLogEntry] = []

    def run(self, gm: fx.GraphModule) -> PassResult:
        any_modified = False
        for p in self.passes:
            name = pass_name(p)
            before = _op_counts(gm)
            n_before = len(gm.graph.nodes)
            start = time.perf_counter()
            try:
                result = p(gm)
            except Exception as err:
                raise PassError(f"pass {name} failed: {type(err).__name__}: {err}") from err
            seconds = time.perf_counter() - start
            if result is not None:
                gm = result.graph_module
            modified = bool(result is not None and result.modified)
            try:
                gm.graph.lint()
            except Exception as err:
                raise PassError(
                    f"pass {name} left an invalid graph: {err}; the pass has a bug, "
                    "report it with the model that triggered it"
                ) from err
            if modified:
                gm.recompile()
                any_modified = True
            after = _op_counts(gm)
            entry = PassLogEntry(
                name=name,
                modified=modified,
                seconds=seconds,
                nodes_before=n_before,
                nodes_after=len(gm.graph.nodes),
                added=dict(after - before),
                removed=dict(before - after),
            )
            self.log.append(entry)
            if self.verbose:
                print(f"[moefx] {entry}", file=self.stream or sys.stderr)
        return PassResult(gm, any_modified)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.run(gm)
