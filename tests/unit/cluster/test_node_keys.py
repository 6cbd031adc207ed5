"""Per-node CURVE keys: key files and the roster, who may speak for which node, and links that check it."""
from __future__ import annotations

import argparse
import json
import os
import stat
import threading
import time

import pytest
import zmq

from ftd.cli import keys
from ftd.cli.registry import register
from ftd.cluster.auth import PeerSecurity, may_speak_for
from ftd.cluster.keyfiles import (SHARED_IDENTITY, generate_key_file, generate_node_keys, load_key_file,
                                  load_roster)
from ftd.cluster.links import PeerLinks, PeerQueries
from ftd.cluster.messages import PeerMessages
from ftd.config import Config, load_config
from ftd.errors import KeyFileError, UsageError
from ftd.util.procs import free_ports

from support.curve import close_all, open_client, open_server, round_trip

SILENCE_S = 1.0


def node_security(directory, identity: str, **kw) -> PeerSecurity:
    return PeerSecurity.from_key_file(directory / f"{identity}.key", **kw)


# -- key files and the roster ----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_node_keys_are_private_listed_in_the_roster_and_never_overwritten(tmp_path):
    d = tmp_path / "keys"
    old_umask = os.umask(0)
    try:
        paths = generate_node_keys(d, 3, spares=1)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in paths) == ["node-0.key", "node-1.key", "node-2.key", "roster.json", "spare-0.key"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    roster = load_roster(d / "roster.json")
    assert stat.S_IMODE((d / "roster.json").stat().st_mode) == 0o644
    for name in ("node-0", "node-1", "node-2", "spare-0"):
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o600
        key = load_key_file(d / f"{name}.key")
        assert key.identity == name and roster.public_of(name) == key.public
        assert roster.identity_of(key.public) == name
    assert len(set(roster.keys.values())) == 4
    before = {p: p.read_bytes() for p in paths}
    with pytest.raises(KeyFileError, match="already exists"):
        generate_node_keys(d, 4)  # node-3 would be new, but nothing is written when any file exists
    assert not (d / "node-3.key").exists() and {p: p.read_bytes() for p in paths} == before
    assert load_key_file(_shared(tmp_path)).identity is None  # a shared key file loads as before


def _shared(tmp_path):
    path = tmp_path / "cluster.key"
    generate_key_file(path)
    return path


@pytest.mark.timeout(30)
def test_a_bad_roster_or_identity_is_refused_with_what_to_do(tmp_path):
    d = tmp_path / "keys"
    generate_node_keys(d, 2)
    roster = d / "roster.json"
    doc = json.loads(roster.read_text())
    cases = {
        "writable by group": (doc, 0o664, "chmod 644"),
        "not JSON": (None, 0o644, "not valid JSON"),
        "no identities": ({"ftd_roster": 1, "identities": {}}, 0o644, "1..65536 identities"),
        "bad key": ({"ftd_roster": 1, "identities": {"node-0": "short"}}, 0o644, "Z85"),
        "one key twice": ({"ftd_roster": 1, "identities": {"node-0": doc["identities"]["node-0"],
                                                           "node-1": doc["identities"]["node-0"]}}, 0o644, "two identities"),
        "shared name": ({"ftd_roster": 1, "identities": {"cluster": doc["identities"]["node-0"]}}, 0o644, "identity"),
    }
    for what, (content, mode, match) in cases.items():
        bad = tmp_path / f"{what}.json"
        bad.write_text("{nope" if content is None else json.dumps(content))
        os.chmod(bad, mode)
        with pytest.raises(KeyFileError, match=match):
            load_roster(bad)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_roster(tmp_path / "missing.json")
    key = json.loads((d / "node-0.key").read_text())
    key["identity"] = "no spaces allowed"
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(json.dumps(key))
    os.chmod(bad_key, 0o600)
    with pytest.raises(KeyFileError, match="identity"):
        load_key_file(bad_key)


@pytest.mark.timeout(30)
def test_security_refuses_keys_and_rosters_that_do_not_belong_together(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_node_keys(a, 2)
    generate_node_keys(b, 2)
    assert node_security(a, "node-1").per_node  # roster.json next to the key by default
    with pytest.raises(KeyFileError, match="different `ftd keygen` runs"):
        node_security(a, "node-1", roster=b / "roster.json")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    os.replace(a / "node-0.key", lonely / "node-0.key")
    with pytest.raises(KeyFileError, match="does not exist"):  # its roster.json is not next to it
        node_security(lonely, "node-0")
    with pytest.raises(KeyFileError, match="not with a shared cluster key"):
        PeerSecurity.from_key_file(_shared(tmp_path), roster=a / "roster.json")
    with pytest.raises(KeyFileError, match=r"no key for node rank\(s\) \[2, 3\]"):
        node_security(a, "node-1").check_nodes(4)
    node_security(a, "node-1").check_nodes(2)


@pytest.mark.timeout(10)
def test_a_peer_may_speak_only_for_the_node_its_key_is_for():
    assert may_speak_for("node-1", 1) and not may_speak_for("node-1", 2) and not may_speak_for("node-1", 0)
    assert not may_speak_for(None, 1) and not may_speak_for("spare-0", 1)
    assert may_speak_for(SHARED_IDENTITY, 0) and may_speak_for(SHARED_IDENTITY, 7)  # a shared key: the cluster
    # a membership record in which spare-0 took lost node 1's rank plugs in as a callable or a mapping
    moved = {0: "node-0", 1: "spare-0", 2: "node-2"}
    assert may_speak_for("spare-0", 1, moved.get) and not may_speak_for("node-1", 1, moved.get)
    sec = PeerSecurity(None)
    assert sec.may_speak(None, 3)  # no security, nothing to check
    assert not sec.per_node and sec.mode == "none"


@pytest.mark.timeout(10)
def test_a_replaced_identity_map_moves_a_rank_to_a_spare(tmp_path):
    d = tmp_path / "k"
    generate_node_keys(d, 2, spares=1)
    sec = node_security(d, "node-0")
    assert sec.may_speak("node-1", 1) and not sec.may_speak("spare-0", 1)
    spare = load_key_file(d / "spare-0.key").public
    sec.set_identity_for({0: "node-0", 1: "spare-0"})
    assert sec.may_speak("spare-0", 1) and not sec.may_speak("node-1", 1)
    assert sec.server_key(1) == spare  # and its DEALER to rank 1 now pins the spare's key


@pytest.mark.timeout(10)
def test_keygen_command_writes_per_node_keys(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ftd")
    register(parser.add_subparsers(dest="command", required=True), keys.COMMANDS)
    d = tmp_path / "job"
    args = parser.parse_args(["keygen", "--dir", str(d), "--nodes", "2", "--spares", "1"])
    assert args.func(args) == 0
    assert "node-{node_rank}.key" in capsys.readouterr().out
    assert load_roster(d / "roster.json").keys.keys() == {"node-0", "node-1", "spare-0"}
    assert args.func(args) == 1 and "already exists" in capsys.readouterr().err
    args = parser.parse_args(["keygen", "--out", str(tmp_path / "x.key"), "--nodes", "2"])
    with pytest.raises(UsageError, match="--dir"):
        args.func(args)


@pytest.mark.timeout(10)
def test_one_config_names_every_nodes_own_key_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('peers = ["tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000"]\n'
                   'peer_key_file = "/keys/node-{node_rank}.key"\npeer_roster = "/keys/roster.json"\n')
    c = load_config(cfg, node_rank=1)
    assert str(c.peer_key_file) == "/keys/node-1.key" and str(c.peer_roster) == "/keys/roster.json"


# -- the sockets ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_per_node_curve_names_the_client_and_refuses_keys_outside_the_roster(tmp_path):
    d, other = tmp_path / "k", tmp_path / "other"
    generate_node_keys(d, 3)
    generate_node_keys(other, 3)
    server = node_security(d, "node-0")
    ctx = zmq.Context()
    socks: list = []
    try:
        server.start(ctx)
        router, endpoint = open_server(ctx, server, socks)
        client = node_security(d, "node-1")
        dealer = open_client(ctx, endpoint, socks, lambda s: client.client(s, 0))
        assert round_trip(router, dealer, b"hi")[-1].get("User-Id") == "node-1"
        stranger = node_security(other, "node-1")  # the same name, a key not in this job's roster
        # (it pins node 0's real server key, so only the ZAP handler stands in its way)
        def stranger_setup(s):
            stranger.client(s, 0)
            s.curve_serverkey = server.key.public
        intruder = open_client(ctx, endpoint, socks, stranger_setup)
        intruder.send(b"let me in")
        assert not router.poll(int(SILENCE_S * 1000)), "a key outside the roster got a message through"
        # a client of node 2 pins node 2's key: node 0's server cannot answer for it
        wrong = open_client(ctx, endpoint, socks, lambda s: client.client(s, 2))
        wrong.send(b"to node 2")
        assert not router.poll(int(SILENCE_S * 1000)), "a client talked to a server whose key it did not pin"
    finally:
        close_all(socks, server, ctx)


@pytest.mark.timeout(30)
def test_links_refuse_a_message_whose_src_the_sender_may_not_speak_for(tmp_path):
    """Three PeerLinks with per-node keys on loopback: node 1 sends as itself (taken) and as node 2
    (refused, counted once per message); a reply on a DEALER from another src than the node asked is
    refused too."""
    d = tmp_path / "k"
    generate_node_keys(d, 3)
    peers = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    contexts, links, secs = [], [], []
    try:
        for rank in range(3):
            ctx = zmq.Context()
            sec = node_security(d, f"node-{rank}")
            sec.start(ctx)
            contexts.append(ctx)
            secs.append(sec)
            config = Config(job="tk", peers=peers, node_rank=rank, memory_budget=1 << 30)
            links.append(PeerLinks(config, ctx, sec, PeerMessages("tk", rank, 3, 3)))
        zero, one = links[0], links[1]
        deadline = time.monotonic() + 10
        while not one.send(0, "alive", latest=5, term=0):
            assert time.monotonic() < deadline, "the links never connected"
            time.sleep(0.02)
        forged = PeerMessages("tk", 2, 3, 3)  # node 1's key, node 2's name
        one.dealers[0].send_multipart(forged.encode("alive", latest=9, term=0))
        one.dealers[0].send_multipart(forged.encode("state_query", qid=4))
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and zero.impostors < 2:
            if zero.router.poll(100):
                got.append(zero.receive(zero.router))
        assert zero.impostors == 2
        taken = [g for g in got if g is not None]
        assert [(m["src"], m["latest"]) for _, m, _ in taken] == [(1, 5)]
        envelope = taken[0][0]
        # node 0 answers on node 1's DEALER, but claims node 2's name: refused by the pinning's rule
        liar = PeerMessages("tk", 2, 3, 3).encode("state", qid=1, recoverable=1, data=[], parity=[], rebuilding=False)
        zero.router.send_multipart(envelope + liar)
        assert one.dealers[0].poll(5000)
        assert one.receive(one.dealers[0]) is None and one.impostors == 1
        # a rebuild thread's queries: node 0's answer naming node 2 is not taken for node 2's, nor for its own
        config1 = Config(job="tk", peers=peers, node_rank=1, memory_budget=1 << 30)
        queries = PeerQueries(config1, secs[1], PeerMessages("tk", 1, 3, 3), threading.Event())
        try:
            qid = queries.ask(0, "state_query")
            assert zero.router.poll(5000)
            envelope, asked, _ = zero.receive(zero.router)
            assert asked["qid"] == qid
            for src in (2, 0):
                zero.router.send_multipart(envelope + PeerMessages("tk", src, 3, 3).encode(
                    "state", qid=qid, recoverable=src, data=[], parity=[], rebuilding=False))
            got = queries.collect({qid: 2, qid + 1: 0}, time.monotonic() + 2)
            assert got == {}  # the liar's answer claims node 2 on the socket to node 0; node 0's has the wrong qid
            qid = queries.ask(0, "state_query")
            envelope, _, _ = (zero.router.poll(5000), zero.receive(zero.router))[1]
            zero.router.send_multipart(envelope + PeerMessages("tk", 0, 3, 3).encode(
                "state", qid=qid, recoverable=7, data=[], parity=[], rebuilding=False))
            assert queries.collect({qid: 0}, time.monotonic() + 5)[qid][0]["recoverable"] == 7
        finally:
            queries.close()
    finally:
        for link in links:
            link.close()
        for sec, ctx in zip(secs, contexts):
            sec.stop()
            ctx.term()


def test_a_spare_that_took_a_rank_speaks_for_it_and_the_old_key_does_not(tmp_path):
    """Per-node keys and the membership record together, as a daemon plugs them (node.py): once the
    record gives rank 2 to spare-0, node 0's DEALER to rank 2 re-points to the spare and pins its key,
    the spare's messages as node 2 are taken and the old node-2 key's are refused."""
    from ftd.cluster.membership import Membership
    d = tmp_path / "k"
    generate_node_keys(d, 3, spares=1)
    peers = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    spare_at = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    record = Membership.from_peers(peers).admit(2, spare_at, "spare-0")
    contexts, links = [], []
    try:
        for rank, identity, bind in ((0, "node-0", peers), (2, "spare-0", (*peers[:2], spare_at)),
                                     (2, "node-2", peers)):
            ctx = zmq.Context()
            sec = node_security(d, identity)
            sec.start(ctx)
            contexts.append((sec, ctx))
            config = Config(job="tk", peers=bind, node_rank=rank, memory_budget=1 << 30)
            link = PeerLinks(config, ctx, sec, PeerMessages("tk", rank, 3, 3))
            if rank == 0:  # node 0 learns the record after its links exist, as a daemon does
                sec.set_identity_for(record.identity_for)
                link.may_send = record.may_send
            links.append(link)
        zero, spare, old = links
        zero.repoint(2, spare_at)
        deadline = time.monotonic() + 10
        while not zero.send(2, "alive", latest=1, term=0):  # connects only if the spare's key is pinned
            assert time.monotonic() < deadline, "node 0 never reached the spare under its key"
            time.sleep(0.02)
        assert spare.router.poll(5000) and spare.receive(spare.router)[1]["src"] == 0
        for sender in (spare, old):
            deadline = time.monotonic() + 10
            while not sender.send(0, "alive", latest=3, term=0):
                assert time.monotonic() < deadline, "the links never connected"
                time.sleep(0.02)
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (zero.impostors < 1 or not got):
            if zero.router.poll(100):
                m = zero.receive(zero.router)
                if m is not None:
                    got.append(m[1]["src"])
        assert got == [2] and zero.impostors == 1  # the spare's taken as node 2; the old node-2 key's refused
    finally:
        for link in links:
            link.close()
        for sec, ctx in contexts:
            sec.stop()
            ctx.term()
