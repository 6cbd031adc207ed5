"""Raw CURVE sockets for the authentication tests: a server, a client, one round trip."""
from __future__ import annotations

import zmq

from ftd.cluster.auth import PeerSecurity


def open_server(ctx: zmq.Context, sec: PeerSecurity, socks: list) -> tuple[zmq.Socket, str]:
    router = ctx.socket(zmq.ROUTER)
    socks.append(router)
    router.linger = 0
    sec.server(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, f"tcp://127.0.0.1:{port}"


def open_client(ctx: zmq.Context, endpoint: str, socks: list, setup=None) -> zmq.Socket:
    dealer = ctx.socket(zmq.DEALER)
    socks.append(dealer)
    dealer.linger = 0
    dealer.sndtimeo = 2000
    dealer.rcvtimeo = 5000
    if setup is not None:
        setup(dealer)
    dealer.connect(endpoint)
    return dealer


def close_all(socks: list, sec: PeerSecurity, ctx: zmq.Context) -> None:
    for s in socks:
        s.close(linger=0)
    sec.stop()
    ctx.term()


def round_trip(router: zmq.Socket, dealer: zmq.Socket, payload: bytes) -> list[zmq.Frame]:
    """Send payload from the dealer, answer it from the router; return the router's frames."""
    dealer.send(payload)
    assert router.poll(5000), "the server received nothing"
    frames = router.recv_multipart(copy=False)
    assert frames[-1].bytes == payload
    router.send_multipart([frames[0].bytes, b"re:" + payload])
    assert dealer.recv() == b"re:" + payload
    return frames
