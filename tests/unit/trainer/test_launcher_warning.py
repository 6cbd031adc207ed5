"""A torchrun set-up whose restarts would hang is said at the first Client, in the worker's log."""
from __future__ import annotations

import logging

import pytest

from ftd.trainer import discovery

SHARED = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}


@pytest.mark.parametrize("env, warns", [
    (SHARED, True),
    (dict(SHARED, TORCHELASTIC_USE_AGENT_STORE="False"), False),  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (dict(SHARED, TORCHELASTIC_MAX_RESTARTS="0"), False),         # nothing to restart
    ({}, False),                                                    # not under torchrun
])
def test_a_shared_rendezvous_store_with_restarts_is_named_with_the_fix(env, warns):
    text = discovery.launcher_warning(env)
    assert (text is not None) == warns
    if warns:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text and "135712" in text and "3 restart" in text


def test_the_warning_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(discovery, "_warned", set())
    for key, value in SHARED.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING, logger=discovery.__name__):
        discovery.warn_about_launcher()
        discovery.warn_about_launcher()
    assert [r.getMessage() for r in caplog.records] == [discovery.launcher_warning()]
