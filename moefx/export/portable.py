"""Graph-level checks and clean-up shared by both targets, and the portable target's guarantee.

- :func:`untranslated_nodes` finds, before the ONNX exporter runs, every custom-op node of the
  exported program that has no ONNX translation, so the error names the node and the module it
  came from instead of surfacing deep inside the exporter.
- :func:`optimize` also turns the per-expert ``Gather``/``Transpose`` of weight
  initializers that the ``moe_ffn`` translation emits into initializers of their own. The
  generic constant folder skips tensors over 8192 elements, which would leave onnxruntime
  copying every expert's weights on every run.
- :func:`non_standard_ops` lists any node outside the default ONNX domain: the portable target
  promises none.
"""
from __future__ import annotations

from collections import Counter

import torch

_BUILTIN_NAMESPACES = {"aten", "prims", "onnx", "higher_order"}


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path, kind = list(stack.values())[-1]
    kind_name = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")
    return f"{path or '<root>'} ({kind_name})"


def untranslated_nodes(exported_program, table: dict, known=lambda target: False) -> list[str]:
    """Descriptions of custom-op nodes with no entry in ``table`` (``{OpOverload: fn}``) and
    unknown to the exporter's own registry (``known(target)``)."""
    missing = []
    for node in exported_program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace in _BUILTIN_NAMESPACES or node.target in table or known(node.target):
            continue
        missing.append(f"node '{node.name}' calls {node.target.name()} (from module {_module_path(node)})")
    return missing


def optimize(model) -> None:
    """Constant folding and dead-code removal, with ``Gather(initializer, constant)`` and
    ``Transpose(initializer)`` folded into new initializers whatever their size: the
    per-expert weight slices of the ``moe_ffn`` translation.

    The exporter's default pipeline also runs onnxscript's pattern rewriter; it is skipped here:
    on a converted 30-layer model (about 10k nodes in the portable form) it ran for more than ten
    minutes, and onnxruntime applies its own graph optimisations when it loads the file."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    def should_fold(node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gather", "Transpose"):
            return None
        sources = [v for v in node.inputs if v is not None]
        if sources and all(v.const_value is not None for v in sources):
            return True
        return None

    import onnx_ir as ir

    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                FoldConstantsPass(shape_inference=True, input_size_limit=8192, output_size_limit=512 * 512,
                                  should_fold=should_fold),
                common.RemoveUnusedNodesPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def op_counts(model) -> Counter:
    """``{"domain::OpType": count}`` over the main graph."""
    counts = Counter()
    for node in model.graph:
        domain = node.domain or ""
        counts[f"{domain}::{node.op_type}" if domain not in ("", "ai.onnx") else node.op_type] += 1
    return counts


def non_standard_ops(model) -> list[str]:
    return sorted({key for key in op_counts(model) if "::" in key})
