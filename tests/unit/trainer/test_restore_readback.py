"""The restore's read: every chunk checked before any live tensor is written, straight into the live
tensors, on several threads; the buffers' memory reserved by the trainer."""
import errno
import logging
import os

import pytest
import torch
from torch import nn

import ftd
from ftd.shm.layout import Manifest
from ftd.trainer import readback
from ftd.trainer.restore import live_state_dicts

from support.arenas import make_version
from support.states import make_state, train

pytestmark = pytest.mark.timeout(60)

def live_tensors(state):
    """Every tensor object of the live state, by name (the objects themselves, not copies)."""
    out = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    for i, st in state["optim"].state.items():
        out.update({f"optim.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    out["ema"] = state["ema"]
    return out


def snapshot(tensors):
    return {k: (v.data_ptr(), v.clone()) for k, v in tensors.items()}


def test_the_restore_fills_the_live_tensors_in_place(thread_daemon, monkeypatch):
    monkeypatch.setenv("FTD_RESTORE_THREADS", "3")
    d = thread_daemon(chunk_size=4096)
    state = make_state()
    with ftd.Client(d.endpoint) as client:
        client.snapshot(0, state)
        assert client.wait(10)
        saved = snapshot(live_tensors(state))
        for _ in range(2):
            train(state)
        assert client.restore(state) == 0
        now = live_tensors(state)
        assert now.keys() == saved.keys()
        for k, (ptr, value) in saved.items():
            assert now[k].data_ptr() == ptr, f"{k} was replaced, not filled in place"
            assert torch.equal(now[k], value), k


def test_a_fresh_optimizer_gets_its_moments_and_the_module_its_values_on_many_threads(thread_daemon, monkeypatch):
    monkeypatch.setenv("FTD_RESTORE_THREADS", "4")
    d = thread_daemon(chunk_size=4096)
    state = make_state()
    with ftd.Client(d.endpoint) as client:
        client.snapshot(0, state)
        assert client.wait(10)
        saved = {k: v.clone() for k, v in live_tensors(state).items()}
    fresh = make_state(seed=7, step=False)            # a restarted trainer: new objects, no moments yet
    weight = fresh["model"][0].weight
    with ftd.Client(d.endpoint) as client:
        assert client.restore(fresh) == 0
    assert fresh["model"][0].weight is weight
    now = live_tensors(fresh)
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def test_a_corrupt_chunk_leaves_the_live_state_untouched(thread_daemon, caplog):
    d = thread_daemon(chunk_size=4096)
    state = make_state()
    with ftd.Client(d.endpoint) as client:
        client.snapshot(0, state)
        assert client.wait(10)
        version = d.daemon.catalog.restore(0)["versions"][0]
        nbytes = version["manifest"]["nbytes"]
        with open(f"/dev/shm/{version['buffer']}", "r+b") as f:   # flip a byte of the LAST chunk
            f.seek(nbytes - 1)
            b = f.read(1)
            f.seek(nbytes - 1)
            f.write(bytes([b[0] ^ 0xFF]))
        train(state)                                    # the live state now differs from the snapshot
        before = snapshot(live_tensors(state))
        with caplog.at_level(logging.WARNING, "ftd.trainer"):
            assert client.restore(state) is None        # the only version is corrupt: nothing to restore
        assert "step 0 (rank 0) fails its checksum in chunk" in caplog.text
        now = live_tensors(state)
        for k, (ptr, value) in before.items():
            assert now[k].data_ptr() == ptr and torch.equal(now[k], value), f"{k} was written before the checks"
        assert d.daemon.catalog.restore(0)["versions"] == []  # reported corrupt, never served again


def test_the_plan_fills_what_restore_would_copy_into_and_makes_the_rest_fresh():
    stepped = make_state()
    fresh_opt = torch.optim.SGD(stepped["model"].parameters(), lr=0.1, momentum=0.9)  # no momentum buffers yet
    param = nn.Parameter(torch.ones(3))
    state = {"model": stepped["model"], "optim": stepped["optim"], "sgd": fresh_opt,
             "loose": {"t": torch.zeros(5), "p": param}, "arr": [torch.zeros(2, 2).t()]}
    saved = dict(state, sgd=torch.optim.SGD(stepped["model"].parameters(), lr=0.1, momentum=0.9).state_dict())
    data, manifest = make_version({k: v.state_dict() if hasattr(v, "load_state_dict") else v
                                   for k, v in saved.items()})
    manifest = Manifest.from_json(manifest.to_json())
    where = readback.plan(manifest, state, live_state_dicts(state))
    live_ptrs = {t.data_ptr() for t in where.live.values()}
    assert {p.data_ptr() for p in stepped["model"].parameters()} <= live_ptrs
    moments = [v for st in stepped["optim"].state.values() for v in st.values() if torch.is_tensor(v)]
    assert {m.data_ptr() for m in moments} <= live_ptrs
    assert state["loose"]["t"].data_ptr() in live_ptrs      # a tensor in a dict: filled in place
    assert param.data_ptr() not in live_ptrs                # a Parameter in plain data is replaced
    assert state["arr"][0].data_ptr() not in live_ptrs      # not contiguous: a fresh tensor, copied by decode
    assert not where.views                                  # all on the CPU: nothing left as a view


def test_a_buffer_whose_memory_cannot_be_reserved_fails_the_snapshot_cleanly(thread_daemon, monkeypatch, caplog):
    d = thread_daemon()
    monkeypatch.setattr("ftd.shm.segments.populate", lambda address, length, write: errno.ENOMEM if write else 0)
    state = make_state()
    with ftd.Client(d.endpoint) as client, caplog.at_level(logging.WARNING, "ftd.trainer"):
        client.snapshot(0, state)
        assert client.wait(10) is False
        train(state)                                    # training goes on
    assert "cannot reserve" in caplog.text and "tmpfs" in caplog.text


def test_the_daemon_creates_buffers_sparse_and_the_trainer_reserves_them(thread_daemon, monkeypatch):
    monkeypatch.setattr("ftd.trainer.arena.Arena.reserve_in_background", lambda self: None)
    d = thread_daemon()
    with ftd.Client(d.endpoint) as client:
        client.snapshot(0, {"x": torch.ones(1 << 20)})  # 4 MiB
        assert client.wait(10)
        blocks = {b.state: os.stat(f"/dev/shm/{b.name}").st_blocks * 512 for b in d.daemon.catalog.ranks[0].buffers}
        assert blocks["complete"] >= 4 << 20          # what the copy wrote, reserved by the copy itself
        assert blocks["free"] == 0                    # the other buffer: created at once, no memory yet

