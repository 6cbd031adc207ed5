"""A rank's version fetched for a restore on another node: which holders' answers may be used."""
from __future__ import annotations

import pytest

from ftd.cluster.rank_fetch import Unplaceable, check_same_rank


def test_holders_of_a_moving_rank_must_agree_with_each_other_and_the_trainer():
    def info(world=3, sums=(1, 2)):
        return {"world": world, "manifest": {"checksums": list(sums)}}

    check_same_rank("rank 1's version of step 16", 3, {0: info(), 2: info()})  # the holder and a fetched copy
    with pytest.raises(Unplaceable, match="nodes \\[0, 2\\] hold different versions"):
        check_same_rank("rank 1's version of step 16", 3, {0: info(), 2: info(sums=(1, 3))})
    with pytest.raises(Unplaceable, match="of a job of 1 rank"):
        check_same_rank("rank 1's version of step 16", 3, {0: info(world=1)})
