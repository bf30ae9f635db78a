"""Hugging Face architectures beyond the zoo: each FFN is found, converted, and the converted
model equals the dense one when every expert is kept (SPEC §3's first conversion test).

Tiny random models built from configs (no downloads). One row per family whose FFN differs in
some way a matcher could trip on: fused gate_up with chunk (Phi-3, GLM), GELU-tanh GLU (Gemma),
squared ReLU (Nemotron, Persimmon, Arcee), biased GELU MLPs (Falcon, GPT-J, Starcoder2, Phi,
BLOOM, GPTBigCode), post-norm blocks (OLMo 2, Cohere's parallel block), an encoder (ModernBERT),
and MoE models whose dense FFNs sit beside routed experts (Qwen2-MoE's shared expert, Llama 4).
"""
import warnings

import pytest
import torch

import moefx

transformers = pytest.importorskip("transformers")

D, FF, LAYERS = 32, 80, 2
COMMON = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, pad_token_id=0)

#: family -> (config extras, model class, FFN kind, activation)
FAMILIES = {
    "Gemma": (dict(head_dim=8), "GemmaForCausalLM", "glu", "gelu_tanh"),
    "Gemma2": (dict(head_dim=8), "Gemma2ForCausalLM", "glu", "gelu_tanh"),
    "Gemma3Text": (dict(head_dim=8), "Gemma3ForCausalLM", "glu", "gelu_tanh"),
    "Qwen3": (dict(head_dim=8), "Qwen3ForCausalLM", "glu", "silu"),
    "Olmo2": ({}, "Olmo2ForCausalLM", "glu", "silu"),
    "Granite": ({}, "GraniteForCausalLM", "glu", "silu"),
    "Cohere": ({}, "CohereForCausalLM", "glu", "silu"),
    "Glm": (dict(head_dim=8), "GlmForCausalLM", "glu", "silu"),
    "Phi3": ({}, "Phi3ForCausalLM", "glu", "silu"),
    "Starcoder2": ({}, "Starcoder2ForCausalLM", "mlp", "gelu_tanh"),
    "Phi": ({}, "PhiForCausalLM", "mlp", "gelu_tanh"),
    "Falcon": (dict(ffn_hidden_size=FF), "FalconForCausalLM", "mlp", "gelu"),
    "GPTJ": (dict(n_embd=D, n_layer=LAYERS, n_head=4, rotary_dim=4, n_inner=FF), "GPTJForCausalLM", "mlp", "gelu_tanh"),
    "Bloom": (dict(n_head=4), "BloomForCausalLM", "mlp", "gelu_tanh"),
    "GPTBigCode": (dict(n_embd=D, n_layer=LAYERS, n_head=4, n_inner=FF), "GPTBigCodeForCausalLM", "mlp", "gelu_tanh"),
    "Persimmon": ({}, "PersimmonForCausalLM", "mlp", "relu2"),
    "Nemotron": (dict(head_dim=8), "NemotronForCausalLM", "mlp", "relu2"),
    "Arcee": ({}, "ArceeForCausalLM", "mlp", "relu2"),
    "ModernBert": ({}, "ModernBertForMaskedLM", "glu", "gelu"),
    "Qwen2Moe": (dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=FF),
                 "Qwen2MoeForCausalLM", "glu", "silu"),
    "Llama4Text": (dict(intermediate_size_mlp=FF, num_local_experts=2, head_dim=8), "Llama4ForCausalLM", "glu", "silu"),
}


def _build(family):
    extras, model_name, _, _ = FAMILIES[family]
    config_cls = getattr(transformers, family + "Config", None)
    model_cls = getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config_cls(**{**COMMON, **extras})).eval()
    kwargs = {} if family == "ModernBert" else {"use_cache": False}
    return model, (torch.randint(1, 60, (2, 10)),), kwargs


def _out(model, inputs, kwargs):
    with torch.no_grad():
        return model(*inputs, **kwargs).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_converts_exactly(family):
    torch.manual_seed(0)
    model, inputs, kwargs = _build(family)
    _, _, kind, activation = FAMILIES[family]
    dense = _out(model, inputs, kwargs)
    found = moefx.find_ffns(model, inputs, kwargs)
    assert len(found) == LAYERS
    assert {(m.kind, m.activation) for m in found} == {(kind, activation)}
    converted = moefx.convert(model, moefx.XMoEConfig(num_experts=4, threshold=1.0), inputs, kwargs)
    assert converted is model  # a HF model stays one: generate() and labels= keep working
    assert sum(type(m).__name__ == "XMoE" for m in model.modules()) == LAYERS
    torch.testing.assert_close(_out(model, inputs, kwargs), dense, rtol=1e-5, atol=1e-5)


def test_model_that_is_all_moe_already_says_so():
    """Mixtral has no dense FFN (its experts are already routed): a clear error, nothing changed."""
    model, inputs, kwargs = _build_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(moefx.ConversionError, match="no dense FFN block found in MixtralForCausalLM"):
        moefx.convert(model, moefx.XMoEConfig(num_experts=4), inputs, kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _build_mixtral():
    transformers.logging.set_verbosity_error()
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval(), (torch.randint(1, 60, (2, 10)),), {"use_cache": False}


def test_albert_shared_layer_converts_at_every_call_and_stays_shared():
    """ALBERT applies one layer's weights at every depth: each call site of its FFN (the same
    module path every time) is rewritten, to one shared XMoE layer fitted on all of them."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=4,
                                    embedding_size=16, vocab_size=64)
    model = transformers.AlbertModel(cfg).eval()
    ids = torch.randint(1, 60, (2, 10))
    with torch.no_grad():
        dense = model(ids).last_hidden_state
    dense_params = sum(p.numel() for p in model.parameters())
    found = moefx.find_ffns(model, (ids,))
    assert len(found) == 3 and len({m.name for m in found}) == 1
    out = moefx.convert(model, moefx.XMoEConfig(num_experts=4, threshold=1.0), (ids,))
    layers = {id(m): m for m in out.modules() if type(m).__name__ == "XMoE"}
    assert len(layers) == 1
    calls = [n for n in out.graph.nodes if n.op == "call_module" and type(out.get_submodule(n.target)).__name__ == "XMoE"]
    assert len(calls) == 3
    (layer,) = layers.values()
    assert sum(p.numel() for p in out.parameters()) == dense_params + layer.router.weight.numel()
    with torch.no_grad():
        torch.testing.assert_close(out(ids).last_hidden_state, dense, rtol=1e-5, atol=1e-5)
        assert out(torch.randint(1, 60, (3, 7))).last_hidden_state.shape == (3, 7, D)
