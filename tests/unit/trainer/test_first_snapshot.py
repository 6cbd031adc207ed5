"""The first snapshots of a run: their buffers set up at ``restore(state)``, while the first steps run,
so that none is skipped for set-up."""
import logging
import time

import pytest
import torch
from torch import nn

import ftd
from ftd.trainer.capture import expected_nbytes

from support.states import make_state, train

pytestmark = pytest.mark.timeout(60)

SLOW_SETUP_SECONDS = 0.3  # per buffer: what reserving GiBs of shared memory took when the daemon did it


def test_the_first_snapshot_size_is_known_at_restore_and_its_buffers_are_set_up(thread_daemon):
    d = thread_daemon()
    state = make_state(step=False)                     # a fresh start: the optimizer has no moments yet
    expected = expected_nbytes(state, True)
    with ftd.Client(d.endpoint) as client:
        assert client.restore(state) is None
        entry = d.daemon.catalog.ranks[0]
        assert len(entry.buffers) == 2 and all(b.capacity >= expected for b in entry.buffers)
        names = {b.name for b in entry.buffers}
        assert set(client._session.arenas) == names   # mapped, their memory reserved in the background
        train(state)
        client.snapshot(0, state)
        assert client.wait(10)
        job = client._worker.latest
        assert job.layout.nbytes == expected           # the estimate is exact for torch.optim's classes
        assert {b.name for b in entry.buffers} == names  # the first snapshot used the prepared buffers


class CountingStateful:
    """A Stateful whose state_dict() may have side effects (as DCP's get_state_dict does)."""

    def __init__(self):
        self.calls = 0

    def state_dict(self):
        self.calls += 1
        return {"x": torch.zeros(4)}

    def load_state_dict(self, sd):
        pass


def test_a_custom_stateful_is_not_asked_for_its_state_before_the_first_snapshot(thread_daemon):
    d = thread_daemon()
    app = CountingStateful()
    state = {"model": nn.Linear(4, 4), "app": app}
    assert expected_nbytes(state, True) is None
    with ftd.Client(d.endpoint) as client:
        assert client.restore(state) is None
        assert app.calls == 0                           # a fresh start: nothing called that could change the run
        assert not getattr(d.daemon.catalog.ranks.get(0), "buffers", [])  # nothing prepared: the first snapshot does it
        client.snapshot(0, state)
        assert client.wait(10)
    assert app.calls == 1


def big_state():
    """Linear(512, 512) x 4 + AdamW before its first step: 16 MiB of snapshot once it stepped."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-3)}


def run_steps(client, state, steps, after_step=lambda step: None):
    model, opt = state["model"], state["optim"]
    for step in range(steps):
        model(torch.randn(16, 512)).pow(2).mean().backward()
        opt.step()                                      # the pre-step hook: waits for, or skips, the last snapshot
        after_step(step)
        opt.zero_grad()
        client.snapshot(step, state)
        time.sleep(0.02)                                # the rest of a step
    assert client.wait(20)


@pytest.mark.parametrize("restore_first", [True, False])
def test_no_snapshot_is_skipped_for_set_up_when_the_run_starts_with_restore(thread_daemon, monkeypatch, caplog,
                                                                             restore_first):
    import threading

    from ftd.daemon.shm_store import ShmStore
    allocate = ShmStore.allocate
    stepped = threading.Event()                         # the trainer passed step 1's optimizer step

    def slow_allocate(self, name, size):                # a set-up that takes longer than a training step
        if restore_first:
            time.sleep(SLOW_SETUP_SECONDS)
        else:                                           # longer than a step however slow the host: no race
            stepped.wait(20)
        allocate(self, name, size)
    monkeypatch.setattr(ShmStore, "allocate", slow_allocate)
    d = thread_daemon()
    state = big_state()
    with ftd.Client(d.endpoint) as client, caplog.at_level(logging.INFO, "ftd.trainer"):
        if restore_first:
            assert client.restore(state) is None        # a fresh start: the buffers are set up now
        run_steps(client, state, 4, after_step=lambda step: step == 1 and stepped.set())
        stats = dict(client.stats)
    assert stats["failed"] == 0
    if restore_first:
        assert stats["skipped_setup"] == 0, stats       # from step 0 on, every snapshot got its buffer at once
        assert "skipped while the buffers" not in caplog.text
    else:                                               # the case restore() prevents: step 0 waits for set-up
        assert stats["skipped_setup"] >= 1, stats
        assert "skipped while the buffers" in caplog.text


def test_a_restore_beside_a_live_trainer_does_not_take_its_rank_over(thread_daemon):
    import os
    d = thread_daemon()
    cat = d.daemon.catalog
    other = os.getppid()                                # a live process that is not this one
    cat.register(0, 1, other)
    cat.ranks[0].session = None                         # as adopted by a restarted daemon: held, no session yet
    with ftd.Client(d.endpoint) as client:
        assert client.restore(make_state(step=False)) is None
        assert client._session.id is None               # not registered: nothing prepared
    assert cat.ranks[0].pid == other and not cat.ranks[0].detached and cat.live_trainers() == [(0, other)]
