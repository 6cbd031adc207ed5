#!/usr/bin/env python3
"""How fast does a restarted trainer get its state back from the daemon, against torch.load and a memcpy?

Run it as ``.venv/bin/python scripts/bench_restore.py`` (``--sizes 256M,1G``, ``--rounds 3``;
``--quick``: 64 MiB, 2 rounds, about a minute).

Per state size (``benchstate``: 8 x nn.Linear + AdamW after a step, parameters a third of the bytes),
one daemon holds one snapshot of it and /dev/shm one ``torch.save`` of the same state dict. Then, in
``--rounds`` rounds whose order alternates (A B C D, then D C B A, so that drift cancels), each kind
runs in a fresh process (a restarted trainer: a first restore pays for faulting in fresh memory, as
a real one does), which builds the model as a restart does (parameters allocated and zeroed, AdamW
without moments), touches as much fresh memory as the phase allocates and frees it again (the VM's
first-touch noise, ``benchutil.prefault``), then times one thing:

- ``ftd``: ``client.restore(state)``: the daemon's reply, every chunk checked, the tensors copied into
  the model's parameters in place and into fresh moments, ``load_state_dict``;
- ``ftd live``: the same into a model and optimizer that already hold moments (a trainer that rolls
  back in process): every tensor filled in place, nothing allocated;
- ``torch.load shm``: ``torch.load(weights_only=True)`` of the /dev/shm file + both ``load_state_dict``;
- ``copy_``: the bytes of the state copied with ``dst.copy_(src)`` from one flat tensor into tensors
  of the state's shapes, with as many torch threads as the restore uses (``readback.restore_threads``):
  once into fresh tensors (first touch included: what any restore into a fresh optimizer pays), then
  into the same, now touched, tensors, three times with 1 thread and three with the restore's, the
  fastest of them (the memcpy ceiling).

First snapshots: before that, the same state runs ``--first-steps`` (6) training steps against a fresh
daemon, twice per mode, in alternating order: once as a run starts with ftd (``restore(state)`` first,
which finds nothing and has the daemon set up the buffers of the first snapshot), once without it
(the first ``snapshot()`` sets them up). Each step computes for about 2x the time a memcpy of the
state takes here (``compute_for``, 1 thread), runs AdamW's step (the pre-step hook) and snapshots.
Reported: the time ``restore`` took, and the snapshots committed and skipped (``skipped_setup``: the
buffers were not ready; ``skipped_busy``: the previous snapshot's copy was still running).

Every restore and load is checked against the saved state's digest. Figures: medians over the rounds;
ratios are of medians measured in this one run. Targets (issue 17): ftd >= 3x faster than torch.load
of the same state from /dev/shm, and ftd's bandwidth >= 0.5x that of the warm ``copy_``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from benchstate import (  # scripts/benchstate.py
    Daemon,
    GiB,
    MiB,
    Spec,
    build_model,
    build_trained,
    client_for,
    compute_for,
    fmt_size,
    full_state_dict,
    median,
    parse_size,
    state_digest,
    state_tensors,
    trained_state,
)
from benchutil import CpuWatch, ftd_revision, prefault, table, verdict

import ftd  # (benchstate put the repo's ftd first on sys.path)
from ftd.trainer.readback import restore_threads

KINDS = ("ftd", "ftd_live", "load_shm", "copy")
TARGET_SPEEDUP = 3.0
TARGET_COPY_FRACTION = 0.5


def worker(job: dict) -> int:
    """Child process: build the state as a restarted trainer does, time one kind, print JSON."""
    torch.set_num_threads(1)
    spec = Spec(0, job["width"])
    model, optimizer = build_trained(spec) if job["kind"] == "ftd_live" else build_model(spec)
    state = {"model": model, "optim": optimizer}
    prefault(job["prefault"])
    out: dict = {"threads": restore_threads()}
    if job["kind"] in ("ftd", "ftd_live"):
        client = ftd.Client(endpoint=job["endpoint"], rank=0, world_size=1)
        t0 = time.perf_counter()
        out["step"] = client.restore(state)
        out["seconds"] = time.perf_counter() - t0
        client.close()
    elif job["kind"] == "load_shm":
        t0 = time.perf_counter()
        sd = torch.load(job["path"], map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])
        out["seconds"] = time.perf_counter() - t0
    else:
        torch.set_num_threads(out["threads"])
        shapes = [(t.dtype, t.shape) for t in state_tensors(*build_trained(Spec(0, job["width"])))]
        total = sum(torch.empty(0, dtype=d).element_size() * torch.Size(s).numel() for d, s in shapes)
        src = torch.ones(total, dtype=torch.uint8)
        t0 = time.perf_counter()
        dsts = [torch.empty(s, dtype=d) for d, s in shapes]
        copy_all(src, dsts)
        out["fresh_seconds"] = time.perf_counter() - t0
        warm = {}
        for threads in sorted({1, out["threads"]}):  # the best of both: a parallel copy_ waits for its slowest
            torch.set_num_threads(threads)           # thread, and on a shared machine one core may be taken
            warm[threads] = min(timed_copy(src, dsts) for _ in range(3))
        out["seconds"], out["warm_by_threads"] = min(warm.values()), warm
        return print(json.dumps(out)) or 0
    out["digest"] = state_digest(model, optimizer)
    print(json.dumps(out))
    return 0


def copy_all(src: torch.Tensor, dsts: list[torch.Tensor]) -> None:
    off = 0
    for t in dsts:
        flat = t.view(-1).view(torch.uint8)
        flat.copy_(src[off:off + flat.numel()])
        off += flat.numel()


def timed_copy(src: torch.Tensor, dsts: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    copy_all(src, dsts)
    return time.perf_counter() - t0


def run_worker(job: dict, digest: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['kind']} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "digest" in result and result["digest"] != digest:
        raise RuntimeError(f"{job['kind']} loaded a state that differs from the saved one")
    if job["kind"].startswith("ftd") and result["step"] != job["expect_step"]:
        raise RuntimeError(f"ftd restored step {result['step']}, expected {job['expect_step']}")
    return result


def first_snapshots(model, optimizer, state_bytes: int, workdir: Path, restore_first: bool, steps: int) -> dict:
    """``steps`` training steps from a fresh daemon, snapshotting each; with ``restore_first`` the run
    starts with ``restore(state)``, which sets up the first snapshot's buffers."""
    state = {"model": model, "optim": optimizer}
    step_compute = 2 * state_bytes / 10e9  # about 2x a memcpy of the state on this machine
    with Daemon(workdir, f"{max(1, 3 * state_bytes // GiB + 1)}GiB") as daemon, client_for(daemon) as client:
        t0 = time.perf_counter()
        if restore_first:
            client.restore(state)
        restore_s = time.perf_counter() - t0 if restore_first else None
        for step in range(steps):
            compute_for(step_compute)
            optimizer.step()
            client.snapshot(step, state)
        client.wait(120)
        stats = dict(client.stats)
    return {"restore_s": restore_s, "step_compute_s": step_compute,
            **{k: stats[k] for k in ("committed", "skipped_setup", "skipped_busy", "failed")}}


