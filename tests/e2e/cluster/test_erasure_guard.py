"""zfec's decoder spins forever, holding the GIL, on duplicate block numbers: ``Codec`` must refuse them
before zfec sees them. Checked in a child process, so that a regression hangs the child, not the suite."""
import subprocess
import sys

import pytest

from support.jobs import ROOT

_DUPLICATES = """
import numpy as np
from ftd.cluster.erasure import Codec, InvalidBlocks
for kind in ("rs", "xor"):
    for nums in ([1, 1, 2], [0, 0, 0], [3, 3, 0], [np.int64(2), 2, 0]):
        try:
            Codec(3, 1, kind).decode([bytes(16)] * 3, nums)
        except InvalidBlocks as e:
            assert "more than once" in str(e), e
        else:
            raise SystemExit(f"{kind} {nums}: no error")
print("ok")
"""


@pytest.mark.timeout(30)
def test_duplicate_block_numbers_raise_instead_of_hanging():
    try:
        done = subprocess.run([sys.executable, "-c", _DUPLICATES], capture_output=True, text=True, timeout=15,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("Codec.decode hung on duplicate block numbers: validation did not run before zfec")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
