"""The demo's restart breakdown from the agents' and workers' timeline marks."""
import pytest

from ftd.demo.breakdown import breakdown, lines, training_again

pytestmark = pytest.mark.timeout(30)


def test_each_phase_is_when_the_last_participant_reached_it_after_the_failure():
    t = 1000.0
    events = [
        {"t": t - 5, "event": "first_step", "generation": 1, "rank": 0},   # before the failure: ignored
        {"t": t + 0.1, "event": "failure_seen", "generation": 0, "node": 1},
        {"t": t + 0.3, "event": "failure_seen", "generation": 0, "node": 0},
        {"t": t + 0.4, "event": "workers_stopped", "generation": 0, "node": 0},
        {"t": t + 0.5, "event": "workers_stopped", "generation": 0, "node": 1},
        {"t": t + 0.6, "event": "spawned", "generation": 1, "node": 0},
        {"t": t + 0.7, "event": "spawned", "generation": 1, "node": 1},
        {"t": t + 0.9, "event": "first_step", "generation": 1, "rank": 0},
        {"t": t + 1.2, "event": "first_step", "generation": 1, "rank": 1},
        {"t": t + 9.0, "event": "first_step", "generation": 2, "rank": 0},  # a later generation: ignored
        {"t": t + 0.2, "event": "agent_started", "node": 2},  # a replacement's agent knows no generation yet
    ]
    rows = {r["event"]: r["seconds"] for r in breakdown(events, t, 0, 1)}
    assert rows["failure_seen"] == pytest.approx(0.1)      # the first agent to see it
    assert rows["workers_stopped"] == pytest.approx(0.5)   # the last node to stop
    assert rows["spawned"] == pytest.approx(0.7)
    assert rows["imported"] is None
    assert rows["agent_started"] == pytest.approx(0.2)
    assert training_again(breakdown(events, t, 0, 1)) == pytest.approx(1.2)
    text = lines(breakdown(events, t, 0, 1), "  ")
    assert len(text) == 5 and "first step after the failure" in text[-1] and "(+ 0.50)" in text[-1]
