import pytest

from ftd.config import Config, load_config
from ftd.units import format_size, parse_size


@pytest.mark.parametrize("text,expected", [("4MiB", 4 << 20), ("2GB", 2_000_000_000), ("1048576", 1 << 20),
                                           ("1.5 GiB", 3 << 29), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_percentage_and_errors():
    assert parse_size("25%", total=1000) == 250
    for bad in ("12 parsecs", "-1", "", "50%"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(1536) == "1.5 KiB"


def test_config_defaults_and_paths(monkeypatch):
    monkeypatch.delenv("FTD_JOB", raising=False)
    monkeypatch.delenv("FTD_NODE_RANK", raising=False)
    c = load_config(None)
    assert c.job == "default" and c.node_rank == 0 and c.memory_budget > 0
    assert c.endpoint.endswith("/default/node0.sock") and c.shm_prefix == "ftd.default.n0."


def test_shipped_local_config_is_the_defaults(monkeypatch):
    from pathlib import Path
    monkeypatch.delenv("FTD_JOB", raising=False)
    shipped = load_config(Path(__file__).parent.parent / "configs" / "local.toml")
    defaults = load_config(None)
    assert shipped.endpoint == defaults.endpoint and shipped.chunk_size == defaults.chunk_size
    assert shipped.shm_dir == defaults.shm_dir


def test_config_errors_name_the_problem(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('job = "x"\nmemory_budgit = "1GiB"\n')
    with pytest.raises(ValueError, match="memory_budgit"):
        load_config(f)
    f.write_text('job = "has space"\n')
    with pytest.raises(ValueError, match="job name"):
        load_config(f)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="chunk_size"):
        Config(chunk_size=1000)
