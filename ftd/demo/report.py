"""Pure parts of ``ftd demo``: reading loss files, the bit-exact verdict, the summary and its text.

Loss files hold one ``step float.hex()`` line per step, appended by each run of a rank, so a step
re-run after a failure appears twice and both values must equal the uninterrupted run's.
"""
from __future__ import annotations

import statistics
from pathlib import Path


def read_losses(path: Path) -> list[tuple[int, str]]:
    """Lines of ``step float.hex()``; a malformed line becomes (-1, the raw text). Missing file: []."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        parts = line.split()
        rows.append((int(parts[0]), parts[1]) if len(parts) == 2 and parts[0].isdigit() else (-1, line))
    return rows


def verify(reference: list[tuple[int, str]], run: list[tuple[int, str]], steps: int) -> tuple[bool, str, int]:
    """(bit-exact, verdict, steps run twice): every line of ``run`` equals the reference's for its step."""
    ref = dict(reference)
    if sorted(ref) != list(range(steps)) or len(reference) != steps:
        return False, f"the reference run did not write exactly one loss for each of steps 0..{steps - 1}", 0
    for step, value in run:
        if step not in ref:
            return False, f"unexpected line in the ftd run's losses: {value!r}", 0
        if ref[step] != value:
            return False, (f"MISMATCH at step {step}: ftd run {value} ({decimal(value)}), "
                           f"uninterrupted run {ref[step]} ({decimal(ref[step])})"), 0
    missing = sorted(set(range(steps)) - {s for s, _ in run})
    if missing:
        return False, f"no loss for step(s) {', '.join(map(str, missing[:10]))}", 0
    return True, f"bit-exact: all {steps} steps", len(run) - steps


def decimal(hex_value: str) -> str:
    try:
        return repr(float.fromhex(hex_value))
    except ValueError:
        return "unreadable"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def blocked_per_snapshot(stats: list[dict]) -> dict:
    """Trainer time spent in snapshot() plus waits in the optimizer-step hook, per snapshot, over ranks."""
    per_rank = [(s["snapshot_seconds"] + s["hook_wait_seconds"]) / s["snapshots"] for s in stats if s.get("snapshots")]
    return {"mean_ms": 1000 * statistics.fmean(per_rank) if per_rank else None,
            "snapshots": sum(s.get("snapshots", 0) for s in stats),
            "committed": sum(s.get("committed", 0) for s in stats),
            "skipped_protecting": sum(s.get("skipped_protecting", 0) for s in stats)}


def protection_lag(lags: list[dict]) -> dict:
    """Aggregate the daemons' protection_lag counters (commit of a step -> recoverable on every node)."""
    count = sum(a["count"] for a in lags)
    return {"versions": count,
            "mean_ms": 1000 * sum(a["total_seconds"] for a in lags) / count if count else None,
            "max_ms": 1000 * max((a["max_seconds"] for a in lags), default=0.0) if count else None}


def summary_lines(report: dict) -> list[str]:
    """The human summary printed at the end of the demo (all figures come from ``report``)."""
    lines = []
    for f in report["failures"]:
        resumed = f.get("resumed_after")
        head = f"  {f['what']} at step {f['at_step']}: "
        if resumed is None:
            lines.append(head + "the job did not resume")
            continue
        lines.append(head + f"every rank resumed after step {resumed}: {plural(f['steps_lost'], 'step')} lost "
                     f"(re-run), {f['seconds_to_resume']:.1f} s from the failure to training again")
        if f.get("rebuild"):
            r = f["rebuild"]
            lines.append(f"      the replacement node rebuilt step {r['step']} from its peers' memory in "
                         f"{1000 * r['seconds']:.0f} ms ({r['fetched_bytes'] / 2**20:.2f} MiB fetched)")
    b, p, s = report["blocked_per_snapshot"], report["protection_lag"], report["torch_save_load"]
    if b["mean_ms"] is not None:
        lines.append(f"  trainer blocked per snapshot: {b['mean_ms']:.2f} ms on average "
                     f"({b['snapshots']} snapshots by the last run of each rank; "
                     f"{b['skipped_protecting']} skipped while an older step was being protected)")
    if p["mean_ms"] is not None:
        lines.append(f"  time to protection (commit -> recoverable on every node): {p['mean_ms']:.0f} ms on average, "
                     f"{p['max_ms']:.0f} ms at most, over {p['versions']} versions and nodes")
    lines.append(f"  for comparison, a synchronous torch.save + torch.load of the same state "
                 f"({report['state_bytes'] / 2**20:.2f} MiB per rank): {1000 * s['save_seconds']:.1f} ms + "
                 f"{1000 * s['load_seconds']:.1f} ms, blocking the trainer every time")
    return lines
