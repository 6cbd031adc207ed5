"""Ranks that move between nodes (c10d gave a node other ranks after a restart): what the catalog makes
of a version fetched from another node, and of a rank whose trainer now runs elsewhere."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ftd.daemon import requests
from ftd.errors import Refused

from support.catalogs import manifest, snap


@pytest.fixture
def node2(cat):
    """Node 2 of a cluster: it hosted rank 2 (pid 200), step 16 recoverable, the trainer then died."""
    dead = {200}
    cat.alive = lambda pid: pid not in dead
    cat.clustered = True
    cat.dead = dead
    s = cat.register(2, 3, 200, local_world=1)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s, 16)
    cat.sync(target=17, recoverable=16)
    snap(cat, s, 17)                                 # a step after the recoverable one, of the run that ended
    return cat


def fetch_rank1(cat, step=16, name="fetched-r1"):
    cat.fake.allocate(name, 1 << 20)
    cat.adopt(1, 3, name, 1 << 20, step, manifest(), None, origin="fetched from node 1", foreign=True)


def test_a_fetched_version_is_served_but_is_not_part_of_this_nodes_image(node2):
    fetch_rank1(node2)
    assert node2.holds_rank(1, 16) and not node2.holds_rank(0, 16)
    assert node2.restore(1)["versions"][0]["origin"] == "fetched from node 1"
    assert [r.rank for r, _ in node2.buffers_of(16)] == [2]          # the parity of step 16 covers rank 2 only
    assert node2.held_steps() == [16]
    assert node2.image_ranks(16) == [2] and node2.image_ranks(18) == [1, 2]


def test_a_dead_registration_departs_once_this_nodes_trainers_hold_other_ranks(node2):
    fetch_rank1(node2)
    assert node2.candidate() is None                 # nobody trains here yet
    s1 = node2.register(1, 3, 101, local_world=1)["session"]
    node2.sync(target=17, recoverable=16)
    snap(node2, s1, 17)
    assert node2.candidate() == (17, 1024, False)    # rank 2's dead registration no longer blocks protection
    assert node2.ranks[2].until == 16
    assert [b.step for b in node2.ranks[2].complete()] == [16]       # its step 17 (the old run's) is gone
    assert [r.rank for r, _ in node2.buffers_of(16)] == [2]          # step 16's image is whole
    assert [r.rank for r, _ in node2.buffers_of(17)] == [1]          # the new step's image is rank 1
    assert node2.status()["ranks"][1]["departed_after"] == 16
    node2.sync(target=18, recoverable=17)            # a later step is recoverable: the departed rank goes
    assert sorted(node2.ranks) == [1]
    assert node2.fake.segments.keys() == {b.name for b in node2.ranks[1].buffers}


def test_a_live_trainer_never_departs_and_a_rank_that_comes_back_is_hosted_again(node2):
    s = node2.register(2, 3, 201, local_world=1)["session"]
    assert not node2.depart(2, "test")               # its trainer runs here
    node2.detach(2, 201)
    node2.dead.add(201)
    assert node2.depart(2, "it restored elsewhere")
    assert node2.ranks[2].until == 16
    assert node2.restore(2)["versions"][0]["step"] == 16   # it restarts here after all
    assert node2.ranks[2].until is None
    del s


def test_an_arrived_rank_is_in_the_images_after_the_step_it_restored(node2):
    fetch_rank1(node2)
    s1 = node2.register(1, 3, 101, local_world=1)["session"]
    node2.sync(target=17, recoverable=16)
    buf = node2.begin(s1, 17, 1000)["buffer"]
    assert buf != "fetched-r1"                       # the fetched version stays while step 16 is recoverable
    node2.commit(s1, buf, 17, manifest())
    node2.sync(target=18, recoverable=17)
    buf = node2.begin(s1, 18, 1000)["buffer"]        # now it is an ordinary spare buffer
    assert buf == "fetched-r1" and not any(b.foreign for b in node2.ranks[1].buffers)


def test_a_new_run_forgets_where_ranks_were(node2):
    fetch_rank1(node2)
    node2.register(1, 3, 101, local_world=1)
    node2.candidate()                                # rank 2 departs
    node2.reset_to(-1)
    assert sorted(node2.ranks) == [1] and node2.ranks[1].since == -1


class _Moves:
    def __init__(self):
        self.wanted = []

    def want(self, rank, step, world):
        self.wanted.append((rank, step, world))
        return "fetching it"


def _restore(cat, rank, world):
    """A restore request of ``rank`` of a job of ``world`` ranks to a cluster node."""
    node = SimpleNamespace(request_new_run=lambda why: None, restore_wait=lambda: None, lost_error=None,
                           cluster_finished=False, moves=_Moves(), on_restored=lambda rank, step: None)
    daemon = SimpleNamespace(catalog=cat, node=node, standalone_disk=None, config=SimpleNamespace(job="j"))
    return node.moves, requests.RequestHandler(daemon).restore(rank, 1, 101, world=world)


def test_a_rank_this_node_lacks_is_fetched_from_the_node_that_holds_it(node2):
    moves, reply = _restore(node2, 1, world=3)
    assert reply == {"wait": "fetching it"} and moves.wanted == [(1, 16, 3)]


def test_a_trainer_of_world_size_1_is_never_fetched(cat):
    cat.clustered = True             # a node without rank 0 of a 1-rank job (each node runs a job of its own):
    cat.sync(target=17, recoverable=16)  # another node's "rank 0" is not this one's, nothing to fetch
    with pytest.raises(Refused, match="world size 1 must restart on the node it ran on"):
        _restore(cat, 0, world=1)
