"""torch.export of small models holding each layer, with dynamic batch and sequence: the ops'
fake kernels must not pin data-dependent shapes, and each op must stay one node."""
import pytest
import torch
from torch import nn
from torch.export import Dim

from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.layers import SliceMoE, XMoE


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


LAYERS = {
    "xmoe-threshold-capacity": lambda: XMoE(XMoEConfig(num_experts=4, threshold=0.8, capacity_factor=1.5), 16, 32),
    "xmoe-topk-glu-shared": lambda: XMoE(XMoEConfig(num_experts=4, top_k=2, num_shared=1), 16, 32, glu=True, activation="silu", converted=True),
    "slicemoe-input": lambda: SliceMoE(SliceMoEConfig(num_slices=4, num_experts=6, router_hidden=8), 16, 32),
    "slicemoe-output-glu": lambda: SliceMoE(SliceMoEConfig(num_slices=2, num_experts=3, top_k=1, gate="output"), 16, 32, glu=True),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_export_with_dynamic_batch_and_sequence(name):
    torch.manual_seed(0)
    model = Block(LAYERS[name]()).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 16),), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("moefx.moe_ffn" in t for t in targets) == 1
    assert sum("moefx.xmoe_select" in t for t in targets) == 1
    assert sum("moefx.capacity_drop" in t for t in targets) == (1 if name == "xmoe-threshold-capacity" else 0)
    for shape in [(5, 7, 16), (1, 1, 16), (3, 11, 16)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_exported_program_survives_decompositions():
    torch.manual_seed(0)
    model = Block(LAYERS["slicemoe-input"]()).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 16),), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    ep = ep.run_decompositions()
    assert any("moefx.moe_ffn" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(4, 6, 16)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
