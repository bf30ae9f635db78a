"""Neuron partitions: every split covers each neuron once, balanced; shared neurons are the
most frequently active; k-means and co-activation group related neurons better than chance."""
import pytest
import torch
import torch.nn.functional as F

from moefx.config import ConfigError
from moefx.convert.dense import DenseFFN
from moefx.convert.partition import group_width, neuron_stats, partition


def make_dense(d=12, d_ff=48, glu=False, clusters=6):
    """A dense FFN whose W1 rows come in ``clusters`` direction families (so a good split exists)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=1)
    fam = torch.arange(d_ff) % clusters
    w1 = centres[fam] * 2 + 0.3 * torch.randn(d_ff, d, generator=g)
    w3 = torch.randn(d_ff, d, generator=g) if glu else None
    return DenseFFN(w1=w1, w2=torch.randn(d, d_ff, generator=g) / d_ff ** 0.5, activation="relu" if not glu else "silu",
                    b1=torch.randn(d_ff, generator=g) * 0.1, w3=w3), fam


@pytest.mark.parametrize("split", ["contiguous", "random", "kmeans", "coactivation"])
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


def test_coactivation_groups_neurons_that_fire_together():
    dense, fam = make_dense()
    x = torch.randn(1024, 12)
    stats = neuron_stats(dense, [x])
    co = partition(dense, 6, "coactivation", stats=stats)
    rnd = partition(dense, 6, "random", stats=stats)

    def mean_coact(groups):
        tot = 0.0
        for row in groups:
            m = row[row >= 0]
            tot += float(stats.coactivation[m][:, m].sum())
        return tot

    assert mean_coact(co) > 1.2 * mean_coact(rnd)


def test_coactivation_without_data_is_a_clear_error():
    dense, _ = make_dense()
    with pytest.raises(ConfigError, match="coactivation.*needs calibration data.*at module 'blk'"):
        partition(dense, 4, "coactivation", path="blk")


def test_more_experts_than_neurons_is_a_clear_error():
    dense, _ = make_dense()
    with pytest.raises(ConfigError, match="more than the d_ff = 48 hidden neurons at module 'blk'"):
        partition(dense, 49, "kmeans", path="blk")
