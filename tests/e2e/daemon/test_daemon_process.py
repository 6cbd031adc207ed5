"""The daemon as a real process: start-up, shutdown, adoption after a crash, hostile input, status."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import psutil
import pytest
import torch
import zmq

import ftd
from ftd.util.procs import free_ports, wait_for

from support.jobs import SHM, leftovers

pytestmark = pytest.mark.timeout(90)


def call(endpoint, frames, timeout_ms=3000):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart([b""] + frames)
    assert s.poll(timeout_ms), "daemon did not answer"
    reply = s.recv_multipart()
    s.close()
    return json.loads(reply[-1])


def test_start_prints_endpoint_private_files_and_clean_shutdown(job):
    d = job.daemon()
    with ftd.Client(d.endpoint) as c:
        c.snapshot(0, {"x": torch.ones(1000)})
        assert c.wait(10)
    segs = leftovers(job.name)
    assert len(segs) == 3                                     # two buffers + the sidecar of the complete one
    for name in segs:
        assert stat.S_IMODE((SHM / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(d.socket.parent.stat().st_mode) == 0o700
    assert d.stop() == 0
    assert leftovers(job.name) == []
    out = d.log()
    assert f"FTD_ENDPOINT={d.endpoint}" in out and "all shared memory released" in out


def test_second_daemon_for_the_same_node_is_refused(job):
    d = job.daemon()
    second = job.daemon(start=False)
    second.start(wait=False)
    assert second.proc.wait(15) == 1
    assert "another ftd daemon already serves node 0" in second.log()
    assert d.proc.poll() is None


def test_killed_daemon_successor_adopts_verified_versions_and_drops_the_rest(job):
    d = job.daemon()
    c = ftd.Client(d.endpoint, rank=0, world_size=2)
    c1 = ftd.Client(d.endpoint, rank=1, world_size=2)
    for step in range(3):
        for cl, r in ((c, 0), (c1, 1)):
            cl.snapshot(step, {"x": torch.full((50_000,), float(10 * r + step))})
            assert cl.wait(10)
    # rank 0 has a write in flight when the daemon dies (so it holds only step 2); rank 1's older
    # version (step 1) gets corrupted in memory
    status = call(d.endpoint, [b'{"v":1,"type":"status"}'])
    newest1 = [n for n in leftovers(job.name) if ".r1." in n and not n.endswith(".meta")]
    conn = c._conn
    session = c._session.id
    spare = conn.call("begin", session=session, step=3, nbytes=200_000)["buffer"]
    d.kill()
    metas = {n: json.loads((SHM / n).read_text()) for n in leftovers(job.name) if n.endswith(".meta")}
    r1_step1 = [n[:-5] for n, m in metas.items() if m["rank"] == 1 and m["step"] == 1][0]
    with open(SHM / r1_step1, "r+b") as f:
        f.write(b"\xff" * 8)
    assert status["ok"] and len(newest1) == 2
    d2 = job.daemon()
    assert "adopted 2 version(s)" in d2.log() and "removed 2" in d2.log()
    assert not (SHM / spare).exists()                          # the torn write is gone
    st = call(d2.endpoint, [b'{"v":1,"type":"status"}'])
    held = {r["rank"]: [v["step"] for v in r["versions"]] for r in st["ranks"]}
    assert held == {0: [2], 1: [2]}
    out0, out1 = {}, {}
    r0 = ftd.Client(d2.endpoint, rank=0, world_size=2)
    r1 = ftd.Client(d2.endpoint, rank=1, world_size=2)
    assert r0.restore(out0) == 2 and r1.restore(out1) == 2
    assert out0["x"][0].item() == 2.0 and out1["x"][0].item() == 12.0
    for cl in (c, c1, r0, r1):
        cl.close()


def test_hostile_input_gets_error_replies_and_the_daemon_keeps_serving(job):
    d = job.daemon()
    good = ftd.Client(d.endpoint, rank=0)
    good.snapshot(0, {"x": torch.ones(10)})
    assert good.wait(10)
    cases = {
        b"\x00\xffnot json": "not valid JSON",
        b'{"v":1,"type":"register","rank":0,"wor': "not valid JSON",            # truncated
        b'{"v":1,"type":"restore","rank":99999999}': "out of range",
        b'{"v":1,"type":"begin","session":"forged","step":1,"nbytes":10}': "unknown or outdated session",
        b'{"v":1,"type":"commit","session":"x","buffer":"../../etc/passwd","step":1,"manifest":{}}': "session",
        b'{"v":2,"type":"ping"}': "protocol version",
    }
    for frame, why in cases.items():
        reply = call(d.endpoint, [frame])
        assert reply["ok"] is False and why in reply["error"], (frame, reply)
    reply = call(d.endpoint, [b"one", b"two"])
    assert reply["ok"] is False and "one frame" in reply["error"]
    # a registration larger than the budget (2 GiB in the test config), by a process that is gone by now
    # (a live one would hold rank 5, and a stop would keep the node's snapshots for it)
    gone = subprocess.Popen(["true"])
    gone.wait()
    s = call(d.endpoint, [json.dumps({"v": 1, "type": "register", "rank": 5, "world": 8, "pid": gone.pid}).encode()])["session"]
    big = json.dumps({"v": 1, "type": "begin", "session": s, "step": 0, "nbytes": 3 << 30}).encode()
    reply = call(d.endpoint, [big])
    assert not reply["ok"] and "memory budget is 2.0 GiB" in reply["error"]
    # an unknown rank simply has nothing to restore
    assert call(d.endpoint, [b'{"v":1,"type":"restore","rank":77}'])["versions"] == []
    # raw bytes on the unix socket that are not ZeroMQ at all
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(d.socket))
    raw.sendall(os.urandom(4096))
    raw.close()
    assert d.proc.poll() is None
    good.snapshot(1, {"x": torch.ones(10)})
    assert good.wait(10)
    out = {}
    assert good.restore(out) == 1
    good.close()


def test_status_command(job):
    d = job.daemon()
    with ftd.Client(d.endpoint) as c:
        c.snapshot(4, {"x": torch.ones(1000)})
        assert c.wait(10)
    run = lambda *a: subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--endpoint", d.endpoint, *a],
                                    capture_output=True, text=True, timeout=30)
    text = run()
    assert text.returncode == 0 and "rank 0/1" in text.stdout and "step 4" in text.stdout
    st = json.loads(run("--json").stdout)
    assert st["ranks"][0]["versions"][0]["step"] == 4 and st["used"] > 0 and st["budget"] == 2 << 30
    assert st["ranks"][0]["last_copy_seconds"] is not None
    d.stop()
    gone = run("--wait", "1")  # (default 10 s, for a daemon that is starting)
    assert gone.returncode == 1 and "ftd daemon" in gone.stderr and "after 1 s" in gone.stderr, gone.stderr


@pytest.mark.timeout(60)
def test_recover_needs_a_cluster_daemon(job):
    recover = lambda ep: subprocess.run([sys.executable, "-m", "ftd.cli", "recover", "--endpoint", ep, "--wait", "1"],
                                        capture_output=True, text=True, timeout=30)
    d = job.daemon()
    standalone = recover(d.endpoint)
    assert standalone.returncode == 2 and "no peers in its config" in standalone.stderr
    d.stop()
    missing = recover(d.endpoint)
    assert missing.returncode == 1 and "rebuilds by itself at start" in missing.stderr


def test_zero_configuration_on_one_machine(tmp_path):
    """`ftd daemon` with no arguments and `ftd.Client()` with no arguments find each other.
    (Only the job name comes from the environment, to keep the test apart from a real daemon.)"""
    job = f"zc{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTD_")}
    env["FTD_JOB"] = job
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "serving at" in (tmp_path / "daemon.log").read_text(), 15, "the daemon")
        code = ("import ftd, torch, os\n"
                "c = ftd.Client()\n"
                "c.snapshot(3, {'x': torch.ones(4)}); assert c.wait(10)\n"
                "out = {}; assert c.restore(out) == 3 and out['x'].sum() == 4\n"
                "c.close(); print('ok', c.endpoint)")
        env_client = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
        r = subprocess.run([sys.executable, "-c", code], env=env_client, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("ok ipc:///tmp/ftd-"), r.stderr
        st = subprocess.run([sys.executable, "-m", "ftd.cli", "status"], env=env, capture_output=True, text=True,
                            timeout=30)
        assert "step 3" in st.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
    assert leftovers(job) == []


def _mapped_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line.split()[-1]}


def test_the_daemon_process_never_loads_torch(job, tmp_path):
    """A daemon with every part switched on (peers, a flush directory) serving a trainer: torch is
    not in its memory, and it stays small. Its flush worker, a process of its own, imports torch."""
    peers = ", ".join(f'"tcp://127.0.0.1:{port}"' for port in free_ports(2))
    d = job.daemon(extra=f'peers = [{peers}]\nparity = 1\nflush_dir = "{tmp_path / "flush"}"\nflush_every = 1\n')
    with ftd.Client(d.endpoint, rank=0, world_size=1) as c:
        c.snapshot(0, {"x": torch.ones(1000)})
        assert c.wait(10)
    libraries = _mapped_libraries(d.proc.pid)
    assert "libzmq" in " ".join(libraries)  # the check reads the map of the right process
    assert not [lib for lib in libraries if "torch" in lib], sorted(lib for lib in libraries if "torch" in lib)
    rss = psutil.Process(d.proc.pid).memory_info().rss
    assert rss < 200 << 20, f"the daemon holds {rss >> 20} MiB of its own memory"
    workers = [p for p in psutil.Process(d.proc.pid).children() if "flush_worker" in " ".join(p.cmdline())]
    assert workers
    wait_for(lambda: any("torch" in lib for lib in _mapped_libraries(workers[0].pid)), 60,
             "the flush worker to import torch (it does so at start, before any flush)")


TRAINER_THAT_STAYS = (
    "import sys, time, torch, ftd\n"
    "c = ftd.Client(sys.argv[1], rank=0, world_size=1)\n"
    "for step in range(3):\n"
    "    c.snapshot(step, {'x': torch.full((1000,), float(step))}); c.wait(10)\n"
    "print('snapshotted', flush=True)\n"
    "time.sleep(120)\n")


def test_stopping_a_daemon_keeps_the_snapshots_of_live_trainers_for_the_next_one(job):
    d = job.daemon()
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_THAT_STAYS, d.endpoint], stdout=subprocess.PIPE,
                               text=True, env=job.env(d))
    job.procs.append(trainer)
    assert trainer.stdout.readline().strip() == "snapshotted"
    assert d.stop() == 0                                             # an upgrade, a systemd restart
    assert "kept 2 version(s)" in d.log() and "stay in shared memory for the next daemon" in d.log()
    assert [n for n in leftovers(job.name) if n.endswith(".meta")]
    d2 = job.daemon()
    assert "adopted 2 version(s)" in d2.log()
    out = {}
    with ftd.Client(d2.endpoint, rank=0, world_size=1, verbose=False) as c:
        assert c.restore(out) == 2 and out["x"][0].item() == 2.0
    assert d2.stop() == 0 and "kept" in d2.log()[-2000:]            # the trainer still runs
    d3 = job.daemon(extra="")
    d3.proc.send_signal(signal.SIGTERM)
    d3.proc.wait(15)
    trainer.kill()
    trainer.wait()
    d4 = job.daemon()
    assert d4.stop() == 0 and leftovers(job.name) == []             # no trainer alive: everything goes


def test_ftd_daemon_clear_drops_them_even_with_trainers_alive(job):
    d = job.daemon(start=False)
    d.proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(d.config_path), "--clear"],
                              stdout=open(d.log_path, "ab"), stderr=subprocess.STDOUT, cwd=job.dir)
    wait_for(lambda: "serving at" in d.log(), 15, "the daemon")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_THAT_STAYS, d.endpoint], stdout=subprocess.PIPE,
                               text=True, env=job.env(d))
    job.procs.append(trainer)
    assert trainer.stdout.readline().strip() == "snapshotted"
    assert d.stop() == 0 and "all shared memory released" in d.log() and leftovers(job.name) == []


def _ftd(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "ftd.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_commands_wait_for_a_starting_daemon_and_find_it_as_the_client_does(job, tmp_path):
    d = job.daemon(start=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTD_")}
    env["FTD_CONFIG"] = str(d.config_path)                           # as `ftd agent` and torchrun jobs set it
    early = subprocess.Popen([sys.executable, "-m", "ftd.cli", "status", "--wait", "30"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    d.start()                                                        # `ftd daemon &` right after
    out, err = early.communicate(timeout=60)
    assert early.returncode == 0 and f"node 0 of job {job.name!r}" in out, err
    assert "waiting up to 30 s for the daemon" in err
    env_job = {k: v for k, v in env.items() if k != "FTD_CONFIG"}
    env_job.update(FTD_JOB="no-such-job", FTD_NODE_RANK="3")
    r = _ftd("status", "--wait", "0.2", env=env_job)
    assert r.returncode == 1 and "no-such-job/node3.sock" in r.stderr and "$FTD_JOB" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_or_wrong_config_is_one_clean_line(tmp_path):
    r = _ftd("status", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('memory_budget = "lots"\n')
    for command in ("status", "recover", "export", "clear"):
        args = ["--latest", "--to", str(tmp_path / "x")] if command == "export" else []
        r = _ftd(command, "--config", str(bad), *args)
        assert r.returncode == 2 and "memory_budget" in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)


def test_ftd_clear_drops_memory_and_flushed_versions_and_refuses_while_trainers_run(job, tmp_path):
    flush = tmp_path / "flush"
    d = job.daemon(extra=f'flush_dir = "{flush}"\nflush_every = 1\n')
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_THAT_STAYS, d.endpoint], stdout=subprocess.PIPE,
                               text=True, env=job.env(d))
    job.procs.append(trainer)
    assert trainer.stdout.readline().strip() == "snapshotted"
    wait_for(lambda: list((flush / job.name).glob("step-*/ftd-export-node0.json")), 60, "a flushed version")
    r = _ftd("clear", "--endpoint", d.endpoint)
    assert r.returncode == 1 and f"pid {trainer.pid}" in r.stderr and "--force" in r.stderr
    trainer.kill()
    trainer.wait()
    r = _ftd("clear", "--endpoint", d.endpoint)
    assert r.returncode == 0 and f"job {job.name!r}" in r.stdout and "removed flushed steps" in r.stdout, r.stderr
    assert not list((flush / job.name).glob("step-*/ftd-export-node0.json"))
    with ftd.Client(d.endpoint, rank=0, world_size=1, verbose=False) as c:
        assert c.restore({}) is None
