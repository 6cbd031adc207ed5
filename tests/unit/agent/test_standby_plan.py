"""What a warm standby can run (``python_target``), what it imports ahead, and the timeline it marks."""
import json

import pytest

from ftd.agent.standby import python_target
from ftd.agent.standby_main import read_message, top_level_imports
from ftd.util import timeline

pytestmark = pytest.mark.timeout(30)


def test_only_plain_python_module_or_script_commands_get_a_standby():
    assert python_target(["python", "-m", "pkg.train", "--lr", "1"]) == ("python", ["--module", "pkg.train", "--", "--lr", "1"])
    assert python_target(["/venv/bin/python3.11", "train.py", "-x"]) == ("/venv/bin/python3.11", ["--path", "train.py", "--", "-x"])
    for plain in (["torchrun", "--nproc-per-node", "2", "train.py"], ["python", "-u", "train.py"],
                  ["python", "-c", "print(1)"], ["python"], ["python", "-m"], ["bash", "run.sh"],
                  ["python", "-m", "-x"], ["./train"]):
        assert python_target(plain) is None, plain


def test_the_trainers_top_level_imports_are_imported_ahead_but_not_its_optional_ones():
    source = ("from __future__ import annotations\nimport os, numpy as np\nimport torch.nn\nfrom ftd.x import y\n"
              "from . import local\ndef main():\n    import optional_thing\nif True:\n    import guarded\n")
    assert top_level_imports(source) == ["os", "numpy", "torch.nn", "ftd.x"]
    assert top_level_imports("def broken(:\n") == []


def test_a_start_message_is_json_with_an_environment_of_strings(tmp_path):
    import os
    for payload, ok in ((b"", None), (json.dumps({"env": {"RANK": "3"}}).encode(), {"env": {"RANK": "3"}}),
                        (json.dumps({"env": {"RANK": 3}}).encode(), SystemExit), (b"[1]", SystemExit)):
        r, w = os.pipe()
        os.write(w, payload)
        os.close(w)
        if ok is SystemExit:
            with pytest.raises(SystemExit, match="environment of strings"):
                read_message(r)
        else:
            assert read_message(r) == ok


def test_timeline_marks_append_json_lines_and_skip_garbage(tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.delenv(timeline.ENV, raising=False)
    timeline.mark("nowhere")  # no FTD_TIMELINE: nothing written, no error
    monkeypatch.setenv(timeline.ENV, str(path))
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    timeline.mark("restored", step=7)
    timeline.mark("spawned", tmp_path / "other.jsonl", node=0, generation=3)
    with open(path, "a") as f:
        f.write("not json\n{\"event\": 1}\n")
    events = timeline.read(path)
    assert len(events) == 1 and events[0]["event"] == "restored"
    assert (events[0]["rank"], events[0]["generation"], events[0]["step"]) == (2, 1, 7)
    assert timeline.read(tmp_path / "other.jsonl")[0]["generation"] == 3  # explicit fields win
    assert timeline.read(tmp_path / "missing.jsonl") == []


def test_a_standby_that_cannot_start_turns_the_pool_to_plain_starts(tmp_path):
    from ftd.agent.standby import StandbyPool
    pool = StandbyPool([str(tmp_path / "missing" / "python3"), "train.py"], {}, [tmp_path / "rank0.log"])
    assert pool.enabled
    pool.refill()  # FileNotFoundError from the missing interpreter: logged, not raised
    assert not pool.enabled and pool.take(0) is None and not pool.needs_refill()
    pool.close()
