"""Loss files ("step float.hex()" lines, appended by every run of a trainer) and the bit-exact check."""
from __future__ import annotations

from pathlib import Path


def read_losses(path: Path) -> list[tuple[int, str]]:
    """All complete 'step hex' lines, in file order (a step re-run after a crash appears again)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1]))
    return out


def assert_bit_exact(run: Path, reference: Path, steps: int, who: str = "the resumed run") -> None:
    ref = dict(read_losses(reference))
    assert sorted(ref) == list(range(steps)), "reference run incomplete"
    got = read_losses(run)
    assert {s for s, _ in got} == set(range(steps)), f"{who} did not reach every step"
    for step, value in got:
        assert value == ref[step], f"{who}, step {step}: loss {value} differs from the uninterrupted run's {ref[step]}"
