"""The three ways in, on a tiny Llama built from a config (random weights, no download):
find the FFNs, convert them to XMoE, calibrate, save/load, optimize, and export to ONNX.

    python examples/quickstart.py [--out DIR]
"""
import argparse
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moefx


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="moefx-quickstart-")
    os.makedirs(out, exist_ok=True)

    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    kwargs = {"use_cache": False}

    ffns = moefx.find_ffns(model, (ids,), kwargs)
    for m in ffns:
        print(f"found {m.kind} FFN at {m.path}: {m.d_model} -> {m.d_ff} ({m.activation})")

    config = moefx.XMoEConfig(num_experts=8, threshold=0.9, num_shared=2)
    dense_logits = model(ids, use_cache=False).logits
    model = moefx.convert(model, config, (ids,), kwargs)
    batches = [torch.randint(0, 256, (4, 32)) for _ in range(4)]
    moefx.calibrate(model, batches, target_ratio=0.75)  # prints a per-layer before/after table

    moe_logits = model(ids, use_cache=False).logits
    err = (moe_logits - dense_logits).norm() / dense_logits.norm()
    print(f"relative logit change after conversion: {err:.3f}")

    moefx.save(model, os.path.join(out, "tiny-xmoe"))
    model = moefx.load(os.path.join(out, "tiny-xmoe"))
    print(model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))

    report = moefx.export_onnx(model, (ids,), os.path.join(out, "tiny-xmoe.onnx"), target="ort",
                               example_kwargs=kwargs)
    print(report)


if __name__ == "__main__":
    main()
