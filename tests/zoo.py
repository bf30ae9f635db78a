"""Tiny models with random weights for tests of every room (no downloads).

Each builder returns ``(model, example_inputs, example_kwargs)``: the model in eval mode, a
tuple of positional inputs and a dict of keyword inputs (``use_cache=False`` where the model
has a cache, so ``torch.export`` can capture it). ``ZOO`` maps a name to its builder and
``EXPECTED`` to the FFN blocks moefx must find there (count, kind, widths, activation, bias,
and the path of the first block). Shapes are small so a capture takes about a second.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 16        # d_model of every tiny model
FF = 40       # d_ff (not a multiple of the usual expert counts on purpose, except where noted)
LAYERS = 2
VOCAB = 64
SEQ = 8


def _ids(batch: int = 1, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _quiet(config_cls, **kw):
    import transformers

    transformers.logging.set_verbosity_error()
    return config_cls(**kw)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = _quiet(GPT2Config, n_layer=LAYERS, n_embd=D, n_head=2, n_inner=FF, vocab_size=VOCAB,
                 n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), (_ids(),), {"use_cache": False}


def bert():
    from transformers import BertConfig, BertModel

    cfg = _quiet(BertConfig, num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=2,
                 intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=32)
    return BertModel(cfg).eval(), (_ids(),), {}


def bert_classifier():
    """BERT with a pooler (dense + tanh) and a classifier head: neither is an FFN."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = _quiet(BertConfig, num_hidden_layers=1, hidden_size=D, num_attention_heads=2,
                 intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval(), (_ids(),), {}


def _decoder(config_name: str, model_name: str, **extra):
    import transformers

    cfg = _quiet(getattr(transformers, config_name), hidden_size=D, intermediate_size=FF,
                 num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=VOCAB, max_position_embeddings=32, **extra)
    model = getattr(transformers, model_name)(cfg).eval()
    return model, (_ids(),), {"use_cache": False}


def llama():
    return _decoder("LlamaConfig", "LlamaForCausalLM")


def mistral():
    return _decoder("MistralConfig", "MistralForCausalLM", sliding_window=None)


def qwen2():
    return _decoder("Qwen2Config", "Qwen2ForCausalLM")


def nemotron():
    """Squared-ReLU MLP (``relu(x) ** 2``, HF's ReLUSquaredActivation), as in Nemotron/Arcee."""
    return _decoder("NemotronConfig", "NemotronForCausalLM", pad_token_id=0)


def phi3():
    """GLU with one fused ``gate_up_proj`` Linear cut by ``chunk``."""
    return _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0)


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = _quiet(OPTConfig, hidden_size=D, ffn_dim=FF, num_hidden_layers=LAYERS,
                 num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                 word_embed_proj_dim=D)
    return OPTForCausalLM(cfg).eval(), (_ids(),), {"use_cache": False}


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = _quiet(GPTNeoXConfig, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                 num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    return GPTNeoXForCausalLM(cfg).eval(), (_ids(),), {"use_cache": False}


def t5():
    """T5 encoder-decoder (relu ``DenseReluDense``): LAYERS FFNs in each stack."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = _quiet(T5Config, d_model=D, d_ff=FF, d_kv=8, num_layers=LAYERS, num_decoder_layers=LAYERS,
                 num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0)
    ids = _ids()
    return (T5ForConditionalGeneration(cfg).eval(), (ids,),
            {"decoder_input_ids": _ids(seq=4), "use_cache": False})


def t5_gated():
    """T5 v1.1 style gated-gelu FFN (``T5DenseGatedActDense``): GeGLU with gelu_tanh."""
    from transformers import T5Config, T5EncoderModel

    cfg = _quiet(T5Config, d_model=D, d_ff=FF, d_kv=8, num_layers=LAYERS, num_heads=2,
                 vocab_size=VOCAB, feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg).eval(), (_ids(),), {}


def vit():
    from transformers import ViTConfig, ViTModel

    cfg = _quiet(ViTConfig, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2,
                 intermediate_size=FF, image_size=16, patch_size=8, num_channels=3)
    return ViTModel(cfg).eval(), (torch.randn(1, 3, 16, 16),), {}


def clip():
    """CLIP text and vision towers (quick_gelu): LAYERS FFNs in each tower."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=2,
                vocab_size=VOCAB, max_position_embeddings=SEQ, projection_dim=D)
    vision = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=2,
                  image_size=16, patch_size=8, projection_dim=D)
    cfg = _quiet(CLIPConfig, text_config=text, vision_config=vision, projection_dim=D)
    kwargs = {"input_ids": _ids(), "pixel_values": torch.randn(1, 3, 16, 16)}
    return CLIPModel(cfg).eval(), (), kwargs


def sequential_mlp():
    """``nn.Sequential(Linear, GELU, Dropout, Linear)``: the root module is the block."""
    model = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Dropout(0.1), nn.Linear(FF, D))
    return model.eval(), (torch.randn(2, 5, D),), {}


