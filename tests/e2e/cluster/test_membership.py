"""Membership that can change, with real daemons: a lost node's replacement under an address of its own.

A local cluster (`ftd launch`, 3 nodes, m = 1, peer_timeout 3 s) and one tiny_trainer per node. Node 2
(or node 0, the coordinator's: node 1 takes over and admits the replacement) is lost; its replacement daemon starts empty with the same config and ``FTD_PEER_ENDPOINT`` naming
another host's address (127.0.0.2, another port): it claims node 2 from the coordinator, which admits
it once node 2's old address has been silent for peer_timeout; every node re-points its link to node 2,
the replacement rebuilds node 2's snapshots, every trainer resumes the same step bit for bit, and the
next rounds protect through the new address. A daemon that claims a rank whose member answers is
refused and stops: the old node's config coming back at the old address once the replacement runs (a
stale announcement), and a second daemon for a live node under a new address.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.util.procs import free_ports, wait_for

from support.clusters import ENV, LocalCluster, assert_matches_reference, reference_losses
from support.soak import soak_marks

PEER_TIMEOUT = "3"
STEPS = 100


@pytest.fixture
def cluster():
    c = LocalCluster(3, 1, ("--peer-timeout", PEER_TIMEOUT))
    yield c
    left = c.close()
    assert not left, f"shared memory left behind: {left}"


def members(c: LocalCluster, node: int) -> list[dict]:
    return c.status(node)["cluster"]["membership"]["members"]


def config_apart(c: LocalCluster, node: int, name: str) -> str:
    """Node ``node``'s config with a runtime and shared-memory directory of its own: a daemon on another host."""
    home = c.dir / name
    (home / "shm").mkdir(parents=True)
    text = Path(c.config(node)).read_text()
    text = re.sub(r'^runtime_dir = .*$', f'runtime_dir = "{home / "run"}"', text, flags=re.MULTILINE)
    path = c.dir / f"{name}.toml"
    path.write_text(text + f'shm_dir = "{home / "shm"}"\n')
    return str(path)


def start_daemon(c: LocalCluster, config: str, log: str, endpoint: str | None = None) -> subprocess.Popen:
    env = dict(ENV, FTD_PEER_ENDPOINT=endpoint) if endpoint else ENV
    return c._popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", config], env=env,
                    stdout=open(c.dir / log, "wb"), stderr=subprocess.STDOUT)


def refused(c: LocalCluster, p: subprocess.Popen, log: str) -> str:
    """The log of a daemon that must stop with status 1 because its claim was refused."""
    assert p.wait(60) == 1, (c.dir / log).read_text()
    return (c.dir / log).read_text()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("lost", [pytest.param(2, id="node2", marks=soak_marks("the coordinator's node lost and replaced, "
                                                                               "the [node0-the-coordinator] case")),
                                  pytest.param(0, id="node0-the-coordinator")])
def test_a_replacement_under_its_own_address_takes_the_lost_nodes_place(cluster, lost):
    c = cluster
    survivor = 1 if lost == 0 else 0  # who coordinates once the node is replaced (node 1 takes over from 0)
    ref = {n: reference_losses(c.dir, n, STEPS) for n in range(3)}
    for n in range(3):
        c.start_trainer(n, STEPS, step_sleep=0.05)
    wait_for(lambda: c.status(survivor)["cluster"]["recoverable"] >= 3, 60, "a recoverable step")
    old = members(c, survivor)[lost]["endpoint"]
    c.kill_node(lost)         # its daemon and trainer
    c.kill_trainers()         # the others are restarted too, as torchrun would
    recoverable = c.status(survivor)["cluster"]["recoverable"]
    new = f"tcp://127.0.0.2:{free_ports(1, '127.0.0.2')[0]}"
    c.restart_daemon(lost, endpoint=new, timeout=90)  # admitted after peer_timeout, then it rebuilds
    r = c.recover(lost)
    assert r.returncode == 0 and f"holds step {recoverable}" in r.stdout, r.stdout + r.stderr
    for n in range(3):  # every node, the coordinator included, knows the node at its new address
        table = members(c, n)
        assert table[lost] == {"node": lost, "endpoint": new, "generation": 1, "identity": f"node-{lost}"}, n
        assert [m["generation"] for m in table] == [int(m["node"] == lost) for m in table]
    assert c.status(lost)["cluster"]["peer_endpoint"] == new
    change = c.status(survivor)["cluster"]["membership"]["changes"][-1]
    assert change["node"] == lost and change["was"] == old and f"admitted by node {survivor}" in change["how"]
    text = c.ftd("status", "--config", c.config(1))
    assert text.returncode == 0 and f"node {lost} at {new} (generation 1)" in text.stdout, text.stdout

    assert c.run_trainers(STEPS, step_sleep=0.05) == [recoverable] * 3  # slow enough for rounds to complete
    assert_matches_reference(c, ref, STEPS)
    assert c.settled() > recoverable  # rounds went on with the node at its new address

    # the lost node's config comes back at the old address: a stale claim, refused while its replacement answers
    stale = start_daemon(c, config_apart(c, lost, "old-node"), "stale.log")
    assert "a live node is not replaced" in refused(c, stale, "stale.log")
    assert [members(c, n)[lost]["endpoint"] for n in range(3)] == [new] * 3
    assert c.status(survivor)["cluster"]["membership"]["refused"][-1]["endpoint"] == old


