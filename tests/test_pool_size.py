"""adaptbir-ray's actor pool sizing (no cluster needed): every actor can be placed and a read task still
finds a quarter CPU, on a 2-core laptop, a 64-core node and clusters of several nodes; asking for more
actors or threads than there are cores shrinks the claims instead of leaving a job waiting forever."""

from __future__ import annotations

import pytest

from adaptbir.runtime.errors import ArgumentError
from adaptbir.serve.batch import ACTOR_CPU_SHARE, READ_CPUS, pool_size


def _placeable(node_cpus: list[float], actors: int, claim: float) -> bool:
    """Ray's view: each actor takes `claim` CPUs on one node; afterwards a read task must still fit."""
    free = sorted(node_cpus, reverse=True)
    for _ in range(actors):
        node = next((i for i, cpus in enumerate(free) if cpus >= claim - 1e-9), None)
        if node is None:
            return False
        free[node] -= claim
    return max(free) >= READ_CPUS - 1e-9


@pytest.mark.parametrize(("nodes", "threads", "asked", "expected"), [
    ([2], 1, None, (2, 0.8)),  # the laptop: 2 actors, 0.4 CPU left for reads
    ([2], 2, None, (1, 1.6)),
    ([64], 1, None, (64, 0.8)),  # a large node: one actor per CPU, 12.8 CPUs for reads
    ([64], 4, None, (16, 3.2)),
    ([16, 16], 4, None, (8, 3.2)),
])
def test_default_pools(nodes, threads, asked, expected):
    assert pool_size(nodes, threads, asked) == expected
    assert _placeable(nodes, *expected)


@pytest.mark.parametrize(("nodes", "threads", "asked"), [
    ([2], 3, None),  # more threads than cores: 0.8 × 3 = 2.4 CPUs would never be granted
    ([2], 1, 4),  # more actors than cores
    ([2, 2], 1, 5),  # ... over two nodes, where a claim must fit inside one
    ([4, 1], 8, 2),
    ([64], 1, 100),
    ([3.5, 2, 1], 2, 7),
])
def test_oversized_requests_shrink_the_claims_so_everything_is_placed(nodes, threads, asked):
    actors, claim = pool_size(nodes, threads, asked)
    assert actors == asked or (asked is None and actors == 1)
    assert 0 < claim < ACTOR_CPU_SHARE * threads
    assert _placeable(nodes, actors, claim)
    assert not _placeable(nodes, actors, claim + 0.01)  # and no smaller than needed


def test_a_cluster_without_a_spare_cpu_is_an_error():
    with pytest.raises(ArgumentError, match="no node with a CPU"):
        pool_size([0.2], 1)
    with pytest.raises(ArgumentError):
        pool_size([], 1)


GiB = 2**30


def test_actors_share_a_node_s_memory_and_plan_within_it():
    """Each actor claims its share of its node's memory (Ray's `memory` resource) and tiles within it, so
    actors side by side cannot run the node out of memory (an OOM-killed actor would be retried forever)."""
    from adaptbir.serve.batch import actor_memory

    laptop = [(2.0, 16 * GiB)]  # sd21 fp32: a 512×512 restore needs about 6.5 GiB; reads keep 10 %
    assert actor_memory(laptop, 2, 0.8, int(6.5 * GiB)) == (2, int(7.2 * GiB))
    assert actor_memory(laptop, 2, 0.8, int(6.5 * GiB), budget=12 * GiB) == (1, 12 * GiB)  # fewer fit
    with pytest.raises(ArgumentError, match=r"would get 3\.6 GiB .* needs about 6\.5 GiB: run fewer actors"):
        actor_memory(laptop, 4, 0.4375, int(6.5 * GiB))
    cluster = [(64.0, 400 * GiB), (16.0, 60 * GiB)]  # the smallest share decides (the 16-CPU node's)
    assert actor_memory(cluster, 20, 3.2, 6 * GiB) == (20, int(10.8 * GiB))
