"""The protection bandwidth budget (``protect_bandwidth``): the token bucket, the send-rate meter, the
budget as the links use it (on a fake clock), its config key, and two real links in one process
where an answer carrying blocks waits in the queue until the budget lets it go."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from ftd.cluster.bandwidth import BURST_SECONDS, RateMeter, SendBudget, TokenBucket
from ftd.config import Config, load_config
from ftd.errors import ConfigError
from ftd.units import parse_rate

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_lets_a_burst_through_then_the_rate():
    clock = Clock()
    b = TokenBucket(rate=1000, burst=100, clock=clock)
    assert b.ready()
    b.spend(60)
    assert b.ready()          # 40 left
    b.spend(60)
    assert not b.ready()      # -20: in debt
    assert b.delay() == pytest.approx(21 / 1000)
    clock.now += 0.02         # +20 -> 0: not positive yet
    assert not b.ready()
    clock.now += 0.001
    assert b.ready() and b.delay() == 0.0
    clock.now += 10           # a long idle time saves up no more than the burst
    b.spend(0)
    assert b.tokens == 100


def test_bucket_sends_a_message_larger_than_the_burst_and_pays_it_back():
    clock = Clock()
    b = TokenBucket(rate=1000, burst=10, clock=clock)
    b.spend(5000)             # one frame of 5 KB: goes out whole
    assert not b.ready()
    clock.now += 4.99
    assert not b.ready()
    clock.now += 0.02
    assert b.ready()


def test_bucket_rejects_a_rate_or_burst_that_is_not_positive():
    for rate, burst in ((0, 10), (10, 0), (-1, 10)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)


def test_sending_whenever_ready_stays_within_rate_times_time_plus_burst_and_one_message():
    """What the links do: send a 4 KB frame whenever the bucket is ready, polled every 1 ms, for 10 s."""
    clock = Clock()
    rate, frame = 100_000, 4096
    budget = SendBudget(rate, clock=clock)
    start, sent = clock.now, 0
    while clock.now - start < 10:
        if budget.ready():
            budget.sent(frame)
            sent += frame
        clock.now += 0.001
    assert rate * 10 * 0.95 <= sent <= rate * 10 + rate * BURST_SECONDS + frame
    st = budget.status()
    assert st["budget_bytes_per_second"] == rate and st["sent_bytes"] == sent and st["waits"] > 0
    assert st["peak_send_rate_bytes_per_second"] <= rate + rate * BURST_SECONDS + frame
    assert st["send_rate_bytes_per_second"] == pytest.approx(rate, rel=0.1)


def test_unlimited_budget_never_waits_and_still_measures():
    clock = Clock()
    budget = SendBudget(0, clock=clock)
    for _ in range(100):
        assert budget.ready()
        budget.sent(1 << 20)
    assert budget.waits == 0 and budget.status()["budget_bytes_per_second"] == 0
    assert budget.status()["send_rate_bytes_per_second"] == 100 << 20
    with pytest.raises(ValueError):
        SendBudget(-5)


def test_meter_forgets_what_left_the_window_and_keeps_the_peak():
    clock = Clock()
    m = RateMeter(window=1.0, clock=clock)
    clock.now += 1.0          # a full window after it started: rates count as peaks from here on
    m.add(500)
    clock.now += 0.5
    m.add(300)
    assert m.rate() == 800 and m.peak == 800
    clock.now += 0.6          # the first 500 left the window
    assert m.rate() == 300
    clock.now += 5
    assert m.rate() == 0 and m.peak == 800 and m.total == 800


@pytest.mark.parametrize("text,expected", [("200MB/s", 200_000_000), ("1.5GiB/s", 3 << 29), ("4 KiB/s", 4096),
                                           ("1000", 1000), (0, 0), ("0", 0), (2048, 2048)])
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


def test_parse_rate_errors():
    for bad in ("fast", "-3MB/s", "10%/s", True):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_config_key(tmp_path):
    peers = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]
    path = tmp_path / "c.toml"
    path.write_text(f'peers = {peers!r}\nprotect_bandwidth = "200MB/s"\n'.replace("'", '"'))
    assert load_config(path).protect_bandwidth == 200_000_000
    assert Config(peers=tuple(peers)).protect_bandwidth == 0
    with pytest.raises(ConfigError, match="raise it to at least"):  # a 4 MiB frame would take > peer_timeout / 2
        Config(peers=tuple(peers), protect_bandwidth=500_000)
    with pytest.raises(ConfigError, match="protect_bandwidth must be a rate"):
        Config(peers=tuple(peers), protect_bandwidth=-1)
    path.write_text(f'peers = {peers!r}\nprotect_bandwidth = "lots"\n'.replace("'", '"'))
    with pytest.raises(ConfigError, match="protect_bandwidth"):
        load_config(path)


def test_real_links_hold_chunks_and_block_answers_to_the_budget():
    """Two PeerLinks on loopback: with the budget spent, a chunk is refused (its round sends it later)
    and a block answer waits in the queue, a copy of its bytes; ``pump()`` sends it once the budget
    allows; control messages go at once either way."""
    from ftd.cluster.auth import PeerSecurity
    from ftd.cluster.links import PeerLinks
    from ftd.cluster.messages import PeerMessages
    from ftd.util.procs import free_ports
    peers = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    ctx = zmq.Context()
    links = []
    try:
        for rank in range(2):
            config = Config(job="bw", peers=peers, node_rank=rank, memory_budget=1 << 30,
                            protect_bandwidth=1_000_000)
            links.append(PeerLinks(config, ctx, PeerSecurity(None), PeerMessages("bw", rank, 2, 2)))
        a, b = links
        assert a.budget.rate == 1_000_000
        clock = Clock()
        a.budget = SendBudget(1_000_000, clock=clock)
        b.budget = SendBudget(1_000_000, clock=clock)
        deadline = time.monotonic() + 10
        while not a.send(1, "alive", latest=5, term=0):   # ZMQ_IMMEDIATE: refused until connected
            assert time.monotonic() < deadline, "the links never connected"
            time.sleep(0.02)
        refused = a.dropped
        assert b.router.poll(5000)
        envelope = b.receive(b.router)[0]
        chunk = dict(round=1, step=5, stripe=0, number=0, frame=0, length=200_000, hash=0, zero=False)
        payload = np.ones(200_000, dtype=np.uint8)
        assert a.send(1, "chunk", payload, **chunk)        # the budget had 50 KB: goes, into debt
        assert not a.send(1, "chunk", payload, **chunk)    # in debt: refused, not dropped
        assert a.dropped == refused and a.budget.waits == 1
        assert a.send(1, "alive", latest=6, term=0)                # control messages never wait
        block = np.full(200_000, 7, dtype=np.uint8)
        fields = dict(qid=3, length=200_000, hash=0, error="")
        assert b.reply(envelope, 0, "block", block, **fields)    # goes, into debt
        queued = block.copy()
        assert b.reply(envelope, 0, "block", queued, **fields)   # queued
        queued[:] = 9                                            # the queued answer is a copy
        assert b.reply(envelope, 0, "state", qid=4, recoverable=4, data=[4], parity=[4], rebuilding=False)
        assert len(b._deferred) == 1 and b.traffic.status()["sent"]["by_type"]["block"]["messages"] == 1
        b.pump()
        assert len(b._deferred) == 1                             # still in debt
        clock.now += 0.4
        b.pump()
        assert not b._deferred and b.traffic.status()["sent"]["by_type"]["block"]["messages"] == 2
        got = []
        while len(got) < 3:
            assert a.dealers[1].poll(5000), "node 0 received no answer"
            msg = a.receive(a.dealers[1])
            got.append((msg[1]["type"], None if msg[2] is None else bytes(msg[2][:1])))
        assert got == [("block", b"\x07"), ("state", None), ("block", b"\x07")]
        assert b.budget.status()["sent_bytes"] == b.traffic.status()["sent"]["bytes"]
    finally:
        for link in links:
            link.close()
        ctx.term()


def test_a_budget_too_small_for_the_round_timeout_is_reported_once(caplog):
    """A round whose frames take longer than round_timeout to send at the budget would be abandoned
    every time, and nothing would ever be protected: the node says so in its log, once."""
    from types import SimpleNamespace

    from ftd.cluster.rounds import ProtectionRounds
    config = SimpleNamespace(protect_bandwidth=1_000_000, round_timeout=10.0)
    rounds = ProtectionRounds(SimpleNamespace(config=config))
    small = SimpleNamespace(step=4, queue={1: [SimpleNamespace(lo=0, hi=5_000_000)]})     # 5 s of 10
    big = SimpleNamespace(step=5, queue={1: [SimpleNamespace(lo=0, hi=6_000_000)],
                                         2: [SimpleNamespace(lo=0, hi=6_000_000)]})         # 12 s
    with caplog.at_level("ERROR", logger="ftd.cluster.rounds"):
        rounds._check_budget(small)
        assert not caplog.records
        rounds._check_budget(big)
        rounds._check_budget(big)
    assert len(caplog.records) == 1
    assert "round_timeout" in caplog.records[0].getMessage() and "step 5" in caplog.records[0].getMessage()
    config.protect_bandwidth = 0                                                           # unlimited: never
    ProtectionRounds(SimpleNamespace(config=config))._check_budget(big)
    assert len(caplog.records) == 1
