"""A rebuild's frames against simulated survivors: the survivors' real ``DecodeRequests`` and the
rebuilding node's real ``FrameRepair``, every message encoded and validated by ``PeerMessages``,
delivered in-process. Checks the bytes rebuilt, the bytes moved, erasures and the fallbacks."""
import types

import numpy as np
import pytest

from ftd.cluster.decode_service import DecodeRequests
from ftd.cluster.erasure import Codec
from ftd.cluster.messages import PeerMessages
from ftd.cluster.protection import NodeImage, Shape, frame_ranges
from ftd.cluster.rebuild_repair import FrameRepair, Targets
from ftd.cluster.stripes import Grouping, UnrecoverableLoss
from ftd.shm.checksum import chunk_checksum

pytestmark = pytest.mark.timeout(60)

STEP = 7


class Net:
    """g nodes of one group; node ``me`` is rebuilding. Survivors answer ``fetch`` and ``decode``."""

    def __init__(self, g: int, m: int, me: int, c: int = 3000, frame: int = 1024, seed: int = 0):
        self.grouping = Grouping(g, g - m, m)
        self.group = self.grouping.group(0)
        self.layout, self.me, self.g = self.group.layout, me, g
        self.codec = Codec.for_parity(self.layout.k, m)
        self.shape = Shape(c, frame_ranges(c, frame))
        rng = np.random.default_rng(seed)
        self.blocks = {}  # (stripe, number) -> bytes
        for s in range(g):
            data = [rng.integers(0, 256, c, dtype=np.uint8) for _ in range(self.layout.k)]
            parity = self.codec.encode(data)
            for n, b in enumerate(data + [np.frombuffer(bytes(p), np.uint8) for p in parity]):
                self.blocks[(s, n)] = bytes(b)
        self.silent_decoders: set[int] = set()   # daemons that drop "decode" (too old to know it)
        self.corrupt: set[tuple[int, int]] = set()  # (stripe, number) failing its checksum at its holder
        self.inbox: list[list] = []               # frames for the rebuilding node
        self.sent: dict[int, int] = {}            # payload bytes each node sent
        self.nodes = {n: self._node(n) for n in range(g) if n != me}

    # ---- a survivor -------------------------------------------------------------------------
    def _node(self, n: int):
        net = self
        node = types.SimpleNamespace(me=n, layout=self.layout, group=self.group, pos=n, codec=self.codec,
                                     config=types.SimpleNamespace(peer_timeout=10.0))
        node.messages = PeerMessages("j", n, self.g, self.g)
        node.recovery = types.SimpleNamespace(schedule_repair=lambda why: None)

        def fetch(step, stripe, number, f):
            if step != STEP or self.layout.block_number(n, stripe) != number:
                return b"", f"node {n} holds no block {number} of stripe {stripe}", None
            if (stripe, number) in net.corrupt:
                return b"", f"corrupt: node {n}'s block {number} fails its checksum", "data"
            lo, hi = self.shape.frames[f]
            return memoryview(net.blocks[(stripe, number)])[lo:hi], "", None

        node.store = types.SimpleNamespace(fetch=fetch)

        def send(dest, mtype, payload=None, **fields):
            net.deliver(n, dest, node.messages.encode(mtype, payload, **fields), envelope=["from", n])
            return True

        def reply(envelope, dest, mtype, payload=None, **fields):
            frames = node.messages.encode(mtype, payload, **fields)
            net.sent[n] = net.sent.get(n, 0) + (len(frames[1]) if len(frames) > 1 else 0)
            if envelope == ["rebuilder"]:
                net.inbox.append(frames)
            else:
                net.deliver(n, envelope[1], frames, envelope=None)

        node.links = types.SimpleNamespace(send=send, reply=reply)
        node.decodes = DecodeRequests(node)
        return node

    def deliver(self, src: int, dest: int, frames: list, envelope) -> None:
        node = self.nodes.get(dest)
        if node is None:
            return  # lost
        msg, payload = node.messages.decode([bytes(f) for f in frames])
        payload = None if payload is None else memoryview(payload)
        if msg["type"] == "fetch":
            data, error, _ = node.store.fetch(msg["step"], msg["stripe"], msg["number"], msg["frame"])
            node.links.reply(envelope, msg["src"], "block", data, qid=msg["qid"], length=len(data),
                             hash=chunk_checksum(data) if not error else 0, error=error)
        elif msg["type"] == "decode":
            if dest not in self.silent_decoders:
                node.decodes.on_request(msg, envelope)
        elif msg["type"] == "block":
            node.decodes.on_block(msg, payload)

    # ---- the rebuilding node's queries ------------------------------------------------------
    def queries(self):
        net, me_messages, qids = self, PeerMessages("j", self.me, self.g, self.g), iter(range(1, 1 << 30))

        def ask(peer, mtype, **fields):
            q = next(qids)
            net.deliver(net.me, peer, me_messages.encode(mtype, None, qid=q, **fields), envelope=["rebuilder"])
            return q

        def collect(wanted, deadline, first_only=False):
            got = {}
            for frames in list(net.inbox):
                msg, payload = me_messages.decode(frames)
                if wanted.get(msg["qid"]) == msg["src"]:
                    net.inbox.remove(frames)
                    got[msg["qid"]] = (msg, payload)
            return got  # nothing: the deadline passed

        return types.SimpleNamespace(ask=ask, collect=collect)

    def repair(self, alive=None, **kw):
        c = self.shape.c
        image = bytearray(self.layout.k * c)
        parity = bytearray(self.layout.m * c)
        targets = Targets(NodeImage([memoryview(image)]), memoryview(parity))
        result = types.SimpleNamespace(fetched_bytes=0, bad_blocks=[])
        fr = FrameRepair(layout=self.layout, nodes=self.group.nodes, me=self.me, codec=self.codec,
                         queries=self.queries(), step=STEP, shape=self.shape,
                         alive=set(self.nodes) if alive is None else alive, need_data=True, need_parity=True,
                         targets=lambda: targets, own_image=lambda: targets.image, timeout=1.0,
                         unrecoverable=lambda nodes: UnrecoverableLoss(sorted(nodes), self.layout.m, 0),
                         result=result, **kw)
        checksums = fr.run()
        return fr, result, image, parity, checksums

    def check_rebuilt(self, image, parity, checksums) -> None:
        c, k = self.shape.c, self.layout.k
        for s in range(self.g):
            n = self.layout.block_number(self.me, s)
            got = image[n * c:(n + 1) * c] if n < k else parity[(n - k) * c:(n - k + 1) * c]
            assert bytes(got) == self.blocks[(s, n)], f"stripe {s} block {n}"
            if n >= k:
                assert checksums[n - k] == [chunk_checksum(bytes(got[lo:hi])) for lo, hi in self.shape.frames]


