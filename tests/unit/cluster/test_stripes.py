import itertools
from collections import Counter

import pytest

from ftd.cluster.stripes import Block, Grouping, StripeLayout, UnrecoverableLoss, chunk_bytes, chunk_span, held_bytes
from ftd.errors import FtdError

pytestmark = pytest.mark.timeout(60)

# every group of g <= 8 nodes with 1 <= m <= 3, m < g
LAYOUTS = [StripeLayout.for_group(g, m) for g in range(2, 9) for m in range(1, 4) if m < g]
IDS = [f"g{lay.g}m{lay.m}" for lay in LAYOUTS]


@pytest.mark.parametrize("lay", LAYOUTS, ids=IDS)
def test_each_node_gives_each_chunk_once_and_holds_m_parity(lay):
    for p in range(lay.g):
        chunks = [lay.chunk_index(p, s) for s in range(lay.g)]
        assert sorted(c for c in chunks if c is not None) == list(range(lay.k))
        parity = [s for s in range(lay.g) if lay.is_parity(p, s)]
        assert len(parity) == lay.m
        assert sorted(lay.parity_stripes(p)) == parity
        for c in range(lay.k):
            assert lay.chunk_index(p, lay.data_stripe(p, c)) == c
    for s in range(lay.g):
        # every block number once per stripe, parity holders as the guide says
        assert sorted(lay.block_number(p, s) for p in range(lay.g)) == list(range(lay.g))
        assert lay.parity_holders(s) == tuple((s + j) % lay.g for j in range(lay.m))
        for j, p in enumerate(lay.parity_holders(s)):
            assert lay.block_number(p, s) == lay.k + j
        assert [lay.block_number(p, s) for p in lay.data_holders(s)] == list(range(lay.k))
        assert lay.blocks(s) == tuple(Block(lay.holder(s, b), b) for b in range(lay.g))
        for b in range(lay.g):
            assert lay.block_number(lay.holder(s, b), s) == b


@pytest.mark.parametrize("lay", LAYOUTS, ids=IDS)
def test_every_loss_of_up_to_m_is_recoverable_with_k_distinct_survivors(lay):
    for lost_count in range(lay.m + 1):
        for lost in itertools.combinations(range(lay.g), lost_count):
            assert lay.recoverable(lost)
            plan = lay.plan_recovery(lost)
            assert plan.lost == lost and len(plan.stripes) == lay.g
            rebuilt = Counter()
            for rep in plan.stripes:
                assert len(rep.sources) == lay.k
                assert len({b.number for b in rep.sources}) == lay.k  # distinct block numbers
                assert len({b.position for b in rep.sources}) == lay.k
                for b in rep.sources:
                    assert b.position not in lost and lay.block_number(b.position, rep.stripe) == b.number
                gone = rep.lost_data + rep.lost_parity
                assert sorted(b.position for b in gone) == sorted(lost)
                assert all(b.number < lay.k for b in rep.lost_data)
                assert all(b.number >= lay.k for b in rep.lost_parity)
                assert rep.needs_decode == bool(rep.lost_data)
                if not rep.needs_decode:  # nothing to decode: read the data blocks themselves
                    assert [b.number for b in rep.sources] == list(range(lay.k))
                for b in gone:
                    assert lay.block_number(b.position, rep.stripe) == b.number
                    rebuilt[b.position] += 1
            # the plan rebuilds everything each lost node held: k data chunks and m parity blocks
            assert rebuilt == Counter({p: lay.g for p in lost})


@pytest.mark.parametrize("lay", LAYOUTS, ids=IDS)
def test_every_loss_of_m_plus_one_is_reported_with_the_lost_nodes(lay):
    if lay.m + 1 > lay.g:
        pytest.skip("no such loss")
    nodes = tuple(100 + 10 * p for p in range(lay.g))
    for lost in itertools.combinations(range(lay.g), lay.m + 1):
        assert not lay.recoverable(lost)
        with pytest.raises(UnrecoverableLoss) as e:
            lay.plan_recovery(lost, nodes=nodes, group=7)
        assert e.value.lost_nodes == tuple(nodes[p] for p in lost)
        assert e.value.m == lay.m and e.value.group == 7
        assert isinstance(e.value, FtdError)
        assert "group 7" in str(e.value) and str(list(e.value.lost_nodes)) in str(e.value)


def test_lost_positions_are_validated_and_deduplicated():
    lay = StripeLayout(3, 1)
    assert lay.plan_recovery([2, 2]).lost == (2,)
    with pytest.raises(ValueError, match="lost position 4 is not within 0..3"):
        lay.plan_recovery([4])
    with pytest.raises(ValueError, match="stripe -1"):
        lay.block_number(0, -1)


@pytest.mark.parametrize("k,m,why", [(0, 1, "k >= 1"), (2, 0, "m >= 1"), (200, 57, "exceeds"),
                                     (2.0, 1, "must be an int")])
