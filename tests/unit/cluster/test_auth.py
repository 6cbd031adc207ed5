"""CURVE authentication and encryption of the daemon-to-daemon links (ftd.peerauth)."""
from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ftd.cli import keys
from ftd.cli.registry import register
from ftd.cluster.auth import ClusterKey, KeyFileError, PeerSecurity, generate_key_file, load_key_file
from ftd.errors import FtdError

from support.curve import close_all, open_client, open_server, round_trip

SILENCE_S = 1.0  # how long a refused client is given to get a message through


def make_key(tmp_path, name: str = "cluster.key") -> ClusterKey:
    path = tmp_path / name
    generate_key_file(path)
    return load_key_file(path)


# -- key files -----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_key_file_is_private_refuses_overwrite_and_loads(tmp_path):
    path = tmp_path / "cluster.key"
    old_umask = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        generate_key_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()

    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    assert path.read_bytes() == content

    key = load_key_file(path)
    assert len(key.public) == len(key.secret) == 40
    assert zmq.curve_public(key.secret) == key.public
    assert json.loads(content) == {"public": key.public.decode(), "secret": key.secret.decode()}
    assert key.secret.decode() not in repr(key)
    assert load_key_file(tmp_path / "cluster.key") == key
    assert make_key(tmp_path, "other.key") != key


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "cluster.key"
    generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod") as err:
        load_key_file(path)
    assert f"chmod 600 {path}" in str(err.value)
    assert isinstance(err.value, FtdError) and isinstance(err.value, ValueError)
    path.chmod(0o600)
    load_key_file(path)


@pytest.mark.timeout(30)
def test_missing_or_malformed_key_file_is_refused(tmp_path):
    with pytest.raises(KeyFileError, match="ftd keygen"):
        load_key_file(tmp_path / "absent.key")

    a_pub, a_sec = zmq.curve_keypair()
    b_pub, _ = zmq.curve_keypair()
    bad = {
        "not json": b"public = 1\n",
        "no secret": json.dumps({"public": a_pub.decode()}).encode(),
        "short key": json.dumps({"public": a_pub.decode()[:39], "secret": a_sec.decode()}).encode(),
        "not z85": json.dumps({"public": a_pub.decode()[:39] + "~", "secret": a_sec.decode()}).encode(),
        "mismatched pair": json.dumps({"public": b_pub.decode(), "secret": a_sec.decode()}).encode(),
    }
    for what, data in bad.items():
        path = tmp_path / f"{what.replace(' ', '_')}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        with pytest.raises(KeyFileError):
            load_key_file(path)
        print(what, "ok")


@pytest.mark.timeout(30)
def test_keygen_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ftd")
    register(parser.add_subparsers(dest="command", required=True), keys.COMMANDS)
    out = tmp_path / "job.key"
    args = parser.parse_args(["keygen", "--out", str(out)])
    assert args.func(args) == 0
    load_key_file(out)
    assert args.func(args) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["keygen"])  # --out is required


# -- CURVE links ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_curve_server_and_client_with_the_cluster_key_talk(tmp_path):
    key = make_key(tmp_path)
    sec = PeerSecurity(key)
    ctx = zmq.Context()
    socks: list = []
    try:
        sec.start(ctx)
        router, endpoint = open_server(ctx, sec, socks)
        dealer = open_client(ctx, endpoint, socks, sec.client)
        assert router.get(zmq.MECHANISM) == dealer.get(zmq.MECHANISM) == zmq.CURVE
        frames = round_trip(router, dealer, b"hello peer")
        # the ZAP handler admitted the client; every holder of a shared key is "the cluster"
        assert frames[-1].get("User-Id") == "cluster"
        round_trip(router, dealer, b"again")
    finally:
        close_all(socks, sec, ctx)


def _other_key_file(tmp_path, key):
    other = PeerSecurity(make_key(tmp_path, "other.key"))
    return other.client


def _own_keypair_knowing_cluster_public(tmp_path, key):
    # knows the server's (cluster) public key, so the CURVE handshake itself works; only ZAP refuses it
    pub, sec = zmq.curve_keypair()

    def setup(sock):
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, key.public
    return setup


def _plain(tmp_path, key):
    return None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("intruder", [_other_key_file, _own_keypair_knowing_cluster_public, _plain],
                         ids=["other-key-file", "own-keypair", "plain"])
def test_a_client_without_the_cluster_key_gets_nothing_through(tmp_path, intruder):
    key = make_key(tmp_path)
    sec = PeerSecurity(key)
    ctx = zmq.Context()
    socks: list = []
    monitor = None
    try:
        sec.start(ctx)
        router, endpoint = open_server(ctx, sec, socks)
        monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        socks.append(monitor)
        bad = open_client(ctx, endpoint, socks, intruder(tmp_path, key))
        try:
            bad.send(b"injected", flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not router.poll(int(SILENCE_S * 1000)), "the server received a message from an intruder"
        if intruder is _own_keypair_knowing_cluster_public:
            assert monitor.poll(1000), "expected the ZAP handler to refuse the client key"
            event = recv_monitor_message(monitor)
            assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400

        # the server still serves the job's own peers, and only their messages arrive
        good = open_client(ctx, endpoint, socks, sec.client)
        round_trip(router, good, b"legit")
        assert not router.poll(100)
    finally:
        if monitor is not None:
            router.disable_monitor()
        close_all(socks, sec, ctx)


@pytest.mark.timeout(30)
def test_server_fails_closed_without_zap_handler(tmp_path):
    sec = PeerSecurity(make_key(tmp_path))
    ctx = zmq.Context()
    socks: list = []
    try:
        early = ctx.socket(zmq.ROUTER)
        socks.append(early)
        with pytest.raises(RuntimeError, match="start"):
            sec.server(early)  # start() not called yet
        sec.start(ctx)
        router, endpoint = open_server(ctx, sec, socks)
        sec.stop()  # no ZAP handler any more: even a cluster-key client is refused
        dealer = open_client(ctx, endpoint, socks, sec.client)
        dealer.send(b"hello", flags=zmq.NOBLOCK)
        assert not router.poll(int(SILENCE_S * 1000))
    finally:
        close_all(socks, sec, ctx)


@pytest.mark.timeout(30)
def test_no_key_means_plain_sockets(tmp_path):
    sec = PeerSecurity(None)
    assert not sec.enabled
    assert PeerSecurity.from_key_file(None).key is None
    ctx = zmq.Context()
    socks: list = []
    try:
        sec.start(ctx)
        router, endpoint = open_server(ctx, sec, socks)
        dealer = open_client(ctx, endpoint, socks, sec.client)
        assert router.get(zmq.MECHANISM) == dealer.get(zmq.MECHANISM) == zmq.NULL
        round_trip(router, dealer, b"plain hello")
        # and a plain server accepts a plain client set up without PeerSecurity at all
        round_trip(router, open_client(ctx, endpoint, socks), b"raw")
    finally:
        close_all(socks, sec, ctx)
