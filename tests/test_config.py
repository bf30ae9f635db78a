"""XMoEConfig / SliceMoEConfig: defaults of issue 3, validation with errors naming the argument."""
import copy
import dataclasses
import pickle

import pytest

from moefx.config import ConfigError, SliceMoEConfig, XMoEConfig


def test_xmoe_defaults_match_the_issue():
    c = XMoEConfig()
    assert (c.num_experts, c.threshold, c.top_k, c.max_experts, c.capacity_factor) == (16, 0.9, None, None, None)
    assert (c.combine, c.num_shared, c.split, c.router, c.aux_loss_coef) == (None, 0, "kmeans", "centroid", 0.01)
    assert c.max_selected == 16


def test_slicemoe_defaults_match_the_issue():
    c = SliceMoEConfig()
    assert (c.num_slices, c.num_experts, c.top_k, c.router_hidden, c.expert_hidden) == (8, 16, 2, 256, None)
    assert (c.gate, c.slice_dropout, c.capacity_loss_coef) == ("input", 0.0, 0.1)
    assert c.hidden_for(1536) == 768
    assert c.replace(expert_hidden=100).hidden_for(1536) == 100


def test_top_k_alone_means_top_k_routing():
    c = XMoEConfig(top_k=4)
    assert c.threshold is None and c.top_k == 4 and c.max_selected == 4
    assert XMoEConfig(top_k=2, threshold=None).threshold is None


def test_replace_from_default_threshold_to_top_k():
    assert XMoEConfig().replace(top_k=3).threshold is None
    assert copy.deepcopy(XMoEConfig()).replace(top_k=3).top_k == 3
    assert pickle.loads(pickle.dumps(XMoEConfig())).threshold == 0.9


@pytest.mark.parametrize("kwargs", [dict(threshold=0.9, top_k=4), dict(threshold=None)])
def test_exactly_one_of_threshold_and_top_k(kwargs):
    with pytest.raises(ConfigError, match="exactly one of threshold= and top_k="):
        XMoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2.5), "num_experts"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=True), "threshold"),
        (dict(top_k=0, threshold=None), "top_k"),
        (dict(top_k=17, threshold=None), "top_k"),
        (dict(max_experts=17), "max_experts"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(combine="mean"), "combine"),
        (dict(num_shared=-1), "num_shared"),
        (dict(split="halves"), "split"),
        (dict(router="mlp"), "router"),
        (dict(aux_loss_coef=-1), "aux_loss_coef"),
    ],
)
def test_xmoe_bad_values_name_the_argument(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        XMoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_slices=0), "num_slices"),
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=17), "top_k"),
        (dict(router_hidden=0), "router_hidden"),
        (dict(expert_hidden=0), "expert_hidden"),
        (dict(gate="both"), "gate"),
        (dict(slice_dropout=1.0), "slice_dropout"),
        (dict(capacity_loss_coef=-0.1), "capacity_loss_coef"),
    ],
)
def test_slicemoe_bad_values_name_the_argument(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        SliceMoEConfig(**kwargs)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        XMoEConfig().num_experts = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        SliceMoEConfig().top_k = 1


def test_resolved_combine():
    assert XMoEConfig().resolved_combine(converted=True) == "unit"
    assert XMoEConfig().resolved_combine(converted=False) == "prob"
    assert XMoEConfig(combine="prob").resolved_combine(converted=True) == "prob"


def test_validate_for_names_module_and_valid_slices():
    with pytest.raises(ConfigError, match=r"num_slices=5 does not divide d_model=576 \(at module 'model.mlp'\).*\[1, 2, 3, 4, 6, 8"):
        SliceMoEConfig(num_slices=5).validate_for(576, 1536, "model.mlp")
    with pytest.raises(ConfigError, match="more than the d_ff = 8"):
        XMoEConfig(num_experts=8, num_shared=1).validate_for(16, 8, "blk")
    SliceMoEConfig().validate_for(576, 1536)
    XMoEConfig().validate_for(576, 1536)
