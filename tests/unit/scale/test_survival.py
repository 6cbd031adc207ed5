"""The failure model's survival probability: the closed form against a Monte Carlo of the same model, on
ftd's real groups; the placements' known answers; the fast Monte Carlo verdict against ftd's own recovery
planner."""
from __future__ import annotations

import numpy as np
import pytest

from ftd.cluster.stripes import Grouping
from ftd.scale import failures
from ftd.scale.failures import HOST, PROCESS, RACK, FailureMix
from ftd.scale.survival import Placement, binomial_at_most, closed_form, loss_recoverable, monte_carlo

pytestmark = pytest.mark.timeout(60)

MIX = FailureMix(1e-4, {PROCESS: 0.2, HOST: 0.6, RACK: 0.2})


@pytest.mark.parametrize("nodes,k,m,rack,strided,q", [
    (20, 4, 1, 2, False, 0.05),    # consecutive groups of 5, racks of 2 that straddle groups
    (20, 4, 1, 2, True, 0.05),     # one node per rack
    (30, 3, 2, 3, False, 0.1),     # racks of 3 in groups of 5: some lose 3 > m
    (30, 3, 2, 3, True, 0.1),
    (24, 1, 1, 2, False, 0.02),    # replication F = 2: a rack is a whole replica pair
    (24, 1, 2, 4, True, 0.2),      # F = 3, strided over racks of 4
    (48, 6, 2, 4, False, 0.0),     # no window losses: rack losses alone
])
def test_closed_form_matches_monte_carlo(nodes, k, m, rack, strided, q):
    place = Placement(nodes, k, m, rack, strided)
    exact = closed_form(place, MIX, q)
    sampled = monte_carlo(place, MIX, q, samples=60_000, seed=nodes + rack)
    for kind in (PROCESS, HOST, RACK, "any"):
        p, se, n = sampled[kind]
        assert n > 0
        assert abs(exact[kind] - p) <= 4.5 * se + 1e-3, (kind, exact[kind], p, se)


def test_placements_give_their_known_answers():
    mix = FailureMix(1e-4, {PROCESS: 0.0, HOST: 0.0, RACK: 1.0})
    # racks of 2 strided one node per rack: a rack costs each of two groups one node, within m = 1
    assert closed_form(Placement(40, 4, 1, 2, True), mix, 0.0)[RACK] == 1.0
    # consecutive groups of 4 = two racks each: a rack costs its group 2 > m = 1
    assert closed_form(Placement(40, 3, 1, 2, False), mix, 0.0)[RACK] == 0.0
    # ... unless m covers the rack
    assert closed_form(Placement(40, 2, 2, 2, False), mix, 0.0)[RACK] == 1.0
    # groups of 5 over racks of 2: racks 0-1, 2-3 inside group 0, rack 4-5 straddles (one node each side)
    assert closed_form(Placement(40, 4, 1, 2, False), mix, 0.0)[RACK] == pytest.approx(0.2)
    # a host alone is always recoverable without window losses; a process failure loses no memory
    p = closed_form(Placement(40, 4, 1, 2, False), failures.published(), 0.0)
    assert p[HOST] == 1.0 and p[PROCESS] == 1.0
    # with window losses, a host's group of 5 survives if none of the other 4 fails meanwhile
    assert closed_form(Placement(40, 4, 1), mix, 0.1)[HOST] == pytest.approx(0.9 ** 4)


def test_binomial_tail():
    assert binomial_at_most(5, 0.3, -1) == 0.0
    assert binomial_at_most(5, 0.3, 5) == pytest.approx(1.0)
    assert binomial_at_most(4, 0.5, 1) == pytest.approx(5 / 16)
    assert binomial_at_most(0, 0.9, 0) == 1.0


def test_a_placement_refuses_what_ftd_refuses():
    with pytest.raises(ValueError, match="multiple of"):
        Placement(1000, 6, 2, 2, True)  # groups of 8 strided over racks of 2: 1000 is no multiple of 16
    with pytest.raises(ValueError, match="multiple of"):
        Placement(1000, 1, 2, 2, False)  # F = 3: 1000 nodes do not split into groups of 3


def test_groups_come_from_ftd_grouping():
    place = Placement(40, 4, 1, 4, True)
    grouping = Grouping(40, 4, 1, 4)
    assert list(place.group_of) == [grouping.group_of(r) for r in range(40)]


def test_monte_carlo_verdicts_agree_with_ftds_recovery_planner():
    """The Monte Carlo's vectorized rule (every touched group lost at most m) is what plan_recovery decides."""
    rng = np.random.default_rng(3)
    for nodes, k, m, rack, strided in [(20, 4, 1, 2, False), (30, 3, 2, 3, True), (12, 1, 1, 2, True)]:
        place = Placement(nodes, k, m, rack, strided)
        for _ in range(300):
            lost = sorted(set(rng.integers(0, nodes, rng.integers(1, 5)).tolist()))
            counts = np.bincount(place.group_of[lost], minlength=place.grouping.count)
            assert loss_recoverable(place, lost) == bool((counts <= m).all()), (nodes, k, m, lost)
