"""The node agent's pure parts: restart policy, worker environment, and the generation protocol
(several agents on one in-memory store, as threads of the test)."""
import signal
import threading

import pytest

from ftd.agent.jobstore import JobStore, JobStoreLost, MemoryKV
from ftd.agent.plan import RestartPolicy, describe_exit, parse_host_port, worker_env

pytestmark = pytest.mark.timeout(30)


def test_restart_policy_backs_off_exponentially_and_is_bounded():
    p = RestartPolicy(max_restarts=3, backoff=0.5, backoff_max=1.5)
    assert [p.delay(streak) for streak in range(6)] == [0.0, 0.0, 0.5, 1.0, 1.5, 1.5]
    assert [p.exhausted(g) for g in range(5)] == [False, False, False, False, True]
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="window"):
        RestartPolicy(window=-1)


def test_a_first_restart_is_immediate_and_only_a_crash_loop_backs_off():
    p = RestartPolicy(backoff=1.0, window=30.0)
    streak, delays = 0, []
    for _ in range(4):  # generations that die at once, committing nothing: a crash loop
        streak = p.streak(streak, ran_seconds=0.5, progressed=False)
        delays.append(p.delay(streak))
    assert delays == [0.0, 1.0, 2.0, 4.0]
    # a generation that trained (committed a snapshot, or ran the window) breaks the loop
    assert p.delay(p.streak(streak, ran_seconds=0.5, progressed=True)) == 0.0
    assert p.delay(p.streak(streak, ran_seconds=30.0, progressed=False)) == 0.0


def test_worker_env_is_torchruns_plus_the_daemon():
    env = worker_env({"PATH": "/bin", "RANK": "stale"}, node_rank=2, local_rank=1, nproc=4, nnodes=3,
                     master_addr="10.0.0.1", master_port=29500, generation=2, max_restarts=5,
                     config_path="/etc/ftd/node.toml", endpoint="ipc:///run/ftd/node2.sock")
    assert env["PATH"] == "/bin"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("9", "1", "12", "4")
    assert (env["GROUP_RANK"], env["FTD_NODE_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("2", "2", "10.0.0.1", "29500")
    assert (env["TORCHELASTIC_RESTART_COUNT"], env["TORCHELASTIC_MAX_RESTARTS"]) == ("2", "5")
    assert (env["FTD_CONFIG"], env["FTD_ENDPOINT"]) == ("/etc/ftd/node.toml", "ipc:///run/ftd/node2.sock")


def test_exit_descriptions_and_endpoints():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"
    assert parse_host_port("node0:29400", "--rdzv-endpoint") == ("node0", 29400)
    assert parse_host_port("[::1]:80", "x") == ("::1", 80)
    for bad in ("node0", "node0:", ":80", "node0:99999", "node0:http"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_host_port(bad, "--rdzv-endpoint")


def test_a_failure_anywhere_moves_every_agent_to_the_next_generation():
    kv = MemoryKV()
    a, b = JobStore(kv, 2), JobStore(kv, 2)
    assert a.generation() == 0 and a.join(0) and not a.all_joined(0)
    assert b.join(0) and a.all_joined(0) and b.all_joined(0)
    a.publish_port(0, 1234)
    assert b.port(0) == 1234 and b.port(1) is None
    assert b.end_generation(0, "node 1: worker rank 1 was killed by SIGKILL") == 1
    assert a.end_generation(0, "node 0: worker rank 0 exited with status 1") == 1   # the same failure, seen twice
    assert a.generation() == b.generation() == 1
    assert a.why(0) == "node 1: worker rank 1 was killed by SIGKILL"               # the first cause is kept


def test_a_newcomer_ends_a_running_generation_so_everyone_restarts_with_it():
    kv = MemoryKV()
    agents = [JobStore(kv, 3) for _ in range(3)]
    assert all(s.join(0) for s in agents)
    replacement = JobStore(kv, 3)                     # node 2 lost and replaced while generation 0 runs
    assert not replacement.join(0)
    assert replacement.end_generation(0, "node 2 joined the job") == 1
    assert all(s.join(1) for s in agents[:2]) and replacement.join(1) and replacement.all_joined(1)


def test_the_job_finishes_only_when_every_node_did_and_gives_up_once():
    kv = MemoryKV()
    a, b = JobStore(kv, 2), JobStore(kv, 2)
    a.finish(3)
    assert not a.all_finished(3)
    b.finish(3)
    assert a.all_finished(3)
    a.give_up("4 failures")
    b.give_up("something else")
    assert a.given_up() == b.given_up() == "4 failures"


def test_generation_barrier_across_threads():
    kv = MemoryKV()
    joined = []

    def agent(i):
        s = JobStore(kv, 4)
        s.join(0)
        while not s.all_joined(0):
            pass
        joined.append(i)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(joined) == [0, 1, 2, 3]


def test_a_tcp_store_that_vanished_is_reported_not_raised_raw():
    from ftd.agent.jobstore import tcp_kv
    host = tcp_kv("127.0.0.1", 0, host_it=True, timeout=5)
    store = JobStore(tcp_kv("127.0.0.1", host.port, host_it=False, timeout=2), 2)
    assert store.generation() == 0 and store.end_generation(0, "x") == 1 and store.why(0) == "x"
    del host                                           # node 0's agent is gone
    with pytest.raises(JobStoreLost, match="node 0's agent"):
        for _ in range(50):
            store.generation()
