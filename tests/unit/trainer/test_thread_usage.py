"""The copier's account of its own time: on a core, waiting for one, blocked, and page faults."""
import mmap
import sys
import time

import pytest

from ftd.trainer.thread_usage import ThreadUsage

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the counters come from Linux's /proc")


@linux
def test_work_counts_as_cpu_and_a_sleep_as_off_cpu():
    t0 = ThreadUsage.now()
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    busy = ThreadUsage.now().since(t0)
    assert busy.cpu + busy.runqueue >= 0.04 and busy.wall >= 0.05
    t1 = ThreadUsage.now()
    time.sleep(0.05)
    idle = ThreadUsage.now().since(t1)
    assert idle.cpu < 0.02 and idle.off_cpu >= 0.04


@linux
def test_first_touch_of_fresh_pages_counts_as_minor_faults():
    pages = 256
    m = mmap.mmap(-1, pages * mmap.PAGESIZE)
    try:
        t0 = ThreadUsage.now()
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        touched = ThreadUsage.now().since(t0)
        t1 = ThreadUsage.now()
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 2
        again = ThreadUsage.now().since(t1)
    finally:
        m.close()
    assert touched.minor_faults >= pages // 2  # (transparent huge pages may serve several at once)
    assert again.minor_faults < pages // 8


def test_phases_name_every_figure():
    u = ThreadUsage(wall=1.0, cpu=0.25, runqueue=0.5, minor_faults=3, major_faults=0)
    assert u.as_phases("copier") == {"copier_wall": 1.0, "copier_cpu": 0.25, "copier_runqueue": 0.5,
                                     "copier_off_cpu": 0.25, "copier_minor_faults": 3, "copier_major_faults": 0}
