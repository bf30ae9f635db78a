"""moefx.metrics: ELE, CV², load, activation ratio, drop rate, collect() and aux_loss()."""
import math

import pytest
import torch
from torch import nn

import moefx
from moefx import metrics
from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.kernels import reference as R
from moefx.layers import SliceMoE, XMoE


def test_ele_and_cv2_formulas():
    assert metrics.expert_load_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert metrics.expert_load_entropy(torch.tensor([8, 0, 0, 0])) == pytest.approx(0.0)
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert metrics.expert_load_entropy(torch.tensor([2, 1, 1, 0])) == pytest.approx(want)
    assert metrics.cv_squared(torch.tensor([3, 3, 3])) == 0
    load = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert metrics.cv_squared(load) == pytest.approx(float(load.var(correction=0) / load.mean() ** 2))
    assert math.isnan(metrics.expert_load_entropy(torch.zeros(4)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = XMoE(XMoEConfig(num_experts=4, threshold=0.8, capacity_factor=0.5), 16, 32)
        self.b = nn.Sequential(SliceMoE(SliceMoEConfig(num_slices=4, num_experts=8, top_k=2, router_hidden=8), 16, 32))

    def forward(self, x):
        return self.b(self.a(x) + x)


def test_collect_gathers_per_layer_statistics():
    net = Net().eval()
    x = torch.randn(2, 20, 16)
    with metrics.collect(net) as stats:
        net(x)
        net(x[:1])
    assert set(stats) == {"a", "b.0"}
    a, b = stats["a"], stats["b.0"]
    assert (a.kind, b.kind, a.rows, b.rows, a.calls) == ("XMoE", "SliceMoE", 60, 240, 2)
    # XMoE drop rate and load, checked against the reference routing of the same tokens
    kept = selected = 0
    load = torch.zeros(4, dtype=torch.long)
    for batch in (x.reshape(-1, 16), x[:1].reshape(-1, 16)):
        probs = torch.softmax(batch @ net.a.router.weight.t(), -1)
        pre = R.xmoe_select_reference(probs, 0.8, 0, 0)
        post = R.capacity_drop_reference(*pre, 4, net.a.capacity(batch.shape[0]))
        selected += int((pre[0] >= 0).sum())
        kept += int((post[0] >= 0).sum())
        load += torch.bincount(post[0][post[0] >= 0], minlength=4)
    assert torch.equal(a.load, load)
    assert a.drop_rate == pytest.approx(1 - kept / selected) and a.drop_rate > 0
    assert a.activation_ratio == pytest.approx(kept / (60 * 4))
    assert b.activation_ratio == pytest.approx(2 / 8) and b.drop_rate == 0
    assert int(b.load.sum()) == 240 * 2
    assert b.ele == pytest.approx(metrics.expert_load_entropy(b.load))
    assert b.cv2 == pytest.approx(metrics.cv_squared(b.load))
    text = str(stats)
    assert "a [XMoE, E=4]" in text and "b.0 [SliceMoE, E=8]" in text and "ELE=" in text
    assert stats["a"].as_dict()["load"] == load.tolist()
    assert stats.mean("activation_ratio") == pytest.approx((a.activation_ratio + b.activation_ratio) / 2)


def test_collect_stops_recording_after_the_block():
    net = Net().eval()
    with metrics.collect(net) as stats:
        net(torch.randn(3, 16))
    net(torch.randn(5, 16))
    assert stats["a"].rows == 3
    assert net.a._stats_sink is None and net.b[0]._stats_sink is None


def test_collect_without_moe_layers_is_an_error():
    with pytest.raises(ValueError, match="holds no XMoE or SliceMoE layer"):
        with metrics.collect(nn.Linear(2, 2)):
            pass


def test_aux_loss_sums_layers():
    net = Net().train()
    net(torch.randn(10, 16))
    total = moefx.aux_loss(net)
    torch.testing.assert_close(total, net.a.aux_loss + net.b[0].aux_loss)
    assert net.a.aux_loss > 0 and net.b[0].aux_loss > 0
    total.backward()
    assert net.a.router.weight.grad is not None and net.b[0].router[0].weight.grad is not None
    net.eval()(torch.randn(10, 16))
    assert float(moefx.aux_loss(net)) == 0.0
