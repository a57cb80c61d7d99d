"""``qkv serve --config`` and ``--cluster``: the settings a node ends up
with, and which source wins. ``serve`` is invoked in process with the node
itself replaced, so these tests start nothing; one test runs a real
cluster from the shared membership file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli import serve as serve_module
from cli.main import cli
from cli.serve import NodeSettings
from net.address import Address
from tests.support.procs import QKV, ProcCluster, free_ports, run_qkv

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


def settings_of(args: list[str], monkeypatch: pytest.MonkeyPatch) -> NodeSettings:
    """The settings ``qkv serve ARGS`` would run a node with."""
    seen: list[NodeSettings] = []

    def fake_run(settings: NodeSettings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(serve_module, "run_node", fake_run)
    monkeypatch.setattr("cli.main.setup_logging", lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *args], prog_name="qkv", standalone_mode=False)
    assert exit_.value.code == 0
    return seen[0]


def usage_error(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    import click

    monkeypatch.setattr(serve_module, "run_node", lambda settings: 0)
    monkeypatch.setattr("cli.main.setup_logging", lambda *a: None)
    with pytest.raises(click.UsageError) as exc:
        cli.main(["serve", *args], prog_name="qkv", standalone_mode=False)
    return exc.value.format_message()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_file_settings_apply_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "n1.toml",
        """
