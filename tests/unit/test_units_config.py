import pytest

from ftd.config import Config, load_config
from ftd.units import format_size, parse_size

from support.jobs import ROOT


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
    for name in ("FTD_NODE_RANK", "GROUP_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    c = load_config(None)
    assert c.job == "default" and c.node_rank == 0 and c.memory_budget > 0
    assert c.endpoint.endswith("/default/node0.sock") and c.shm_prefix == "ftd.default.n0."


def test_shipped_local_config_is_the_defaults(monkeypatch):
    monkeypatch.delenv("FTD_JOB", raising=False)
    shipped = load_config(ROOT / "configs" / "local.toml")
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


def test_shipped_cluster_config_describes_four_nodes_with_curve():
    c = load_config(ROOT / "configs" / "cluster.toml", node_rank=2)
    assert c.nodes == 4 and c.peer_endpoint == "tcp://10.0.0.13:7710" and c.peer_bind == "tcp://*:7710"
    assert c.grouping().k == 3 and c.parity_code == "xor" and c.peer_key_file is not None


def test_cluster_config_errors_name_the_problem():
    four = tuple(f"tcp://127.0.0.1:{7000 + i}" for i in range(4))
    with pytest.raises(ValueError, match="tcp://host:port"):
        Config(peers=("10.0.0.1:7000",))
    with pytest.raises(ValueError, match="twice"):
        Config(peers=(four[0], four[0]))
    with pytest.raises(ValueError, match="node_rank 4 has no entry"):
        Config(peers=four, node_rank=4)
    with pytest.raises(ValueError, match="1 <= parity < group size"):
        Config(peers=four, parity=4)
    with pytest.raises(ValueError, match="multiple of 3"):
        Config(peers=four, group_size=3)
    with pytest.raises(ValueError, match="needs 'rs'"):
        Config(peers=four, parity=2, parity_code="xor")
    with pytest.raises(ValueError, match="ftd keygen"):
        Config(peers=("tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000"))
    assert Config(peers=four, parity=2).parity_code == "rs"


def test_a_bad_value_in_a_config_file_names_the_file_and_the_key(tmp_path):
    from ftd.errors import ConfigError, FtdError
    path = tmp_path / "node.toml"
    for text, key in (('memory_budget = "lots"', "memory_budget"), ("parity = true", "parity"),
                      ('peer_timeout = "soon"', "peer_timeout"), ("chunk_size = 1000", "chunk_size")):
        path.write_text(text + "\n")
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(path) in str(e.value) and key in str(e.value), e.value
        assert isinstance(e.value, FtdError) and isinstance(e.value, ValueError)


def test_advertise_gives_a_replacement_its_own_peer_endpoint(tmp_path, monkeypatch):
    peers = ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001")
    c = Config(peers=peers, node_rank=1, advertise="tcp://127.0.0.2:6000")
    assert c.peer_endpoint == "tcp://127.0.0.2:6000" and c.peer_bind == "tcp://*:6000" and c.peers == peers
    with pytest.raises(ValueError, match="node 0's endpoint in peers"):
        Config(peers=peers, node_rank=1, advertise=peers[0])
    with pytest.raises(ValueError, match="is not tcp://host:port"):
        Config(peers=peers, node_rank=1, advertise="host:6000")
    with pytest.raises(ValueError, match="needs peers"):
        Config(advertise="tcp://127.0.0.2:6000")
    with pytest.raises(ValueError, match="no peer_key_file"):  # another host: the link must be secured
        Config(peers=peers, node_rank=1, advertise="tcp://10.1.2.3:6000")
    path = tmp_path / "c.toml"
    path.write_text('peers = ["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001"]\nnode_rank = 1\n')
    monkeypatch.setenv("FTD_PEER_ENDPOINT", "tcp://127.0.0.3:7000")
    assert load_config(path).peer_endpoint == "tcp://127.0.0.3:7000"
