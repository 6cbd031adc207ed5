"""The soak tier: tests (or parameters) that only ``FTD_SOAK=1`` runs, each naming the tests that
cover its capability in CI, so that the suite keeps to about 10 minutes on 2 cores."""
from __future__ import annotations

import os

import pytest

SOAK = os.environ.get("FTD_SOAK") == "1"


def soak_marks(covered_in_ci_by: str) -> list:
    """The marks of a soak-only test or ``pytest.param``: marked ``soak``, skipped outside FTD_SOAK=1."""
    return [pytest.mark.soak,
            pytest.mark.skipif(not SOAK, reason=f"soak (FTD_SOAK=1); in CI: {covered_in_ci_by}")]


def soak_only(covered_in_ci_by: str):
    """Decorator: the test runs under FTD_SOAK=1 only (see ``soak_marks``)."""
    def mark(test):
        for m in soak_marks(covered_in_ci_by):
            test = m(test)
        return test
    return mark