@pytest.mark.parametrize("g,m", [(4, 1), (6, 2), (2, 1)])
def test_survivors_decode_and_send_only_the_lost_blocks(g, m):
    net = Net(g, m, me=1)
    fr, result, image, parity, checksums = net.repair()
    net.check_rebuilt(image, parity, checksums)
    assert fr.decoded == g * len(net.shape.frames) and not result.bad_blocks
    assert result.fetched_bytes == g * net.shape.c                       # S * (1 + m/k), not g * S
    assert sum(n.decodes.served for n in net.nodes.values()) == fr.decoded
    assert all(n.decodes.served for n in net.nodes.values())  # the work is spread over every survivor


def test_the_direct_path_fetches_k_blocks_per_stripe():
    net = Net(4, 1, me=2)
    fr, result, image, parity, checksums = net.repair(decoders=False)
    net.check_rebuilt(image, parity, checksums)
    assert fr.decoded == 0 and result.fetched_bytes == 4 * 3 * net.shape.c  # g * S


def test_a_survivor_that_does_not_decode_has_its_frames_fetched_and_decoded_here():
    net = Net(6, 2, me=0)
    net.silent_decoders = {3}
    fr, result, image, parity, checksums = net.repair()
    net.check_rebuilt(image, parity, checksums)
    assert fr.refused == {3} and 0 < fr.decoded < 6 * len(net.shape.frames)
    assert net.nodes[3].decodes.served == 0 and not result.bad_blocks


def test_a_source_failing_its_checksum_at_its_holder_is_an_erasure_and_parity_takes_over():
    net = Net(6, 2, me=4)
    # node 2 gives data block n in stripe s, a source of node 4's block there
    s = next(s for s in range(6) if net.layout.block_number(2, s) < net.layout.k)
    bad = net.layout.block_number(2, s)
    net.corrupt.add((s, bad))
    fr, result, image, parity, checksums = net.repair()
    net.check_rebuilt(image, parity, checksums)
    assert any(f"stripe {s} block {bad}" in b and "fails its checksum" in b for b in result.bad_blocks)
    assert not fr.refused


def test_more_unavailable_blocks_than_parity_raise_unrecoverable_loss():
    net = Net(4, 1, me=1)
    del net.nodes[3]
    with pytest.raises(UnrecoverableLoss) as e:
        net.repair(alive={0, 2})
    assert "1" in str(e.value) and "3" in str(e.value)
    net = Net(4, 1, me=1)
    s = next(s for s in range(4) if net.layout.block_number(1, s) < net.layout.k)
    net.corrupt.add((s, net.layout.block_number(2, s)))  # with node 1 lost, one erasure too many
    with pytest.raises(UnrecoverableLoss):
        net.repair()


def test_decode_requests_that_do_not_fit_get_an_error_not_a_decode():
    net = Net(4, 1, me=1)
    k = net.layout.k
    node = net.nodes[0]
    s = 0
    mine, lost = net.layout.block_number(0, s), net.layout.block_number(1, s)
    others = [n for n in range(4) if n not in (mine, lost)]
    bad = [dict(number=lost, sources=[mine] + others[:k - 2]),              # k - 1 sources
           dict(number=lost, sources=[mine, mine] + others[:k - 2]),        # a duplicate
           dict(number=lost, sources=[lost] + others[:k - 1]),              # asks for a source
           dict(number=lost, sources=others[:k]) if len(others) >= k else None,  # none of node 0's
           dict(number=mine, sources=[lost] + others[:k - 1])]              # a block node 1 does not hold
    for i, fields in enumerate(f for f in bad if f):
        net.inbox.clear()
        msg = PeerMessages("j", 1, 4, 4).encode("decode", None, qid=100 + i, step=STEP, stripe=s, frame=0, **fields)
        net.deliver(1, 0, msg, envelope=["rebuilder"])
        (answer,) = net.inbox
        head, payload = PeerMessages("j", 0, 4, 4).decode(answer)
        assert head["type"] == "decoded" and head["error"] and len(payload) == 0, head
    assert node.decodes.served == 0 and not node.decodes._waiting
