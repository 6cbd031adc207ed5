"""Rules of the package layout that hold themselves: the daemon's side of ftd never imports torch or
anything of ``ftd.trainer``, and no module grows past 400 lines.

Checked on the source (every import statement, including those inside functions), so a lazy import
cannot slip through; ``tests/e2e/daemon/test_daemon_process.py`` checks the running daemon too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support.jobs import ROOT

PACKAGE = ROOT / "ftd"
# the daemon process's code: its own packages, what they build on, and the disk tier's daemon side
DAEMON_SIDE = ["daemon", "cluster", "control", "shm", "util", "errors.py", "config.py", "units.py",
               "durable/flusher.py", "durable/policy.py", "durable/ondisk.py", "durable/disk_load.py",
               "durable/cluster_restore.py", "durable/standalone.py", "durable/copygate.py"]
NOT_FROM_TRAINER = ["daemon", "cluster", "control", "shm"]


def modules(parts: list[str]) -> list[Path]:
    out = []
    for part in parts:
        path = PACKAGE / part
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", modules(DAEMON_SIDE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_daemon_side_never_imports_torch(path):
    torch = sorted(n for n in imported(path) if n == "torch" or n.startswith("torch."))
    assert not torch, f"{path.relative_to(ROOT)} imports {torch}: the daemon process must not load torch"


@pytest.mark.parametrize("path", modules(NOT_FROM_TRAINER), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_daemon_cluster_control_and_shm_never_import_the_trainer(path):
    bad = sorted(n for n in imported(path) if n == "ftd.trainer" or n.startswith("ftd.trainer."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} from ftd.trainer"


def test_the_rule_sees_imports_inside_functions(tmp_path):
    sample = PACKAGE / "daemon" / "server.py"
    assert "ftd.cluster.node" in imported(sample)  # imported inside Daemon.__init__


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by concern: {long}"


FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "torchtitan")


@pytest.mark.parametrize("path", [p for p in modules(["."]) if p.parent.name not in ("integrations", "examples")],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_integrations_import_a_training_framework(path):
    bad = sorted(n for n in imported(path) if n.split(".")[0] in FRAMEWORKS or n.startswith("ftd.integrations"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: frameworks load only where a trainer asks for them"
