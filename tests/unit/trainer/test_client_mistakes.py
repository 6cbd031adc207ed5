"""Mistakes a real user's trainer makes, against a daemon served from a thread: each gets a clear error
or the right behaviour, never a quietly wrong state (the keys, the model's shapes, values ftd cannot
store, steps that go back, a run that finished), and restore says what it did."""
from __future__ import annotations

import logging
import re
import time

import pytest
import torch
from torch import nn

import ftd
from ftd.errors import FtdError, SerializationError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def patient_hook(monkeypatch):
    monkeypatch.setattr("ftd.trainer.client.BEGIN_GRACE_SECONDS", 5.0)


def model_and_optimizer(width=16, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


def snapshot_steps(client, state, steps):
    for step in steps:
        client.snapshot(step, state)
        assert client.wait(30)


def test_keys_that_do_not_match_raise_naming_them_and_strict_false_restores_the_rest(thread_daemon):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    with ftd.Client(d.endpoint) as c:
        snapshot_steps(c, {"model": model, "optim": opt, "meta": {"epoch": 3}}, [0])
    fresh_model, fresh_opt = model_and_optimizer(seed=1)
    renamed = {"model": fresh_model, "optimizer": fresh_opt, "metadata": {"epoch": 0}}
    with ftd.Client(d.endpoint) as c:
        with pytest.raises(FtdError) as e:
            c.restore(renamed)
        text = str(e.value)
        assert "['meta', 'optim']" in text and "['metadata', 'optimizer']" in text and "strict=False" in text
        assert "optim" not in renamed and not fresh_opt.state_dict()["state"] == {}  # nothing was loaded
        assert not torch.equal(fresh_model[0].weight, model[0].weight)
        assert c.restore(renamed, strict=False) == 0
    assert torch.equal(fresh_model[0].weight, model[0].weight)           # the key both have
    assert renamed["meta"] == {"epoch": 3} and renamed["metadata"] == {"epoch": 0}


def test_a_changed_model_is_refused_naming_the_job_step_keys_and_shapes(thread_daemon):
    d = thread_daemon()
    model, opt = model_and_optimizer(width=16)
    with ftd.Client(d.endpoint) as c:
        snapshot_steps(c, {"model": model, "optim": opt}, [0, 1])
    wider, wider_opt = model_and_optimizer(width=32, seed=1)
    before = wider[0].weight.clone()
    with ftd.Client(d.endpoint) as c:
        with pytest.raises(FtdError) as e:
            c.restore({"model": wider, "optim": wider_opt})
    text = str(e.value)
    assert f"job {thread_daemon.job!r}, step 1" in text
    assert "state['model']['0.weight'] is float32[16, 8] in the snapshot, float32[32, 8] now" in text
    assert "exp_avg" in text                                              # the optimizer's moments too
    assert "resume='never'" in text and "ftd clear" in text              # and how to start afresh
    assert torch.equal(wider[0].weight, before)                          # nothing half-loaded


def test_a_value_ftd_cannot_store_fails_the_first_snapshot_naming_its_path(thread_daemon):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    state = {"model": model, "optim": opt, "meta": {"loader": object()}}
    with ftd.Client(d.endpoint) as c:
        with pytest.raises(SerializationError, match=re.escape("state['meta']['loader']")):
            c.snapshot(0, state)
        assert not c.wait(5)
        state["meta"]["loader"] = {"position": 12}                        # fixed: it works from now on
        c.snapshot(1, state)
        assert c.wait(30)


def test_unstorable_values_later_in_a_run_warn_with_counts_and_wait_says_false(thread_daemon, caplog):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    state = {"model": model, "optim": opt, "meta": {}}
    with ftd.Client(d.endpoint) as c, caplog.at_level(logging.WARNING, "ftd.trainer"):
        snapshot_steps(c, state, [0])
        state["meta"]["callback"] = lambda: None
        c.snapshot(1, state)                        # never raises after the first snapshot
        assert not c.wait(5)                        # and does not look like a success either
        c._warned_at = -1e9                         # as if 30 s had passed: the warning repeats, with counts
        c.snapshot(2, state)
        assert not c.wait(5)
    warnings = [r.getMessage() for r in caplog.records if "state['meta']['callback']" in r.getMessage()]
    assert len(warnings) == 2 and "2 snapshot(s) failed since step 1" in warnings[1]


def test_a_client_that_is_not_strict_only_warns_at_the_first_snapshot(thread_daemon):
    d = thread_daemon()
    with ftd.Client(d.endpoint, strict=False) as c:
        c.snapshot(0, {"x": {1, 2}, "bad": object()})
        assert not c.wait(5)


def test_plain_values_are_restored_into_the_objects_the_trainer_holds(thread_daemon):
    d = thread_daemon()
    gen = torch.Generator().manual_seed(5)
    meta, history, ema = {"epoch": 2, "lr": 0.1}, [1.0, 2.0], torch.full((3,), 7.0)
    with ftd.Client(d.endpoint) as c:
        snapshot_steps(c, {"meta": meta, "history": history, "ema": ema, "gen": gen}, [0])
    expected = torch.rand(2, generator=torch.Generator().set_state(gen.get_state()))
    mine = {"meta": {"epoch": 0, "stale": True}, "history": [], "ema": torch.zeros(3), "gen": torch.Generator()}
    refs = dict(mine)
    with ftd.Client(d.endpoint) as c:
        assert c.restore(mine) == 0
    assert all(mine[k] is refs[k] for k in refs)                          # the same objects, updated
    assert refs["meta"] == {"epoch": 2, "lr": 0.1} and refs["history"] == [1.0, 2.0]
    assert torch.equal(refs["ema"], ema) and torch.equal(torch.rand(2, generator=refs["gen"]), expected)


def test_resume_never_starts_afresh_and_must_refuses_to(thread_daemon, capsys):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    with ftd.Client(d.endpoint) as c:
        snapshot_steps(c, {"model": model, "optim": opt}, [0, 1])
    with ftd.Client(d.endpoint) as c:
        assert c.restore({"model": model, "optim": opt}, resume="never") is None
    assert "starts afresh: resume='never'" in capsys.readouterr().err
    with ftd.Client(d.endpoint) as c:
        assert c.restore({"model": model, "optim": opt}) is None          # the old versions are gone
        with pytest.raises(FtdError, match="resume='must'"):
            c.restore({"model": model, "optim": opt}, resume="must")
        with pytest.raises(ValueError, match="resume"):
            c.restore({}, resume="sometimes")


def test_a_run_that_finished_is_not_resumed_by_a_rerun(thread_daemon, capsys):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    state = {"model": model, "optim": opt}
    c = ftd.Client(d.endpoint)
    snapshot_steps(c, state, [0, 1, 2])
    c.finish()                                                             # the run is over
    with ftd.Client(d.endpoint) as again:
        assert again.restore(state, resume="must") == 2                    # resuming it on purpose still works
        again.finish()
    with ftd.Client(d.endpoint) as rerun:
        assert rerun.restore(state) is None                                # a plain rerun starts afresh
        assert "previous run finished" in capsys.readouterr().err
        snapshot_steps(rerun, state, [0])                                  # and snapshots from step 0 again
    with ftd.Client(d.endpoint) as crashed:
        assert crashed.restore(state) == 0                                 # an unfinished run is resumed


def test_steps_that_go_back_are_refused_with_what_to_do(thread_daemon, caplog):
    d = thread_daemon()
    model, opt = model_and_optimizer()
    state = {"model": model, "optim": opt}
    with ftd.Client(d.endpoint) as c, caplog.at_level(logging.WARNING, "ftd.trainer"):
        snapshot_steps(c, state, [5, 6])
        c.snapshot(3, state)
        assert not c.wait(10)
        snapshot_steps(c, state, [6, 7])                                   # the same step again, and on
    assert any("step 3 comes after step 6" in r.getMessage() and "resume='never'" in r.getMessage()
               for r in caplog.records)
    with ftd.Client(d.endpoint) as c:
        assert c.restore(state) == 7


def test_restore_prints_what_it_did_and_quiet_clients_do_not(thread_daemon, capsys):
    d = thread_daemon()
    with ftd.Client(d.endpoint) as c:
        snapshot_steps(c, {"x": torch.ones(1000)}, [4])
    with ftd.Client(d.endpoint) as c:
        assert c.restore({"x": torch.zeros(1000)}) == 4
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"ftd: rank 0 restored step 4 from memory \(job '{thread_daemon.job}', node 0\): "
                        r"\d+\.\d KiB in \d+\.\d\d s", line), line
    with ftd.Client(d.endpoint, verbose=False) as c:
        assert c.restore({"x": torch.zeros(1000)}) == 4
    assert capsys.readouterr().err == ""


