"""Which survivor decodes which frame of a rebuild, and what every node sends (``rebuild_plan``)."""
from collections import Counter

import pytest

from ftd.cluster import rebuild_plan
from ftd.cluster.stripes import StripeLayout

pytestmark = pytest.mark.timeout(60)

CASES = [(2, 1), (4, 1), (6, 2), (8, 2), (8, 3)]


@pytest.mark.parametrize("g,m", CASES, ids=[f"g{g}m{m}" for g, m in CASES])
def test_a_lost_node_gets_one_decoded_frame_per_stripe_frame_from_a_rotating_source_holder(g, m):
    lay = StripeLayout.for_group(g, m)
    nodes = tuple(range(10, 10 + g))  # node ranks are not positions
    frames = 7
    for me in nodes:
        alive = set(nodes) - {me}
        jobs = rebuild_plan.plan(lay, nodes, me, frames, alive, need_data=True, need_parity=True)
        assert len(jobs) == g * frames  # every stripe holds one block of this node
        pos = nodes.index(me)
        for j in jobs:
            assert j.number == lay.block_number(pos, j.stripe)
            numbers = [n for n, _ in j.sources]
            assert len(set(numbers)) == lay.k and j.number not in numbers
            assert all(h != me and nodes[lay.holder(j.stripe, n)] == h for n, h in j.sources)
            assert numbers == sorted(numbers)  # data blocks first: parity only where data is lost
            assert j.decoder in {h for _, h in j.sources}
        # the decodes are spread: with m = 1 every survivor holds a source of every stripe and decodes as
        # many frames as any other (+-1); with m > 1 some are sources of fewer stripes, and decode less
        counts = Counter(j.decoder for j in jobs)
        assert set(counts) == alive
        if m == 1:
            assert max(counts.values()) - min(counts.values()) <= 1
        else:
            assert min(counts.values()) >= 0.5 * len(jobs) / len(alive)

        # bytes: S * (1 + m/k) into the rebuilding node (g chunks of c), k - 1 frames to each decoder
        sizes = [4] * (frames - 1) + [3]
        c = sum(sizes)
        t = rebuild_plan.traffic(jobs, sizes)
        assert sum(t["to_rebuilder"].values()) == g * c
        assert sum(t["to_decoders"].values()) == g * (lay.k - 1) * c
        assert set(t["to_rebuilder"]) <= alive and me not in t["to_decoders"]
        if lay.k > 1:  # spread over the survivors: none sends the new node more than twice its share
            assert max(t["to_rebuilder"].values()) <= 2 * g * c / len(alive)


def test_with_more_nodes_lost_the_sources_skip_them_and_parity_fills_in():
    lay = StripeLayout.for_group(6, 2)  # k = 4
    nodes = tuple(range(6))
    alive = {0, 2, 3, 5}  # node 4 lost too
    jobs = rebuild_plan.plan(lay, nodes, 1, 2, alive, need_data=True, need_parity=True)
    for j in jobs:
        assert all(h in alive for _, h in j.sources) and j.decoder in alive
        assert len(j.sources) == 4
    # a stripe where node 4 gives data is decoded with a parity block in its place
    s = next(s for s in range(6) if lay.block_number(4, s) < lay.k and lay.block_number(1, s) < lay.k)
    assert any(n >= lay.k for n, _ in next(j for j in jobs if j.stripe == s).sources)


def test_bad_blocks_are_erasures_and_too_few_raise_naming_the_nodes():
    lay = StripeLayout.for_group(4, 1)
    nodes = (0, 1, 2, 3)
    srcs = rebuild_plan.sources(lay, nodes, 1, 0, {0, 2, 3}, bad=set(), own_data=False)
    assert len(srcs) == 3
    with pytest.raises(rebuild_plan.NotEnoughBlocks) as e:
        rebuild_plan.sources(lay, nodes, 1, 0, {0, 2, 3}, bad={srcs[0][0]}, own_data=False)
    assert e.value.nodes == sorted({1, nodes[lay.holder(0, srcs[0][0])]})
    with pytest.raises(rebuild_plan.NotEnoughBlocks):
        rebuild_plan.plan(lay, nodes, 1, 1, {0, 2}, need_data=True, need_parity=True)


def test_a_parity_only_repair_plans_only_the_parity_stripes_and_a_refused_decoder_is_skipped():
    lay = StripeLayout.for_group(6, 2)
    nodes = tuple(range(6))
    jobs = rebuild_plan.plan(lay, nodes, 3, 3, set(nodes) - {3}, need_data=False, need_parity=True)
    assert sorted({j.stripe for j in jobs}) == sorted(lay.parity_stripes(3))
    assert all(j.number >= lay.k for j in jobs)
    srcs = jobs[0].sources
    holders = [h for _, h in srcs]
    assert rebuild_plan.decoder(srcs, 0, 0, refused=holders[:-1]) == holders[-1]
    load = {h: 5 for h in holders}
    load[holders[2]] = 1
    assert rebuild_plan.decoder(srcs, 1, 2, load=load) == holders[2] and load[holders[2]] == 2  # least loaded
    assert rebuild_plan.decoder(srcs, 0, 0, refused=holders) is None          # nobody decodes: fetch them
    assert rebuild_plan.decoder(((0, None),) + srcs[1:], 0, 0) is None        # this node's own data is a source
