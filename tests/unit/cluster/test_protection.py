"""A protection round simulated in memory: every node's NodeRound, frames handed over by hand.

Checks that the parity each holder stores equals what the codec computes from the zero-padded
chunks, that any m lost images decode back bit-exact from the survivors, and that the peer message
validation refuses what a node did not ask for.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from ftd.cluster.erasure import Codec
from ftd.cluster.messages import PeerMessages
from ftd.cluster.protection import NodeImage, NodeRound
from ftd.cluster.stripes import Grouping
from ftd.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, n, dtype=np.uint8) for n in split] for split in sizes]


def run_round(g, m, sizes, frame_size=256, kind=None):
    """sizes: per node, the arena sizes of its ranks. Returns (rounds, arenas, codec)."""
    grouping = Grouping(g, g - m, m)
    group = grouping.group(0)
    codec = Codec(g - m, m, kind or ("xor" if m == 1 else "rs"))
    arenas = images(sizes)
    node_bytes = [sum(split) for split in sizes]
    rounds = []
    for n in range(g):
        img = NodeImage([memoryview(a) for a in arenas[n]])
        c = -(-max(node_bytes) // (g - m))
        c = -(-c // 64) * 64
        parity = memoryview(bytearray(max(1, m * c)))
        rounds.append(NodeRound(7, 3, node_bytes, group, n, img, parity, codec, frame_size))
    for n, r in enumerate(rounds):
        for d in rounds:
            if d is not r:
                d.receive_meta(n, {"node": n})
    # deliver every queued frame in a shuffled order
    queued = []
    for n, r in enumerate(rounds):
        for dest in list(r.queue):
            while r.next_frame(dest):
                f = r.next_frame(dest)
                payload, digest, zero = r.frame_payload(f)
                queued.append((n, dest, {"round": 7, "step": 3, "stripe": f.stripe, "number": f.number,
                                         "frame": f.frame, "length": f.hi - f.lo, "hash": digest, "zero": zero},
                               None if zero else bytes(payload)))
                r.pop_frame(dest)
    random.Random(1).shuffle(queued)
    acks = 0
    for src, dest, msg, payload in queued:
        senders = rounds[dest].receive_chunk(src, msg, payload)
        acks += len(senders or [])
    return rounds, arenas, codec, acks


def padded_chunks(arena_list, k, c):
    flat = np.concatenate(arena_list) if arena_list else np.zeros(0, np.uint8)
    out = np.zeros(k * c, np.uint8)
    out[:len(flat)] = flat
    return [out[i * c:(i + 1) * c] for i in range(k)]


@pytest.mark.parametrize("g,m", [(2, 1), (4, 1), (5, 2), (6, 3)])
def test_parity_matches_the_codec_and_any_m_losses_decode(g, m):
    sizes = [[1000, 333], [2500], [17], [900, 1, 64]] + [[700]] * 4
    sizes = sizes[:g]
    rounds, arenas, codec, acks = run_round(g, m, sizes)
    k = g - m
    assert all(r.complete for r in rounds)
    c = rounds[0].shape.c
    layout = rounds[0].layout
    chunks = [padded_chunks(a, k, c) for a in arenas]
    for p, r in enumerate(rounds):
        for j, s in enumerate(r.parity_stripes):
            data = [chunks[layout.holder(s, d)][d] for d in range(k)]
            want = bytes(codec.encode(data, (k + j,))[0])
            assert bytes(r.parity[j * c:(j + 1) * c]) == want, f"node {p} stripe {s}"
    assert acks == sum(len(r.shape.frames) * k * m for r in rounds)
    for lost in itertools.combinations(range(g), m):
        for s in range(g):
            blocks = {}
            for b in layout.blocks(s):
                if b.position in lost:
                    continue
                if b.number < k:
                    blocks[b.number] = chunks[b.position][b.number]
                else:
                    j = rounds[b.position].parity_stripes.index(s)
                    blocks[b.number] = bytes(rounds[b.position].parity[j * c:(j + 1) * c])
            nums = sorted(blocks)[:k]
            decoded = codec.decode([blocks[n] for n in nums], nums)
            for d in range(k):
                assert bytes(decoded[d]) == bytes(chunks[layout.holder(s, d)][d])


def test_image_reads_across_arenas_and_pads_with_zeros():
    a, b = np.arange(10, dtype=np.uint8), np.arange(100, 105, dtype=np.uint8)
    img = NodeImage([memoryview(a), memoryview(b)])
    assert img.size == 15
    assert bytes(img.read(8, 12)) == bytes([8, 9, 100, 101])
    assert isinstance(img.read(0, 5), memoryview)  # inside one arena: no copy
    assert bytes(img.read(13, 18)) == bytes([103, 104, 0, 0, 0])
    assert img.read(20, 30) is None
    out = [np.zeros(10, np.uint8), np.zeros(5, np.uint8)]
    NodeImage([memoryview(x) for x in out]).write(8, bytes([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert list(out[0][8:]) == [1, 2] and list(out[1]) == [3, 4, 5, 6, 7]


def test_a_frame_a_node_did_not_expect_is_refused():
    rounds, *_ = run_round(4, 1, [[400], [400], [400], [400]])
    r = rounds[0]
    other = next(s for s in range(4) if s not in r.parity_stripes)
    base = {"round": 7, "step": 3, "stripe": other, "number": 0, "frame": 0, "length": 64, "hash": 0, "zero": True}
    with pytest.raises(ProtocolError, match="holds no parity"):
        r.receive_chunk(1, base, None)
    s = r.parity_stripes[0]
    wrong_block = dict(base, stripe=s, number=2)
    with pytest.raises(ProtocolError, match="sent block"):
        r.receive_chunk(1, wrong_block, None)
    right = r.layout.block_number(1, s)
    n = r.shape.frames[0][1]
    with pytest.raises(ProtocolError, match="has 64 bytes"):
        r.receive_chunk(1, dict(base, stripe=s, number=right), None)
    with pytest.raises(ProtocolError, match="checksum"):
        r.receive_chunk(1, dict(base, stripe=s, number=right, zero=False, hash=1, length=n), b"x" * n)
    with pytest.raises(ProtocolError, match="frame 9"):
        r.receive_chunk(1, dict(base, stripe=s, number=right, frame=9), None)


def test_peer_messages_are_validated_against_the_cluster():
    pm = PeerMessages("job1", 0, nodes=4, group_size=4)
    frames = pm.encode("chunk", b"abc", round=1, step=2, stripe=3, number=0, frame=0, length=3,
                       hash=(1 << 64) - 1, zero=False)
    msg, payload = PeerMessages("job1", 1, 4, 4).decode(frames)
    assert msg["src"] == 0 and payload == b"abc"
    bad = [
        (PeerMessages("other", 1, 4, 4), frames, "job"),
        (PeerMessages("job1", 1, 2, 2), frames, "node 0|outside"),
        (pm, [b"{not json"], "not JSON"),
        (pm, [frames[0]], "needs payload"),
        (pm, [frames[0], b"abcd"], "payload has 4"),
        (pm, pm.encode("state_query", qid=1) + [b"x"], "takes no payload"),
    ]
    for codec, fr, match in bad:
        with pytest.raises(ProtocolError, match=match):
            codec.decode(fr)
    with pytest.raises(ProtocolError, match="stripe=9"):
        PeerMessages("job1", 1, 4, 4).decode(PeerMessages("job1", 0, 16, 16).encode(
            "fetch", qid=1, step=1, stripe=9, number=0, frame=0))
    with pytest.raises(ProtocolError, match="unknown"):
        pm.encode("candidate", target=0, step=0, nbytes=1, mismatch=False, recoverable=-1, latest=0, term=0,
                  extra=1)


def test_a_rebuild_refuses_metadata_it_could_not_trust():
    from ftd.cluster.auth import PeerSecurity
    from ftd.cluster.rebuilder import Holdings, Rebuilder
    from ftd.config import Config
    from ftd.shm.layout import Manifest, chunk_count, plan_layout
    config = Config(job="t", peers=tuple(f"tcp://127.0.0.1:{7100 + i}" for i in range(4)), node_rank=1,
                    memory_budget=1 << 30)
    rb = Rebuilder(config, PeerSecurity(None), Holdings())
    try:
        layout = plan_layout([("float32", (1000,))])
        manifest = Manifest(layout, 4 << 20, (0,) * chunk_count(layout.nbytes, 4 << 20), {"state": {}}).to_json()
        sizes = [4032, 4032, 4032, 4032]  # 1000 float32, padded to 64 bytes
        good = {"node": {"ranks": [{"rank": 0, "world": 1, "capacity": 1 << 20, "manifest": manifest}]},
                "sizes": sizes, "c": 1344, "frame_size": 4 << 20}
        rb._check_meta(0, good)
        bad = [
            ({**good, "c": 999}, "chunk size"),
            ({**good, "sizes": [4032] * 3}, "sizes"),
            ({**good, "frame_size": 12}, "frame size"),
            ({**good, "node": {"ranks": [{**good["node"]["ranks"][0], "capacity": 1 << 40}]}}, "buffer of"),
            ({**good, "node": {"ranks": [{**good["node"]["ranks"][0], "capacity": 100}]}}, "manifest"),
            ({**good, "sizes": [8064, 4032, 4032, 4032], "c": 2688}, "hold 4032 bytes"),
        ]
        for reply, match in bad:
            with pytest.raises((ValueError, ProtocolError), match=match):
                rb._check_meta(0, reply)
    finally:
        rb.close()
