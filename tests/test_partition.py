"""Neuron partitions: every split covers each neuron once, balanced; shared neurons are the
most frequently active; k-means and co-activation group related neurons better than chance."""
import pytest
import torch
import torch.nn.functional as F

from moefx.config import XMOE_SPLITS, ConfigError
from moefx.convert.dense import DenseFFN
from moefx.convert.partition import NeuronStats, coactivation_profiles, group_width, neuron_stats, partition


def make_dense(d=12, d_ff=48, glu=False, clusters=6):
    """A dense FFN whose W1 rows come in ``clusters`` direction families (so a good split exists)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=1)
    fam = torch.arange(d_ff) % clusters
    w1 = centres[fam] * 2 + 0.3 * torch.randn(d_ff, d, generator=g)
    w3 = torch.randn(d_ff, d, generator=g) if glu else None
    return DenseFFN(w1=w1, w2=torch.randn(d, d_ff, generator=g) / d_ff ** 0.5, activation="relu" if not glu else "silu",
                    b1=torch.randn(d_ff, generator=g) * 0.1, w3=w3), fam


@pytest.mark.parametrize("split", XMOE_SPLITS)
@pytest.mark.parametrize("shared", [0, 2])
def test_partition_is_a_balanced_cover(split, shared):
    dense, _ = make_dense()
    stats = neuron_stats(dense, [torch.randn(256, 12)])
    groups = partition(dense, 5, split, shared, stats=stats)
    h = group_width(48, 5, shared)
    assert groups.shape == (5 + shared, h)
    assert sorted(groups[groups >= 0].tolist()) == list(range(48))
    counts = (groups >= 0).sum(1).tolist()
    assert all(c == h for c in counts[:-1]) and 0 < counts[-1] <= h
    pad = groups[-1][counts[-1]:]
    assert (pad == -1).all()


def test_shared_neurons_are_the_most_frequently_active():
    dense, _ = make_dense()
    stats = neuron_stats(dense, [torch.randn(512, 12)])
    groups = partition(dense, 4, "kmeans", num_shared=2, stats=stats)
    shared = set(groups[:2].flatten().tolist())
    top = set(stats.frequency.topk(len(shared)).indices.tolist())
    assert shared == top


def _within_family(groups, fam):
    score = 0
    for row in groups:
        members = row[row >= 0]
        score += int(torch.bincount(fam[members]).max())
    return score


def test_kmeans_groups_direction_families_better_than_random():
    dense, fam = make_dense()
    km = partition(dense, 6, "kmeans")
    rnd = partition(dense, 6, "random")
    assert _within_family(km, fam) > _within_family(rnd, fam) + 10


@pytest.mark.parametrize("split", ["coactivation", "kmeans-coactivation"])
def test_coactivation_groups_neurons_that_fire_together(split):
    dense, fam = make_dense()
    x = torch.randn(1024, 12)
    stats = neuron_stats(dense, [x])
    co = partition(dense, 6, split, stats=stats)
    rnd = partition(dense, 6, "random", stats=stats)

    def mean_coact(groups):
        tot = 0.0
        for row in groups:
            m = row[row >= 0]
            tot += float(stats.coactivation[m][:, m].sum())
        return tot

    assert mean_coact(co) > 1.2 * mean_coact(rnd)


@pytest.mark.parametrize("split", ["coactivation", "kmeans-coactivation"])
def test_coactivation_without_data_is_a_clear_error(split):
    dense, _ = make_dense()
    with pytest.raises(ConfigError, match=f"split='{split}' needs calibration data.*at module 'blk'"):
        partition(dense, 4, split, path="blk")


def test_coactivation_profiles_compare_whom_neurons_fire_with():
    """Neurons 0 and 1 fire on the same tokens, 2 on other tokens, 3 never: 0 and 1 get the same
    profile, 2 one orthogonal to theirs, 3 a zero row; every other row has unit length."""
    fires = torch.zeros(8, 4)
    fires[:3, 0] = fires[:3, 1] = 1.0
    fires[4:7, 2] = 1.0
    co = fires.t() @ fires / 8
    stats = NeuronStats(8, fires.mean(0), co, fires.mean(0))
    prof = coactivation_profiles(stats, torch.arange(4))
    torch.testing.assert_close(prof[0], prof[1])
    assert float(prof[0] @ prof[2]) == 0.0
    assert float(prof[3].abs().sum()) == 0.0
    torch.testing.assert_close(prof[:3].norm(dim=1), torch.ones(3))
    # the scaling: P(i and j) / sqrt(P(i) P(j)), here 1 for two neurons that always fire together
    raw = co[0] / torch.sqrt(stats.frequency[0] * stats.frequency.clamp_min(1 / 8))
    torch.testing.assert_close(prof[0], raw / raw.norm())


def test_more_experts_than_neurons_is_a_clear_error():
    dense, _ = make_dense()
    with pytest.raises(ConfigError, match="more than the d_ff = 48 hidden neurons at module 'blk'"):
        partition(dense, 49, "kmeans", path="blk")
