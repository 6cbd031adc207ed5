"""The trainer hook against a daemon served from a thread of the test process."""
import logging
import os

import pytest
import torch
from torch import nn

import ftd
from ftd.errors import DaemonUnavailable

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def patient_hook(monkeypatch):
    """In production an optimizer step waits at most 50 ms for the daemon to hand out a buffer, then
    skips that snapshot; on a loaded CI machine a round trip can take longer, and these tests need
    every snapshot whose hook behaviour they check to have started."""
    monkeypatch.setattr("ftd.trainer.client.BEGIN_GRACE_SECONDS", 5.0)


def make_state(seed=0, width=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    return {"model": model, "optim": opt, "sched": sched, "meta": {"epoch": 1, "name": "run"},
            "ema": torch.arange(5.0)}


def train_step(state):
    model, opt = state["model"], state["optim"]
    loss = model(torch.randn(4, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    state["sched"].step()


def tensors_of(state):
    return {"model": {k: v.clone() for k, v in state["model"].state_dict().items()},
            "moments": [v.clone() for p in state["optim"].state.values() for v in p.values() if torch.is_tensor(v)],
            "sched": state["sched"].state_dict(), "meta": dict(state["meta"]), "ema": state["ema"].clone()}


def assert_same(a, b):
    assert a["sched"] == b["sched"] and a["meta"] == b["meta"] and torch.equal(a["ema"], b["ema"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["moments"]) == len(b["moments"])
    for x, y in zip(a["moments"], b["moments"]):
        assert torch.equal(x, y)


def test_snapshot_and_restore_round_trip_in_place(thread_daemon):
    d = thread_daemon()
    state = make_state()
    with ftd.Client(d.endpoint) as client:
        assert client.restore(state) is None           # nothing yet
        for step in range(3):
            train_step(state)
            client.snapshot(step, state)
        assert client.wait(10)
        expected = tensors_of(state)
        rng_next = torch.rand(3)
        for _ in range(2):
            train_step(state)
        state["meta"]["epoch"] = 99
        model_obj = state["model"]
        assert client.restore(state) == 2
        assert state["model"] is model_obj            # Stateful values are loaded in place
        assert_same(tensors_of(state), expected)
        assert torch.equal(torch.rand(3), rng_next)   # RNG restored too
        # a fresh process-like state (new objects, no optimizer moments yet) restores the same
        fresh = make_state(seed=5)
        assert client.restore(fresh) == 2
        assert_same(tensors_of(fresh), expected)
        # a snapshot whose copy could not start before the next optimizer step (the previous one was
        # still being committed: these steps take microseconds) is skipped, never waited for
        assert client.stats["committed"] + client.stats["skipped_busy"] == 3 and client.stats["failed"] == 0


def test_buffers_changed_in_the_forward_pass_are_captured_as_at_snapshot(thread_daemon):
    d = thread_daemon(chunk_size=4096)
    state = make_state(width=512)
    with ftd.Client(d.endpoint) as client:
        client._chunk_delay = 0.01                    # keep the copy running during the next forward
        train_step(state)
        client.snapshot(0, state)
        expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
        state["model"](torch.randn(4, 8))             # BatchNorm running stats change in place now
        assert not torch.equal(expected["1.running_mean"], state["model"][1].running_mean)
        assert client.wait(30)
        fresh = make_state(seed=3, width=512)
        client.restore(fresh)
        for k, v in fresh["model"].state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_pre_step_hook_waits_for_the_copy(thread_daemon):
    d = thread_daemon(chunk_size=4096)
    state = make_state(width=512)
    with ftd.Client(d.endpoint) as client:
        train_step(state)
        client.snapshot(0, state)                      # the buffers set up, however slow the host: a copy
        assert client.wait(30)                         # that waits for one is skipped, not waited for
        client._chunk_delay = 0.005
        train_step(state)
        client.snapshot(1, state)
        expected = tensors_of(state)
        train_step(state)                              # optimizer.step() must wait for the copy
        assert client.stats["hook_wait_seconds"] > 0
        assert client.wait(30)
        fresh = make_state(seed=9, width=512)
        assert client.restore(fresh) == 1
        assert_same(tensors_of(fresh), expected)


def test_foreground_copy_is_done_when_snapshot_returns_with_the_trainer_thread_copying_too(thread_daemon):
    d = thread_daemon(chunk_size=4096)
    state = make_state(width=512)
    with ftd.Client(d.endpoint, copy="foreground") as client:
        train_step(state)
        client.snapshot(0, state)                      # sets up the buffers (the first copy may be skipped)
        assert client.wait(30)
        client._chunk_delay = 0.005                    # a slow copy: both threads take chunks
        train_step(state)
        client.snapshot(1, state)
        job = client._worker.latest
        assert job.step == 1 and job.released.is_set()  # the live tensors are copied: they may change now
        assert client.stats["helped_chunks"] > 0        # ... and the trainer thread did part of it
        expected = tensors_of(state)
        waited = client.stats["hook_wait_seconds"]
        train_step(state)                              # nothing left to wait for at the optimizer step
        assert client.stats["hook_wait_seconds"] - waited < 0.05
        assert client.wait(30)
        fresh = make_state(seed=9, width=512)
        assert client.restore(fresh) == 1
        assert_same(tensors_of(fresh), expected)


def test_copy_mode_is_checked(thread_daemon, monkeypatch):
    d = thread_daemon()
    with pytest.raises(ValueError, match="foreground"):
        ftd.Client(d.endpoint, copy="sync")
    monkeypatch.setenv("FTD_COPY", "foreground")
    with ftd.Client(d.endpoint) as client:
        assert client.copy == "foreground"
    monkeypatch.setenv("FTD_COPY", "fast")
    with pytest.raises(ValueError, match=r"\$FTD_COPY"):
        ftd.Client(d.endpoint)

def test_parameter_mutated_outside_the_optimizer_tears_the_snapshot_then_is_cloned(thread_daemon, caplog):
    d = thread_daemon(chunk_size=4096)
    state = make_state(width=512)
    with ftd.Client(d.endpoint) as client:
        client._chunk_delay = 0.05
        train_step(state)
        client.snapshot(0, state)
        with torch.no_grad():                          # e.g. weight clipping between steps, on a tensor
            state["model"][3].weight.mul_(0.5)        # late in the arena, so its copy has not happened yet
        with caplog.at_level(logging.WARNING, "ftd.trainer"):
            assert client.wait(30) is False
        assert "changed in place" in caplog.text
        expected = tensors_of(state)
        client.snapshot(1, state)                      # that tensor is now cloned at snapshot()
        with torch.no_grad():
            state["model"][3].weight.mul_(0.5)
        assert client.wait(30) is True
        fresh = make_state(seed=4, width=512)
        assert client.restore(fresh) == 1
        assert_same(tensors_of(fresh), expected)


def test_layout_changes_re_register(thread_daemon):
    d = thread_daemon()
    with ftd.Client(d.endpoint) as client:
        state = {"t": torch.zeros(10), "sgd_like": {}}
        client.snapshot(0, state)
        assert client.wait(10)
        state = {"t": torch.ones(300_000, dtype=torch.float64), "sgd_like": {"m": torch.ones(2, 2)}}
        client.snapshot(1, state)
        assert client.wait(10)
        out = {}
        assert client.restore(out) == 1
        assert torch.equal(out["t"], state["t"]) and torch.equal(out["sgd_like"]["m"], state["sgd_like"]["m"])


def test_no_daemon_never_crashes_training_and_restore_says_how_to_start(tmp_path, caplog):
    client = ftd.Client(f"ipc://{tmp_path}/nobody.sock", timeout=0.5)
    state = make_state()
    with caplog.at_level(logging.WARNING, "ftd.trainer"):
        train_step(state)
        client.snapshot(0, state)                     # returns, training goes on
        assert client.wait(10) is False
        train_step(state)
    assert "training continues" in caplog.text and "ftd daemon" in caplog.text
    with pytest.raises(DaemonUnavailable, match="ftd daemon"):
        client.restore(state)
    client.close()


def test_full_budget_is_a_warning_not_a_crash(thread_daemon, caplog):
    d = thread_daemon(memory_budget=2 << 20)
    with ftd.Client(d.endpoint) as client, caplog.at_level(logging.WARNING, "ftd.trainer"):
        client.snapshot(0, {"big": torch.zeros(1 << 20)})   # 4 MiB > 2 MiB budget
        assert client.wait(10) is False
        assert "memory budget is 2.0 MiB" in caplog.text
        client.snapshot(1, {"small": torch.zeros(10)})     # smaller states still work
        assert client.wait(10) is True


def test_corrupted_newest_version_falls_back_to_the_previous(thread_daemon, caplog):
    d = thread_daemon()
    with ftd.Client(d.endpoint) as client:
        for step in range(2):
            client.snapshot(step, {"x": torch.full((1000,), float(step))})
            assert client.wait(10)
        newest = d.daemon.catalog.restore(0)["versions"][0]["buffer"]
        with open(f"/dev/shm/{newest}", "r+b") as f:   # flip a byte of the step-1 snapshot
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        out = {}
        with caplog.at_level(logging.WARNING, "ftd.trainer"):
            assert client.restore(out) == 0
        assert "step 1 (rank 0) fails its checksum" in caplog.text and torch.equal(out["x"], torch.zeros(1000))
        assert [v["step"] for v in d.daemon.catalog.restore(0)["versions"]] == [0]


def test_all_ranks_of_a_node_restore_the_same_step(thread_daemon):
    d = thread_daemon()
    c0 = ftd.Client(d.endpoint, rank=0, world_size=2)
    c1 = ftd.Client(d.endpoint, rank=1, world_size=2)
    for step in range(3):
        c0.snapshot(step, {"r": torch.tensor([0, step])})
        c0.wait(10)
        if step < 2:                                  # rank 1 dies before committing step 2
            c1.snapshot(step, {"r": torch.tensor([1, step])})
            c1.wait(10)
    out0, out1 = {}, {}
    assert c0.restore(out0) == 1 and c1.restore(out1) == 1
    assert out0["r"].tolist() == [0, 1] and out1["r"].tolist() == [1, 1]
    c0.close()
    c1.close()


def test_sharded_state_each_rank_gets_its_own_shard_back(thread_daemon):
    """FSDP-style: every rank holds a different shard (other shapes, other optimizer state)."""
    d = thread_daemon()
    shards = {0: nn.Linear(6, 4), 1: nn.Linear(6, 2)}  # rows 0-3 and 4-5 of one 6x6 layer, say
    clients = {r: ftd.Client(d.endpoint, rank=r, world_size=2) for r in shards}
    optims = {r: torch.optim.AdamW(m.parameters(), lr=0.1) for r, m in shards.items()}
    for step in range(2):
        for r, m in shards.items():
            m(torch.ones(3, 6)).sum().backward()
            optims[r].step()
            clients[r].snapshot(step, {"shard": m, "optim": optims[r], "meta": {"rank": r}})
            clients[r].wait(10)
    for r, m in shards.items():
        fresh = nn.Linear(6, m.out_features)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        state = {"shard": fresh, "optim": fresh_opt, "meta": {}}
        assert clients[r].restore(state) == 1
        assert torch.equal(fresh.weight, m.weight) and state["meta"] == {"rank": r}
        exp = optims[r].state_dict()["state"][0]["exp_avg"]
        assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], exp)
        clients[r].close()


def test_rank_and_world_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("FTD_ENDPOINT", f"ipc://{tmp_path}/x.sock")
    c = ftd.Client()
    assert (c.rank, c.world_size, c.endpoint) == (3, 8, f"ipc://{tmp_path}/x.sock")
    c.close()


def test_daemon_is_found_from_torchrun_or_slurm_variables(monkeypatch, tmp_path):
    from ftd.control.locate import find_daemon
    for name in ("FTD_ENDPOINT", "FTD_CONFIG", "FTD_NODE_RANK", "GROUP_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FTD_JOB", "train7")
    monkeypatch.setenv("SLURM_NODEID", "5")
    endpoint, _, how = find_daemon()
    assert endpoint.endswith("/train7/node5.sock") and "$SLURM_NODEID" in how
    monkeypatch.setenv("GROUP_RANK", "2")                      # torchrun's node rank wins over SLURM's
    assert find_daemon()[0].endswith("/train7/node2.sock")
    monkeypatch.setenv("FTD_NODE_RANK", "3")                   # and ftd's own over both
    assert find_daemon()[0].endswith("/train7/node3.sock")
    config = tmp_path / "node.toml"
    config.write_text(f'job = "other"\nnode_rank = 1\nruntime_dir = "{tmp_path}"\n')
    monkeypatch.setenv("FTD_CONFIG", str(config))              # a node config names the daemon exactly
    assert find_daemon() == (f"ipc://{tmp_path}/other/node1.sock", find_daemon()[1], f"the config $FTD_CONFIG={config}")
    monkeypatch.setenv("FTD_ENDPOINT", "ipc:///elsewhere.sock")
    assert find_daemon()[0] == "ipc:///elsewhere.sock"
    assert find_daemon("ipc:///given.sock")[0] == "ipc:///given.sock"
    monkeypatch.delenv("FTD_CONFIG")
    monkeypatch.setenv("FTD_NODE_RANK", "node-3")
    with pytest.raises(ValueError, match=r"\$FTD_NODE_RANK='node-3' is not a node rank"):
        find_daemon()


def test_missing_daemon_error_says_where_the_client_looked(monkeypatch, tmp_path):
    for name in ("FTD_ENDPOINT", "FTD_CONFIG", "FTD_NODE_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GROUP_RANK", "4")
    monkeypatch.setenv("FTD_JOB", f"nobody-{os.getpid()}")
    with ftd.Client() as client:
        with pytest.raises(ftd.DaemonUnavailable, match=r"no ftd daemon at .*/node4.sock.*node rank 4 from \$GROUP_RANK"):
            client.restore({"x": torch.zeros(2)})


def test_snapshot_slower_than_a_step_is_skipped_not_waited_for(thread_daemon):
    import time
    d = thread_daemon()
    commit = d.daemon.catalog.commit

    def slow_commit(*args, **kwargs):                 # each commit outlasts several training steps
        time.sleep(0.5)
        return commit(*args, **kwargs)

    state = make_state()
    with ftd.Client(d.endpoint) as client:
        train_step(state)
        client.snapshot(0, state)
        assert client.wait(60)                        # the buffers exist: no snapshot is skipped for setup
        d.daemon.catalog.commit = slow_commit
        step = 0
        while client.stats["skipped_busy"] < 2 and step < 40:  # a loaded host makes steps slower too
            step += 1
            train_step(state)
            client.snapshot(step, state)
            time.sleep(0.05)                          # the rest of a training step
        step += 1
        train_step(state)
        client.snapshot(step, state)
        assert client.wait(60)
        assert client.stats["skipped_busy"] >= 2 and client.stats["committed"] >= 2, client.stats
        assert client.stats["failed"] == 0
        fresh = make_state(seed=2)
        assert client.restore(fresh) == step            # the newest snapshot is never the one skipped


def test_slow_daemon_makes_the_optimizer_skip_the_snapshot_not_wait(thread_daemon, monkeypatch, caplog):
    import time
    monkeypatch.setattr("ftd.trainer.client.BEGIN_GRACE_SECONDS", 0.05)   # the production value
    d = thread_daemon()
    state = make_state()
    with ftd.Client(d.endpoint) as client:
        train_step(state)
        client.snapshot(0, state)
        assert client.wait(10)                         # buffers exist; now the daemon turns slow
        begin = d.daemon.catalog.begin

        def slow_begin(*args, **kwargs):
            time.sleep(1.0)
            return begin(*args, **kwargs)

        d.daemon.catalog.begin = slow_begin
        client.snapshot(1, state)
        with caplog.at_level(logging.WARNING, "ftd.trainer"):
            train_step(state)                           # waits the grace, then skips snapshot 1
        assert "did not hand out a buffer" in caplog.text
        assert client.stats["hook_wait_seconds"] < 0.9    # far less than the daemon's 1 s
        assert client.wait(10) is False
        fresh = make_state(seed=3)
        assert client.restore(fresh) == 0