id = "n1"
listen = "127.0.0.1:7101"
data_dir = "data/n1"
request_timeout = 3.5
max_value = 1000
log_format = "json"
[peers]
n2 = "127.0.0.1:7102"
n3 = "127.0.0.1:7103"
""",
    )
    from_file = settings_of(["--config", str(config)], monkeypatch).config
    assert from_file.node_id == "n1" and from_file.listen == Address("127.0.0.1", 7101)
    assert from_file.peers == {"n2": Address("127.0.0.1", 7102), "n3": Address("127.0.0.1", 7103)}
    assert from_file.data_dir == tmp_path / "data" / "n1"  # relative to the file
    assert (from_file.request_timeout, from_file.max_value) == (3.5, 1000)
    assert from_file.max_frame == 2 * 1024 * 1024  # not in the file: the default
    assert from_file.cluster_secret is None

    overridden = settings_of(
        ["--config", str(config), "--request-timeout", "0.5", "--listen", "127.0.0.1:7201"], monkeypatch
    ).config
    assert overridden.request_timeout == 0.5 and overridden.listen == Address("127.0.0.1", 7201)
    assert overridden.max_value == 1000  # the file still applies to what no flag gave

    secret = write(tmp_path / "secret", "  sixteen bytes or more  \n")
    with_secret = settings_of(["--config", str(config), "--cluster-secret-file", str(secret)], monkeypatch)
    assert with_secret.config.cluster_secret == b"sixteen bytes or more"
    assert "sixteen" not in repr(with_secret.config)  # never in a log line

    metrics = write(
        tmp_path / "m.toml", 'id = "n1"\nlisten = "127.0.0.1:1"\ndata_dir = "d"\nmetrics = "127.0.0.1:9101"\n'
    )
    assert settings_of(["--config", str(metrics)], monkeypatch).config.metrics_listen == Address(
        "127.0.0.1", 9101
    )
    flag = settings_of(["--config", str(metrics), "--metrics", "0.0.0.0:9200"], monkeypatch).config
    assert flag.metrics_listen == Address("0.0.0.0", 9200)

    # --peer on the command line replaces the file's peers, not adds to them
    peers = settings_of(["--config", str(config), "--peer", "n9=127.0.0.1:7109"], monkeypatch).config
    assert peers.peers == {"n9": Address("127.0.0.1", 7109)}


def test_cluster_file_gives_peers_and_listen_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = write(
        tmp_path / "cluster.toml",
        '[nodes]\nn1 = "127.0.0.1:7301"\nn2 = "127.0.0.1:7302"\nn3 = "127.0.0.1:7303"\n',
    )
    config = settings_of(
        ["--cluster", str(members), "--id", "n2", "--data-dir", str(tmp_path / "d")], monkeypatch
    ).config
    assert config.listen == Address("127.0.0.1", 7302)
    assert config.peers == {"n1": Address("127.0.0.1", 7301), "n3": Address("127.0.0.1", 7303)}
    wildcard = settings_of(
        ["--cluster", str(members), "--id", "n2", "--data-dir", "d", "--listen", "0.0.0.0:7302"], monkeypatch
    ).config
    assert wildcard.listen == Address("0.0.0.0", 7302) and set(wildcard.peers) == {"n1", "n3"}


def test_the_documented_example_files_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings_of(["--config", str(EXAMPLES / "n1.toml")], monkeypatch).config
    assert config.node_id == "n1" and config.listen == Address("10.0.0.1", 7001)
    assert config.peers == {"n2": Address("10.0.0.2", 7001), "n3": Address("10.0.0.3", 7001)}
    assert config.data_dir == Path("/var/lib/qkv/n1")


BASE = 'id = "n1"\nlisten = "127.0.0.1:1"\ndata_dir = "d"\n'


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        (
            BASE + 'colour = "red"\n',
            [],
            "unknown setting 'colour'",
        ),
        (BASE + 'max_frame = "big"\n', [], "'max_frame' must be"),
        (BASE + 'storage = "tape"\n', [], "tape"),
        (BASE + "request_timeout = 0.0\n", [], "request_timeout"),
        ("id = [\n", [], "not valid TOML"),
        (BASE + 'cluster_secret_file = "short"\n', [], "at least 16 bytes"),
        (BASE + 'cluster_secret_file = "missing"\n', [], "cannot read"),
        ('listen = "127.0.0.1:1"\ndata_dir = "d"\n', [], "--id"),
        ('id = "n1"\nlisten = "127.0.0.1:1"\n', [], "--data-dir"),
        ('id = "n4"\ndata_dir = "d"\ncluster = "cluster.toml"\n', [], "'n4' is not a member"),
        ('id = "n1"\ndata_dir = "d"\ncluster = "cluster.toml"\n', ["--peer", "n2=127.0.0.1:2"], "either"),
    ],
)
def test_bad_config_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, args: list[str], expected: str
) -> None:
    write(tmp_path / "cluster.toml", '[nodes]\nn1 = "127.0.0.1:7301"\nn2 = "127.0.0.1:7302"\n')
    write(tmp_path / "short", "too short\n")
    config = write(tmp_path / "node.toml", text)
    assert expected in usage_error(["--config", str(config), *args], monkeypatch)


@pytest.mark.subprocess
async def test_a_cluster_runs_from_config_files_and_one_shared_membership_file(tmp_path: Path) -> None:
    ports = free_ports(3)
    members = "".join(f'n{i + 1} = "127.0.0.1:{p}"\n' for i, p in enumerate(ports))
    write(tmp_path / "cluster.toml", "[nodes]\n" + members)
    write(tmp_path / "secret", "a cluster secret of enough bytes\n")
    for i in range(3):
        write(
            tmp_path / f"n{i + 1}.toml",
            f'id = "n{i + 1}"\ncluster = "cluster.toml"\ndata_dir = "n{i + 1}/data"\nlog_format = "json"\n'
            'cluster_secret_file = "secret"\n',
        )

    class FromFiles(ProcCluster):
        def serve_args(self, i: int) -> list[str]:
            return [str(QKV), "serve", "--config", str(self.root / f"n{i + 1}.toml")]

    with FromFiles(tmp_path, 3, ports=ports) as cluster:
        cluster.start_all()
        await cluster.wait_serving_async()
        assert cluster.log(0).splitlines()[-1].startswith("{")  # log_format from the file
        nodes = cluster.nodes_arg
        done = run_qkv("set", "k", "v", "--nodes", nodes)
        assert done.returncode == 0, done
        assert (tmp_path / "n2" / "data").is_dir()
    shutil.rmtree(tmp_path / "n1", ignore_errors=True)