def test_invalid_k_m(k, m, why):
    with pytest.raises(ValueError, match=why):
        StripeLayout(k, m)


@pytest.mark.parametrize("g,m", [(3, 3), (3, 0), (1, 1), (4, 5)])
def test_for_group_needs_m_below_g(g, m):
    with pytest.raises(ValueError, match="1 <= m < g"):
        StripeLayout.for_group(g, m)


@pytest.mark.parametrize("nodes,k,m,stride", [(n, k, m, s) for n in (4, 6, 8, 12, 16, 24)
                                               for k in (1, 2, 3) for m in (1, 2) for s in (1, 2, 3)
                                               if n % ((k + m) * s) == 0])
def test_grouping_partitions_nodes(nodes, k, m, stride):
    gr = Grouping(nodes, k, m, stride)
    seen = []
    for grp in gr.groups():
        assert len(grp.nodes) == gr.g
        for p, r in enumerate(grp.nodes):
            assert gr.group_of(r) == grp.index and gr.position_of(r) == p and grp.position(r) == p
        if stride > 1:  # members r, r+s, r+2s, ...
            assert all(b - a == stride for a, b in zip(grp.nodes, grp.nodes[1:]))
        seen += grp.nodes
    assert sorted(seen) == list(range(nodes)) and gr.count == nodes // gr.g


def test_grouping_examples():
    assert [g.nodes for g in Grouping(8, 3, 1).groups()] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [g.nodes for g in Grouping(8, 3, 1, stride=2).groups()] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert [g.nodes for g in Grouping(12, 2, 1, stride=2).groups()] == [
        (0, 2, 4), (1, 3, 5), (6, 8, 10), (7, 9, 11)]


def test_stride_spreads_groups_over_racks():
    racks, R = 4, 4  # 16 nodes, racks of 4 consecutive ranks
    gr = Grouping(16, 3, 1, stride=R)
    for grp in gr.groups():
        assert len({r // R for r in grp.nodes}) == gr.g
    for rack in range(racks):
        hit = Counter(gr.group_of(r) for r in range(rack * R, (rack + 1) * R))
        assert max(hit.values()) <= gr.m


def test_group_recovery_names_node_ranks():
    grp = Grouping(12, 2, 1, stride=2).group_for(7)
    assert grp.nodes == (7, 9, 11)
    plan = grp.plan_recovery([9])
    assert plan.lost == (1,)
    with pytest.raises(UnrecoverableLoss, match=r"group 3 lost 2 nodes \[7, 11\].*m=1"):
        grp.plan_recovery([11, 7])
    with pytest.raises(ValueError, match="node 8 is not in group 3"):
        grp.plan_recovery([8])


@pytest.mark.parametrize("args,why", [
    ((7, 3, 1), "multiple of 4"),
    ((8, 3, 1, 3), "multiple of 12 \\(g \\* stride\\)"),
    ((0, 3, 1), "positive"),
    ((8, 3, 1, 0), "stride must be"),
    ((8, 0, 1), "k >= 1"),
])
def test_grouping_errors(args, why):
    with pytest.raises(ValueError, match=why):
        Grouping(*args)


def test_grouping_rank_range():
    gr = Grouping(4, 3, 1)
    with pytest.raises(ValueError, match="node rank 4 is not within 0..3"):
        gr.group_of(4)
    with pytest.raises(ValueError, match="group 1 is not within 0..0"):
        gr.members(1)


def test_sizes():
    assert chunk_bytes(10, 3) == 4 and chunk_bytes(9, 3) == 3 and chunk_bytes(0, 3) == 0
    assert chunk_bytes(10, 3, align=64) == 64
    # a node smaller than the group's largest: its later chunks are padding
    c = chunk_bytes(100, 4)
    assert [chunk_span(d, c, 60) for d in range(4)] == [(0, 25), (25, 50), (50, 60), (60, 60)]
    assert sum(hi - lo for lo, hi in (chunk_span(d, c, 100) for d in range(4))) == 100
    # S + m*c, S * (1 + m/k) when S divides evenly
    assert held_bytes(300, 3, 2) == 300 + 2 * 100
    assert held_bytes(60, 4, 1, group_max_bytes=100) == 60 + 25
    with pytest.raises(ValueError, match="smaller"):
        held_bytes(100, 4, 1, group_max_bytes=60)


@pytest.mark.parametrize("lay", LAYOUTS, ids=IDS)
def test_held_bytes_matches_the_layout(lay):
    S = 1000 * lay.k + 7
    c = chunk_bytes(S, lay.k)
    for p in range(lay.g):
        parity = sum(1 for s in range(lay.g) if lay.is_parity(p, s))
        assert S + parity * c == held_bytes(S, lay.k, lay.m)
    assert held_bytes(S, lay.k, lay.m) / S <= (1 + lay.m / lay.k) * 1.01
