"""``moefx.optimize(model, example_inputs)``: lower every MoE layer and run every fusion.

The model is traced with the MoE layers as leaf modules (``torch.fx`` symbolic tracing), or,
where the model does not trace symbolically (most Hugging Face models), captured with
:func:`moefx.capture` (``torch.export``), in which case the layers' ``moefx::moe_ffn`` calls are
lowered instead. A GraphModule is optimised on a copy of its graph; the parameters are shared,
never copied.

The returned GraphModule carries ``moefx_record`` (an :class:`OptimizeRecord`): every rewrite
that fired, where (layer path and node), every place a fusion declined and why, and the node
counts each pass changed. ``verbose=True`` prints it.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Optional, Sequence

import torch
import torch.fx as fx

from moefx.kernels.triton_moe import EXPERT_MLP_MAX_WIDTH
from moefx.layers import SliceMoE, XMoE
from moefx.passes.fuse_expert_mlp import FuseExpertMLP
from moefx.passes.fuse_gather_gemm import FuseGatherGemm
from moefx.passes.fuse_gemm_scatter import FuseGemmScatter
from moefx.passes.fuse_router import FuseRouter
from moefx.passes.lower import LowerMoE
from moefx.passes.manager import PassManager


class _MoELeafTracer(fx.Tracer):
    """Symbolic tracer that keeps XMoE / SliceMoE calls as single ``call_module`` nodes."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, (XMoE, SliceMoE)) or super().is_leaf_module(m, qualname)


class _Root(torch.nn.Module):
    """Holds a bare MoE layer so that it is traced as a leaf (a root is always traced into)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@dataclasses.dataclass
class OptimizeRecord:
    """What ``optimize`` did: one line per rewrite or refusal, and the pass manager's log."""

    capture: str
    events: list
    log: list

    def fired(self, pass_name: Optional[str] = None) -> list:
        return [e for e in self.events if " -> " in e and (pass_name is None or e.startswith(pass_name + ":"))]

    def format(self) -> str:
        lines = [f"moefx.optimize (graph from {self.capture}):"]
        lines += [f"  {e}" for e in self.events] or ["  no MoE layer found: nothing lowered"]
        lines += [f"  [{entry}]" for entry in self.log]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _to_graph_module(model, inputs: tuple) -> tuple[fx.GraphModule, str]:
    if isinstance(model, fx.GraphModule):
        return fx.GraphModule(model, copy.deepcopy(model.graph)), "the given GraphModule"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module or GraphModule, got {type(model).__name__}")
    if isinstance(model, (XMoE, SliceMoE)):
        model = _Root(model)
    try:
        graph = _MoELeafTracer().trace(model)
        return fx.GraphModule(model, graph), "torch.fx symbolic trace (MoE layers as leaves)"
    except Exception as trace_err:  # noqa: BLE001  (any tracing failure: fall back to export)
        try:
            from moefx.capture import capture
        except ImportError:
            raise RuntimeError(
                f"optimize: symbolic tracing of {type(model).__name__} failed ({trace_err}) and "
                "moefx.capture is not available; pass a GraphModule instead"
            ) from trace_err
        return capture(model, inputs), "moefx.capture (torch.export)"


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Record example shapes in the node metadata (``tensor_meta``) so the lowering can size
    its row blocks; skipped silently where the graph cannot run on the inputs as given."""
    if any(n.op == "placeholder" and "val" in n.meta for n in gm.graph.nodes):
        return
    try:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception:  # noqa: BLE001  (shape metadata is an optimisation hint, not required)
        pass


def optimize(model, example_inputs, verbose: bool = False, block_m: Optional[int] = None,
             expert_mlp_max_width: int = EXPERT_MLP_MAX_WIDTH, passes: Optional[Sequence[str]] = None,
             stream=None) -> fx.GraphModule:
    """Lower every eval-mode MoE layer of ``model`` into primitive moefx ops and run every
    fusion pass; returns the GraphModule (with ``moefx_record``).

    ``passes`` picks a subset of ``("fuse_router", "fuse_gather_gemm", "fuse_gemm_scatter",
    "fuse_expert_mlp")`` (lowering always runs); ``block_m`` fixes the grouped row block
    (default: 1 for a model on the CPU, where padding only costs; on CUDA chosen per layer from
    the example batch, so optimize on the device you will run on); ``expert_mlp_max_width``
    bounds the widths the whole-MLP fusion accepts.
    """
    inputs = _as_inputs(example_inputs)
    gm, source = _to_graph_module(model, inputs)
    _propagate_shapes(gm, inputs)
    available = {
        "fuse_router": FuseRouter,
        "fuse_gather_gemm": FuseGatherGemm,
        "fuse_gemm_scatter": FuseGemmScatter,
        "fuse_expert_mlp": lambda: FuseExpertMLP(expert_mlp_max_width),
    }
    chosen = list(available) if passes is None else list(passes)
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise ValueError(f"optimize: unknown passes {unknown}; choose from {list(available)}")
    pipeline = [LowerMoE(block_m)] + [available[p]() for p in available if p in chosen]
    manager = PassManager(pipeline)
    gm = manager.run(gm).graph_module
    events = [e for p in pipeline for e in p.fired]
    record = OptimizeRecord(capture=source, events=events, log=list(manager.log))
    gm.moefx_record = record
    if verbose:
        print(record.format(), file=stream or sys.stderr)
    return gm
