#!/usr/bin/env python3
"""GPU checks of the CUDA copy path (needs a CUDA device; CI never runs it).

1. correctness: a CUDA model (BatchNorm, dropout, AdamW, scheduler) snapshotted every step; after
   snapshot(k) the trainer mutates BatchNorm statistics (forward) and parameters (optimizer.step);
   a restore must give exactly the state at snapshot(k), CUDA RNG included; and a run restored
   midway into fresh objects continues with the same losses, bit for bit, as an uninterrupted run.
2. speed: for a CUDA state of --gib GiB, the trainer thread's time blocked per snapshot (inside
   snapshot() plus the pre-step hook) with a GPU compute phase between snapshots; the background
   device-to-host copy bandwidth into the pinned (cudaHostRegister) arena against a raw copy into
   torch's pinned memory and into pageable memory; and the GPU step time with and without snapshots.

    python3 scripts/gpu_check.py --out DIR [--gib 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for torch.use_deterministic_algorithms
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ftd  # noqa: E402


def start_daemon(tmp: Path, job: str, budget: str) -> tuple[subprocess.Popen, str]:
    cfg = tmp / f"{job}.toml"
    cfg.write_text(f'job = "{job}"\nruntime_dir = "{tmp}/rt"\nmemory_budget = "{budget}"\n')
    log = open(tmp / "daemon.log", "ab")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    p = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(cfg)], stdout=log,
                         stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path))
    sock = tmp / "rt" / job / "node0.sock"
    for _ in range(300):
        if sock.exists():
            break
        time.sleep(0.05)
    return p, f"ipc://{sock}"


def make(seed: int, width: int = 1024):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.7)
    return {"model": model, "optim": opt, "sched": sched, "meta": {"seen": 0}}


def step(state) -> float:
    x = torch.randn(128, 256, device="cuda")
    y = x[:, :8].sum(1, keepdim=True).sin()
    loss = nn.functional.mse_loss(state["model"](x), y)
    state["optim"].zero_grad(set_to_none=True)
    loss.backward()
    state["optim"].step()
    state["sched"].step()
    state["meta"]["seen"] += 128
    return loss.item()


def flat(state) -> list[torch.Tensor]:
    out = [v.detach().cpu().clone() for v in state["model"].state_dict().values()]
    for s in state["optim"].state.values():
        out += [v.detach().cpu().clone() for v in s.values() if torch.is_tensor(v)]
    return out


def check_correctness(endpoint: str, endpoint2: str) -> dict:
    res = {}
    # (a) state at snapshot(k) survives later in-place changes (BN forward, optimizer step)
    state = make(0)
    client = ftd.Client(endpoint)
    for k in range(5):
        step(state)
        client.snapshot(k, state)
    expected = flat(state)
    cuda_rng = torch.cuda.get_rng_state()
    state["model"](torch.randn(128, 256, device="cuda"))      # BatchNorm stats change now
    step(state)                                               # parameters and moments change now
    res["hook_waited_s"] = client.stats["hook_wait_seconds"]
    ok = client.wait(60)
    res["last_snapshot_committed"] = ok
    fresh = make(1)
    res["restored_step"] = client.restore(fresh)
    got = flat(fresh)
    res["state_at_snapshot_bit_exact"] = len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    res["cuda_rng_restored"] = torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    res["arena_pinned"] = any(a.cuda_registered for a in client._session.arenas.values())
    client.close()
    # (b) bit-exact continuation: uninterrupted vs restored-midway
    torch.use_deterministic_algorithms(True)
    ref_state = make(7)
    ref = [step(ref_state) for _ in range(20)]
    run_state = make(7)
    client = ftd.Client(endpoint2)
    losses = []
    for k in range(10):
        losses.append(step(run_state))
        client.snapshot(k, run_state)
    client.wait(60)
    for _ in range(3):
        step(run_state)                                       # steps lost to the "crash"
    resumed = make(99)                                        # a new trainer: new objects
    start = client.restore(resumed)
    for k in range(start + 1, 20):
        losses.append(step(resumed))
    client.close()
    torch.use_deterministic_algorithms(False)
    res["continuation_bit_exact"] = [l.hex() for l in losses] == [l.hex() for l in ref]
    res["continuation_restored_step"] = start
    return res


def check_speed(endpoint: str, gib: float) -> dict:
    n_layers = 8
    per_param = int(gib * (1 << 30) / 3 / 4 / n_layers)        # params + 2 AdamW moments, fp32
    width = int(per_param ** 0.5)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(n_layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    state = {"model": model, "optim": opt}
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    res = {"state_bytes": nbytes, "width": width}
    # raw device-to-host copies of the same bytes
    src = torch.empty(nbytes // 4, device="cuda")
    for name, dst in (("pinned", torch.empty(nbytes // 4, pin_memory=True)), ("pageable", torch.empty(nbytes // 4))):
        dst.copy_(src)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        res[f"raw_d2h_{name}_GBps"] = 3 * nbytes / (time.perf_counter() - t) / 1e9
        del dst
    del src
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def compute(seconds_target_iters: int) -> None:
        for _ in range(seconds_target_iters):
            a @ a

    # calibrate compute so that one "forward/backward" takes ~2x the pinned copy time
    copy_s = nbytes / (res["raw_d2h_pinned_GBps"] * 1e9)
    torch.cuda.synchronize()
    t = time.perf_counter()
    compute(50)
    torch.cuda.synchronize()
    per = (time.perf_counter() - t) / 50
    iters = max(1, int(2 * copy_s / per))
    res["compute_phase_s"] = iters * per

    def loop(client, steps: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        blocked = 0.0
        for k in range(steps):
            compute(iters)
            h0 = client.stats["hook_wait_seconds"] if client else 0.0
            opt.step()
            if client:
                blocked += client.stats["hook_wait_seconds"] - h0
                s0 = time.perf_counter()
                client.snapshot(k, state)
                blocked += time.perf_counter() - s0
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps, blocked / steps

    loop(None, 2)
    res["step_s_without_ftd"], _ = loop(None, 6)
    client = ftd.Client(endpoint)
    for _ in range(10):                                        # warm-up: both buffers allocated and pinned
        loop(client, 1)
        client.wait(120)
        if client.stats["committed"] >= 2:
            break
    client.stats.update(failed=0, skipped_busy=0, committed=0)
    res["step_s_with_ftd"], res["blocked_per_snapshot_s"] = loop(client, 6)
    client.wait(120)
    res["copy_s"] = client.stats["last_copy_seconds"]
    res["ftd_copy_GBps"] = nbytes / res["copy_s"] / 1e9
    res["ftd_copy_vs_raw_pinned"] = res["ftd_copy_GBps"] / res["raw_d2h_pinned_GBps"]
    res["committed"], res["failed"] = client.stats["committed"], client.stats["failed"]
    res["skipped_busy"] = client.stats["skipped_busy"]
    res["hash_threads"] = client._hasher.threads
    res["last_job_phases_s"] = client._worker.latest.phases
    # synchronous torch.save of the same state to /dev/shm, for scale
    t = time.perf_counter()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, "/dev/shm/gpucheck-save.pt")
    res["torch_save_devshm_s"] = time.perf_counter() - t
    os.unlink("/dev/shm/gpucheck-save.pt")
    res["blocked_vs_torch_save"] = res["blocked_per_snapshot_s"] / res["torch_save_devshm_s"]
    # restore into the live objects
    t = time.perf_counter()
    res["restore_step"] = client.restore(state)
    torch.cuda.synchronize()
    res["restore_s"] = time.perf_counter() - t
    client.close()
    return res


def check_d2h_micro(gib: float = 1.0) -> dict:
    """Is a device-to-host copy into a cudaHostRegister'ed shared-memory mapping asynchronous and fast?"""
    from ftd.shm import segments
    from ftd.shm.checksum import chunk_checksum
    n = int(gib * (1 << 30))
    path = Path(f"/dev/shm/ftd-gpucheck-micro-{os.getpid()}")
    segments.create(path, n)
    m = segments.Mapping(path)
    res = {}
    try:
        host = torch.frombuffer(m.view(), dtype=torch.uint8)
        src = torch.empty(n, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        for name, dst in (("torch_pinned", pinned), ("shm_unregistered", host), ("shm_registered", host)):
            if name == "shm_registered":
                res["register_err"] = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n, 0))
                res["is_pinned_after_register"] = bool(host.is_pinned())
            dst.copy_(src)
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            issued = time.perf_counter() - t
            torch.cuda.synchronize()
            total = time.perf_counter() - t
            res[name] = {"issue_s": issued, "total_s": total, "GBps": n / total / 1e9}
        t = time.perf_counter()
        for lo in range(0, n, 4 << 20):
            chunk_checksum(m.view()[lo:lo + (4 << 20)])
        res["xxh3_GBps"] = n / (time.perf_counter() - t) / 1e9
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
        del host, pinned, src
    finally:
        m.close()
        segments.unlink(path)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory(prefix="ftdgpu-", dir="/tmp") as tmp:
        daemons = [start_daemon(Path(tmp), f"gpucheck{i}", "40GiB") for i in range(3)]
        e = [d[1] for d in daemons]
        try:
            for name, fn in (("d2h_micro", check_d2h_micro),
                             ("correctness", lambda: check_correctness(e[0], e[1])),
                             ("speed", lambda: check_speed(e[2], args.gib))):
                try:
                    report[name] = fn()
                except Exception:
                    report[name] = {"error": traceback.format_exc()}
                print(name, json.dumps(report[name], indent=1), flush=True)
        finally:
            for d, _ in daemons:
                d.terminate()
                d.wait(30)
            report["daemon_log_tail"] = (Path(tmp) / "daemon.log").read_text()[-3000:]
    Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(report["daemon_log_tail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