class FunctionalMLP(nn.Module):
    """A residual block whose FFN is written with ``x @ W.T + b`` and ``F.linear`` in the
    model's own forward: the block spans code inside a bigger forward (path None)."""

    def __init__(self, d: int = D, d_ff: int = FF):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w_in = nn.Parameter(torch.randn(d_ff, d) / d ** 0.5)
        self.b_in = nn.Parameter(torch.randn(d_ff) * 0.1)
        self.w_out = nn.Parameter(torch.randn(d, d_ff) / d_ff ** 0.5)
        self.b_out = nn.Parameter(torch.randn(d) * 0.1)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(h @ self.w_in.T + self.b_in), self.w_out, self.b_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


def functional_mlp():
    return FunctionalMLP().eval(), (torch.randn(2, 5, D),), {}


class SharedFFN(nn.Module):
    """ALBERT-style depth sharing: one FFN's weights, written as functional code, applied three
    times in a row (three call sites of one block; not in ZOO, whose models have one each)."""

    def __init__(self):
        super().__init__()
        self.inner = FunctionalMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.inner(x)
        return x


def shared_ffn():
    return SharedFFN().eval(), (torch.randn(2, 5, D),), {}


def albert():
    """ALBERT: one layer's weights at every depth, its FFN code inside the layer's forward (three
    calls of one block with one module path; not in ZOO)."""
    from transformers import AlbertConfig, AlbertModel

    cfg = _quiet(AlbertConfig, hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=2,
                 embedding_size=8, vocab_size=VOCAB, max_position_embeddings=32)
    return AlbertModel(cfg).eval(), (_ids(2),), {}


class FusedGLU(nn.Module):
    """Phi-3 style fused ``gate_up`` Linear cut by ``chunk``, then SwiGLU."""

    def __init__(self, d: int = D, d_ff: int = FF):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


def fused_glu():
    return FusedGLU().eval(), (torch.randn(2, 5, D),), {}


ZOO = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "nemotron": nemotron,
    "phi3": phi3,
    "opt": opt,
    "gpt_neox": gpt_neox,
    "t5": t5,
    "t5_gated": t5_gated,
    "vit": vit,
    "clip": clip,
    "sequential_mlp": sequential_mlp,
    "functional_mlp": functional_mlp,
    "fused_glu": fused_glu,
}

#: name -> (count, kind, activation, bias1, bias2, first path, first module_exact)
EXPECTED = {
    "gpt2": (LAYERS, "mlp", "gelu_tanh", True, True, "transformer.h.0.mlp", True),
    "bert": (LAYERS, "mlp", "gelu", True, True, "encoder.layer.0", False),
    "llama": (LAYERS, "glu", "silu", False, False, "model.layers.0.mlp", True),
    "mistral": (LAYERS, "glu", "silu", False, False, "model.layers.0.mlp", True),
    "qwen2": (LAYERS, "glu", "silu", False, False, "model.layers.0.mlp", True),
    "nemotron": (LAYERS, "mlp", "relu2", False, False, "model.layers.0.mlp", True),
    "phi3": (LAYERS, "glu", "silu", False, False, "model.layers.0.mlp", True),
    "opt": (LAYERS, "mlp", "relu", True, True, "model.decoder.layers.0", False),
    "gpt_neox": (LAYERS, "mlp", "gelu", True, True, "gpt_neox.layers.0.mlp", True),
    "t5": (2 * LAYERS, "mlp", "relu", False, False, "encoder.block.0.layer.1.DenseReluDense", True),
    "t5_gated": (LAYERS, "glu", "gelu_tanh", False, False, "encoder.block.0.layer.1.DenseReluDense", True),
    "vit": (LAYERS, "mlp", "gelu", True, True, "layers.0.mlp", True),
    "clip": (2 * LAYERS, "mlp", "quick_gelu", True, True, "vision_model.encoder.layers.0.mlp", True),
    "sequential_mlp": (1, "mlp", "gelu", True, True, "", True),
    "functional_mlp": (1, "mlp", "silu", True, True, None, False),
    "fused_glu": (1, "glu", "silu", False, False, "", True),
}


def block_io(model, gm, example_inputs, example_kwargs, matches):
    """Run the captured graph on its example inputs and return, per match, the values of the
    block's input and output nodes: what ``dense_reference(input)`` must reproduce."""
    import torch.fx as fx
    import torch.utils._pytree as pytree

    from moefx.capture import prepare_kwargs

    wanted = {}
    for i, m in enumerate(matches):
        wanted.setdefault(m.input_node, []).append((i, 0))
        wanted.setdefault(m.output_node, []).append((i, 1))
    out = [[None, None] for _ in matches]

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            for i, slot in wanted.get(n, ()):
                out[i][slot] = value
            return value

    kwargs = prepare_kwargs(model, example_kwargs)
    leaves = pytree.tree_leaves((tuple(example_inputs), kwargs))
    with torch.no_grad():
        Recorder(gm).run(*leaves)
    return [tuple(io) for io in out]
