"""The peer-message counters in `ftd status --json` on a real cluster: 4 nodes in groups of 2 (m = 1),
a trainer per node for a few steps. Node 3's group is {2, 3}: past its start-up survey of every peer,
it exchanges round data with node 2 only and coordination with node 0 only; what one group peer
counted as sent the other counted as received."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.clusters import ENV, LocalCluster
from support.jobs import ROOT

pytestmark = pytest.mark.timeout(120)


def status_json(c: LocalCluster, node: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--json", "--endpoint", c.endpoints[node]],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["cluster"]


def test_status_counts_peer_messages_by_type_peer_and_bytes():
    c = LocalCluster(4, 1, ("--group-size", "2"))
    try:
        c.run_trainers(8)
        assert c.settled(quiet=1.0) >= 0
        cl = [c.status(n)["cluster"] for n in range(3)] + [status_json(c, 3)]  # node 3's through the CLI
        t3 = cl[3]["traffic"]
        # node 3 asked every peer what it holds at start-up (a query); after that it talks to its group peer
        # 2 (round data) and to node 0 (coordination) only
        assert set(t3["sent"]["by_peer"]) == {"0", "1", "2"}
        assert t3["sent"]["by_peer"]["1"]["messages"] <= t3["sent"]["by_kind"]["query"]["messages"]
        assert set(t3["sent"]["by_type"]) >= {"candidate", "alive", "done", "chunk", "node_meta"}
        assert t3["sent"]["by_kind"]["data"]["messages"] > 0 and t3["sent"]["by_kind"]["coordination"]["messages"] > 0
        rounds = cl[3]["stats"]["rounds_done"]
        assert rounds >= 1 and t3["sent"]["by_type"]["done"]["messages"] >= rounds
        assert t3["sent"]["by_type"]["chunk"]["bytes"] > 0
        assert t3["sent"]["bytes"] == sum(v["bytes"] for v in t3["sent"]["by_peer"].values())
        queries = t3["sent"]["by_kind"]["query"]["messages"]
        assert 0 <= t3["sent"]["by_peer"]["2"]["messages"] - t3["sent"]["by_kind"]["data"]["messages"] <= queries
        assert 0 <= t3["sent"]["by_peer"]["0"]["messages"] - t3["sent"]["by_kind"]["coordination"]["messages"] \
            <= queries
        # node 0 runs the coordinator: what it says to itself is counted apart
        assert cl[0]["traffic"]["in_process"]["messages"] > 0 and cl[3]["traffic"]["in_process"]["messages"] == 0
        # settled, nothing in flight between the group peers: what one sent the other received, to the byte
        assert cl[3]["traffic"]["sent"]["by_peer"]["2"] == cl[2]["traffic"]["received"]["by_peer"]["3"]
        assert cl[2]["traffic"]["sent"]["by_peer"]["3"] == cl[3]["traffic"]["received"]["by_peer"]["2"]
        text = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--endpoint", c.endpoints[3]], env=ENV,
                              cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        assert "peer messages: sent" in text
    finally:
        left = c.close()
    assert not left, f"shared memory left behind: {left}"


@pytest.mark.timeout(180)
def test_a_rebuilt_node_receives_its_data_and_parity_only():
    """A lost node of 4 (m = 1, k = 3) comes back with about S * (1 + m/k) bytes received, each frame
    decoded by a survivor; with ``rebuild_decoders = false`` it fetches k blocks per stripe, g * S."""
    c = LocalCluster(4, 1)
    try:
        extra = ("--width", "384")  # about 3.5 MiB of model and AdamW state per node
        c.run_trainers(15, step_sleep=0.05, extra=extra)
        step = c.settled()
        assert step >= 0
        received = {}
        config = Path(c.config(2))
        own = config.read_text()
        for mode in ("survivors", "direct"):
            c.kill_node(2)  # finds the daemon by its config file's path
            if mode == "direct":
                config.write_text(own + "\nrebuild_decoders = false\n")
            c.restart_daemon(2)
            r = c.recover(2)
            config.write_text(own)
            assert r.returncode == 0 and f"holds step {step}" in r.stdout, r.stdout + r.stderr
            cl = status_json(c, 2)
            rebuild = next((b for b in reversed(cl["rebuilds"]) if b.get("rebuilt_data")), cl["rebuilds"])
            assert rebuild["rebuilt_data"] and rebuild["rebuilt_parity"] and not rebuild["bad_blocks"], rebuild
            S = next(v["data_bytes"] for v in cl["versions"] if v["step"] == step)
            received[mode] = (cl["traffic"]["received"], rebuild, S)
        (got, rebuild, S), (direct, drebuild, _) = received["survivors"], received["direct"]
        ideal = S * (1 + 1 / 3)
        # every frame decoded by a survivor, and nothing but its own data and parity came in (plus the
        # survey, metadata and coordination: a few KiB)
        assert rebuild["decoded_frames"] > 0 and "block" not in got["by_type"]
        assert ideal <= got["by_type"]["decoded"]["bytes"] <= ideal * 1.02 + 64 * 1024
        assert got["bytes"] <= ideal * 1.05 + 256 * 1024, (got["bytes"], ideal)
        assert sum(got["by_peer"][p]["bytes"] for p in ("0", "1", "3")) == got["bytes"]
        served = sum(c.status(n)["cluster"]["stats"]["decodes_served"] for n in (0, 1, 3))
        assert served >= rebuild["decoded_frames"] and all(
            got["by_peer"][p]["bytes"] > ideal / 6 for p in ("0", "1", "3"))  # spread over the survivors
        # the path before: k = 3 blocks of every stripe into the node, g * S
        assert drebuild["decoded_frames"] == 0 and "decoded" not in direct["by_type"]
        assert direct["by_type"]["block"]["bytes"] >= 4 * S * 0.98
    finally:
        left = c.close()
    assert not left, f"shared memory left behind: {left}"
