"""The demo's plot: rank 0's loss per step, each restart in its own colour over the reference in grey."""
from __future__ import annotations

from pathlib import Path

from ftd.demo.report import read_losses
from ftd.demo.run import Demo
from ftd.local.agentjob import RankLog


def write_plot(demo: Demo, report: dict, rank0: RankLog, path: Path) -> str | None:
    """Loss per step of rank 0: the reference, each generation of the ftd job, the failures.
    Returns why there is no plot, or None."""
    try:
        import logging

        import matplotlib
        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ftd[demo]'); no plot"
    ref = read_losses(demo.workdir / "reference" / "losses-rank0.txt")
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot([s for s, _ in ref], [float.fromhex(v) for _, v in ref], color="0.55", lw=3.5, alpha=0.6,
            label="uninterrupted reference")
    for generation in sorted({g for g, _, _ in rank0.points}):
        points = [(s, v) for g, s, v in rank0.points if g == generation]
        start = rank0.resumed.get(generation)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=2.5, lw=1,
                label="ftd run: start" if start is None else f"ftd run: restart {generation}, resumed after step {start}")
    for f in report["failures"]:
        ax.axvline(f["at_step"] + 0.5, color="crimson", ls="--", lw=1)
        ax.annotate(f["what"].split(" (")[0], (f["at_step"] + 0.5, 0.97), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="crimson")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (rank 0)")
    verdict = "bit-exact" if report["bit_exact"] else "NOT bit-exact"
    ax.set_title(f"ftd demo: {report['nodes']} nodes, k={report['k']} m={report['m']}; every rank {verdict} "
                 "with the uninterrupted run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