def test_a_restore_that_waits_says_why_every_few_seconds(thread_daemon, monkeypatch, capsys):
    d = thread_daemon()
    monkeypatch.setattr("ftd.trainer.client.WAIT_REPORT_SECONDS", 0.3)
    with ftd.Client(d.endpoint) as c:
        real = c._conn.call
        waits = iter(range(8))

        def rebuilding(mtype, **fields):
            if mtype == "restore" and next(waits, None) is not None:
                return {"wait": "node 0 is rebuilding from its peers (test)"}
            return real(mtype, **fields)

        c._conn.call = rebuilding
        assert c.restore({}) is None
    lines = [x for x in capsys.readouterr().err.splitlines() if "waits to restore" in x]
    assert 2 <= len(lines) <= 6 and all("rebuilding from its peers (test)" in x for x in lines)


def test_a_daemon_that_is_gone_is_named_as_such_not_blamed_on_the_step_length(thread_daemon, caplog):
    d = thread_daemon(request_timeout=3.0)
    model, opt = model_and_optimizer()
    state = {"model": model, "optim": opt}
    with caplog.at_level(logging.WARNING, "ftd.trainer"):
        c = ftd.Client(d.endpoint, timeout=3.0)
        snapshot_steps(c, state, [0])
        d.daemon.clear_on_stop = True                   # (this test process is the trainer, and stays alive)
        d.stop()
        for step in range(1, 30):                       # the copier is stuck asking a daemon that is gone
            c.snapshot(step, state)
            model(torch.randn(4, 8)).sum().backward()
            opt.step()                                  # the pre-step hook decides about each snapshot
            time.sleep(0.1)
        c.close(timeout=5)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "did not answer" in text or "has not answered" in text, text
    assert "takes longer than a training step" not in text
