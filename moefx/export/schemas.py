"""The ``com.microsoft.MoE`` operator schema, registered with ``onnx.defs``.

onnxscript builds a node of a custom domain only when ``onnx.defs`` knows its schema: without it
the traced call gets no outputs and the exporter fails far from the cause. onnx does not ship the
onnxruntime contrib schemas, so moefx registers the one it emits, once per process, exactly as
onnxruntime 1.32 declares it (inputs, optional inputs, attributes). Registration is idempotent.
"""
from __future__ import annotations

import threading

from onnx import defs

MOE_DOMAIN = "com.microsoft"
MOE_OP = "MoE"
MOE_VERSION = 1

_lock = threading.Lock()


def _moe_schema() -> defs.OpSchema:
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attr = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    inputs = [
        param("input", "T", "tokens, [rows, hidden] or [batch, seq, hidden]"),
        param("router_probs", "T", "router logits, [rows, num_experts]; softmax is applied"),
        param("fc1_experts_weights", "T", "[E, inter (x2 when fused SwiGLU), hidden]"),
        param("fc1_experts_bias", "T", "[E, inter (x2)]", param_option=optional),
        param("fc2_experts_weights", "T", "[E, hidden, inter]"),
        param("fc2_experts_bias", "T", "[E, hidden]", param_option=optional),
        param("fc3_experts_weights", "T", "unsupported on CPU", param_option=optional),
        param("fc3_experts_bias", "T", "unsupported on CPU", param_option=optional),
    ]
    attributes = [
        attr("activation_type", kind.STRING, "relu, gelu (tanh form), silu, swiglu, identity", required=False),
        attr("k", kind.INT, "experts per row", required=False),
        attr("normalize_routing_weights", kind.INT, "renormalise the k weights", required=False),
        attr("use_sparse_mixer", kind.INT, "ignored on CPU", required=False),
        attr("swiglu_fusion", kind.INT, "1: gate/up rows interleaved in fc1", required=False),
        attr("swiglu_limit", kind.FLOAT, "clamp limit; absent means no clamp", required=False),
        attr("swiglu_limit_after_activation", kind.INT, "CUDA only", required=False),
        attr("activation_alpha", kind.FLOAT, "SwiGLU: g * sigmoid(alpha * g)", required=False),
        attr("activation_beta", kind.FLOAT, "SwiGLU: (l + beta)", required=False),
    ]
    return defs.OpSchema(
        MOE_OP,
        MOE_DOMAIN,
        MOE_VERSION,
        doc="onnxruntime contrib Mixture-of-Experts (schema mirrored for onnxscript).",
        inputs=inputs,
        outputs=[param("output", "T", "same shape as input")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=attributes,
    )


def register_ort_schemas() -> None:
    """Make ``com.microsoft.MoE`` (version 1) known to ``onnx.defs``; safe to call repeatedly."""
    with _lock:
        if defs.has(MOE_OP, MOE_DOMAIN):
            return
        defs.register_schema(_moe_schema())