@pytest.mark.timeout(150)
def test_a_spare_takes_the_place_of_a_lost_node(cluster):
    c = cluster
    ref = {n: reference_losses(c.dir, n, STEPS) for n in range(3)}
    ends = {f"spare-{i}": f"tcp://127.0.0.{3 + i}:{free_ports(1, f'127.0.0.{3 + i}')[0]}" for i in range(2)}
    spares = {name: c._popen([sys.executable, "-m", "ftd.cli", "spare", "--config", c.config(0), "--peer-endpoint",
                              ep, "--name", name], stdout=open(c.dir / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
              for name, ep in ends.items()}
    wait_for(lambda: c.status(0)["cluster"]["membership"]["spares"] == ends, 30, "both spares to offer themselves")
    for n in range(3):
        c.start_trainer(n, STEPS, step_sleep=0.05)
    wait_for(lambda: c.status(0)["cluster"]["recoverable"] >= 3, 60, "a recoverable step")
    c.kill_node(2)
    c.kill_trainers()
    recoverable = c.status(0)["cluster"]["recoverable"]
    wait_for(lambda: c.ping(2), 60, "a spare to become node 2 and rebuild it")
    taken = members(c, 0)[2]
    assert taken["identity"] in ends and taken["endpoint"] == ends[taken["identity"]] and taken["generation"] == 1
    for n in (1, 2):
        assert members(c, n)[2] == taken
    other = next(name for name in ends if name != taken["identity"])
    assert spares[other].poll() is None and "admitted" not in (c.dir / f"{other}.log").read_text()  # one per rank
    assert "admitted as node 2" in (c.dir / f"{taken['identity']}.log").read_text()
    assert c.status(0)["cluster"]["membership"]["spares"] == {other: ends[other]}
    r = c.recover(2)
    assert r.returncode == 0 and f"holds step {recoverable}" in r.stdout, r.stdout + r.stderr
    assert c.run_trainers(STEPS, step_sleep=0.05) == [recoverable] * 3
    assert_matches_reference(c, ref, STEPS)


@pytest.mark.timeout(90)
def test_a_claim_of_a_live_node_is_refused(cluster):
    c = cluster
    wait_for(lambda: all(c.ping(n) for n in range(3)), 30, "the cluster to be ready")
    before = [members(c, n) for n in range(3)]
    impostor = start_daemon(c, config_apart(c, 1, "impostor"), "impostor.log",
                            endpoint=f"tcp://127.0.0.3:{free_ports(1, '127.0.0.3')[0]}")
    log = refused(c, impostor, "impostor.log")
    assert "node 1 answers at" in log and "a live node is not replaced" in log, log
    assert [members(c, n) for n in range(3)] == before
    assert all(c.ping(n) for n in range(3))
    table = c.ftd("status", "--dir", str(c.dir))
    assert table.returncode == 0 and f"members: node 0 at {before[0][0]['endpoint']} (generation 0)" in table.stdout
    refusal = c.status(0)["cluster"]["membership"]["refused"][-1]
    assert refusal["node"] == 1 and "a live node is not replaced" in refusal["reason"]