def measure_size(nbytes: int, rounds: int, workdir: Path, first_steps: int) -> dict:
    cpu = CpuWatch()
    spec, model, optimizer, tensors, state_bytes = trained_state(nbytes)
    del tensors
    print(f"\n== {fmt_size(nbytes)}: {state_bytes / MiB:.0f} MiB of state", flush=True)
    first: dict[str, list[dict]] = {"restore first": [], "no restore": []}
    for r in range(2):
        for mode in ("restore first", "no restore") if r == 0 else ("no restore", "restore first"):
            first[mode].append(first_snapshots(model, optimizer, state_bytes, workdir / f"first{r}{mode[0]}",
                                               mode == "restore first", first_steps))
    print("   first snapshots: " + "; ".join(f"{m}: {x}" for m, xs in first.items() for x in xs), flush=True)
    shm_file = Path("/dev/shm") / f"bench_restore.{os.getpid()}.pt"
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    with Daemon(workdir, f"{max(1, 4 * state_bytes // GiB + 1)}GiB") as daemon:
        with client_for(daemon) as client:
            client.snapshot(7, {"model": model, "optim": optimizer})
            if not client.wait(120):
                raise RuntimeError(f"the snapshot was not committed: {client.stats}")
        digest = state_digest(model, optimizer)
        try:
            torch.save(full_state_dict(model, optimizer), shm_file)
            del model, optimizer
            base = {"width": spec.width, "endpoint": daemon.endpoint, "path": str(shm_file), "expect_step": 7,
                    "prefault": state_bytes + state_bytes // 8}
            for r in range(rounds):
                for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                    runs[kind].append(run_worker({**base, "kind": kind}, digest))
                print(f"   round {r + 1}: " + ", ".join(f"{k} {runs[k][-1]['seconds'] * 1e3:.0f} ms" for k in KINDS),
                      flush=True)
        finally:
            shm_file.unlink(missing_ok=True)
    ms = {k: median([x["seconds"] for x in runs[k]]) * 1e3 for k in KINDS}
    ms["copy_fresh"] = median([x["fresh_seconds"] for x in runs["copy"]]) * 1e3
    gbs = {k: state_bytes / (v / 1e3) / 1e9 for k, v in ms.items()}
    return {"size": fmt_size(nbytes), "state_bytes": state_bytes, "threads": runs["ftd"][0]["threads"], "runs": runs,
            "ms": ms, "gbs": gbs, "speedup_vs_load_shm": ms["load_shm"] / ms["ftd"],
            "speedup_live_vs_load_shm": ms["load_shm"] / ms["ftd_live"],
            "fraction_of_copy": gbs["ftd"] / gbs["copy"], "live_fraction_of_copy": gbs["ftd_live"] / gbs["copy"],
            "first_snapshots": first, "first_steps": first_steps,
            "other_processes_cores": cpu.others()}


def report(results: list[dict]) -> str:
    def cell(r: dict, k: str) -> str:
        return f"{r['ms'][k]:.0f} ms ({r['gbs'][k]:.1f} GB/s)"
    rows = [[r["size"], str(r["threads"]), cell(r, "ftd"), cell(r, "ftd_live"), cell(r, "load_shm"),
             cell(r, "copy_fresh"), cell(r, "copy")] for r in results]
    ratios = [[r["size"], f"{r['speedup_vs_load_shm']:.2f}x", f"{r['speedup_live_vs_load_shm']:.2f}x",
               f"{r['fraction_of_copy']:.2f}x", f"{r['live_fraction_of_copy']:.2f}x",
               f"{verdict(r['speedup_vs_load_shm'] >= TARGET_SPEEDUP)} / "
               f"{verdict(r['fraction_of_copy'] >= TARGET_COPY_FRACTION)}"] for r in results]
    firsts = [[r["size"], mode, f"{sum(x['committed'] for x in xs)} of {r['first_steps'] * len(xs)}",
               str(sum(x["skipped_setup"] for x in xs)), str(sum(x["skipped_busy"] for x in xs)),
               " / ".join(f"{x['restore_s'] * 1e3:.0f} ms" for x in xs) if xs[0]["restore_s"] is not None else "-"]
              for r in results for mode, xs in r["first_snapshots"].items()]
    return ("first snapshots of a run (two runs per mode):\n"
            + table(["size", "mode", "committed", "skipped: set-up", "skipped: busy", "restore() took"], firsts)
            + "\n\nrestore into a restarted trainer (medians):\n"
            + table(["size", "threads", "ftd", "ftd live", "torch.load /dev/shm", "copy_ fresh", "copy_ warm"], rows)
            + "\n\nratios (side by side, this run):\n"
            + table(["size", "load/ftd", "load/ftd live", "ftd/copy_ bandwidth", "ftd live/copy_",
                     f"targets >= {TARGET_SPEEDUP:g}x load / >= {TARGET_COPY_FRACTION:g}x copy_"], ratios))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256M,1G", help="state sizes, comma-separated (default 256M,1G)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every kind, alternating order (default 3)")
    p.add_argument("--first-steps", type=int, default=6, help="steps of each first-snapshots run (default 6)")
    p.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds")
    p.add_argument("--json", default="bench-results/bench_restore.json", help="where the results go")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    sizes = [parse_size(s) for s in ("64M" if args.quick else args.sizes).split(",")]
    rounds = 2 if args.quick else args.rounds
    command = shlex.join([sys.executable, *sys.argv])
    print(f"bench_restore: sizes {', '.join(fmt_size(s) for s in sizes)}; {rounds} rounds; ftd {ftd_revision()}; "
          f"torch {torch.__version__}; {os.cpu_count()} cpus", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="brestore.", dir="/tmp") as tmp:
        for nbytes in sizes:
            need = 6 * nbytes + GiB
            if psutil.virtual_memory().available < need:
                raise SystemExit(f"{fmt_size(nbytes)} needs about {need / GiB:.1f} GiB of memory available")
            results.append(measure_size(nbytes, rounds, Path(tmp) / fmt_size(nbytes).replace(" ", ""), args.first_steps))
    print("\n" + report(results))
    print(f"\ncommand: {command}")
    print("other processes' CPU use (cores): " + ", ".join(f"{r['size']} {r['other_processes_cores']:.2f}"
                                                        for r in results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "ftd_revision": ftd_revision(), "torch": torch.__version__, "cpus": os.cpu_count(),
                               "results": results}, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
