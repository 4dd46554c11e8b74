"""What a configuration needs of this machine is checked where it is read — --check, the start
and a reload alike — naming the key and the path: a CA file that cannot be read or holds no
certificate, uvloop chosen but not installed (problems); a history database that cannot be
written (a warning: the proxy runs, keeping its statistics in memory). And a start that fails
for another reason than the address is not reported as "cannot listen"."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli import _run, main
from proxy.configload import load_config

TLS_CERT = Path(__file__).parent / "tls" / "cert.pem"


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_missing_ca_file_is_refused_by_check_and_start_naming_key_and_path(tmp_path, capsys):
    """It passed --check; the start then failed with 'cannot listen on ...: No such file or
    directory', blaming the address."""
    missing = tmp_path / "nowhere" / "ca.pem"
    path = write(tmp_path / "p.yaml", {"upstream": {"ca_file": str(missing)}})
    for argv in (["--config", str(path), "--check"], ["--config", str(path)]):
        assert main(argv, environ={}) == 2
        err = capsys.readouterr().err
        assert f"upstream.ca_file: cannot read {missing} (No such file or directory)" in err
        assert "cannot listen" not in err


def test_a_file_that_holds_no_certificate_is_refused(tmp_path, capsys):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    path = write(tmp_path / "p.yaml", {"upstream": {"ca_file": str(not_pem)}})
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert f"upstream.ca_file: {not_pem} holds no certificate the proxy can use" in \
        capsys.readouterr().err


def test_a_readable_ca_bundle_passes(tmp_path, capsys):
    path = write(tmp_path / "p.yaml", {"upstream": {"ca_file": str(TLS_CERT)}})
    assert main(["--config", str(path), "--check"], environ={}) == 0


def test_a_fleet_hosts_ca_file_is_named_by_its_host_and_an_inherited_one_once(tmp_path,
                                                                            capsys):
    missing = tmp_path / "missing.pem"
    hosts = [{"name": "a", "url": "http://127.0.0.1:9", "budget_gb": 8},
             {"name": "b", "url": "http://127.0.0.1:10", "budget_gb": 8,
              "ca_file": str(missing)}]
    path = write(tmp_path / "own.yaml", {"upstreams": hosts})
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"  upstreams[1].ca_file: cannot read {missing} (No such file or directory)"]
    # Taken from upstream: by every host: said once, where it is written.
    path = write(tmp_path / "shared.yaml", {"upstream": {"ca_file": str(missing)},
                                            "upstreams": hosts[:1]})
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"  upstream.ca_file: cannot read {missing} (No such file or directory)"]


async def test_a_start_failing_after_the_bind_is_not_called_a_listen_error(tmp_path, capsys):
    """The start's own failures (here a CA file that went missing after the check) are no
    fault of the address: only a bind failure is 'cannot listen'."""
    missing = tmp_path / "gone.pem"
    config = load_config({"server": {"port": 0}, "upstream": {"ca_file": str(missing)},
                          "storage": {"enabled": False}})
    assert await _run(config, demo=False) == 1
    err = capsys.readouterr().err
    assert "cannot listen" not in err
    assert err.startswith("cannot start: ") and "No such file or directory" in err


async def test_a_bind_failure_is_still_called_one(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config({"server": {"port": port}, "storage": {"enabled": False}})
        assert await _run(config, demo=False) == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in \
        capsys.readouterr().err


def test_uvloop_chosen_but_not_installed_fails_the_check_not_only_the_start(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)    # as on a machine without it
    path = write(tmp_path / "p.yaml", {"server": {"event_loop": "uvloop"}})
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert "server.event_loop: uvloop is not installed" in capsys.readouterr().err
    path = write(tmp_path / "auto.yaml", {"server": {"event_loop": "auto"}})
    assert main(["--config", str(path), "--check"], environ={}) == 0


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_a_history_database_that_cannot_be_written_is_a_warning(tmp_path, capsys, where):
    """The proxy runs without it (statistics in memory only): said at --check, not refused."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    db = blocker / "h.sqlite3" if where == "under_a_file" else tmp_path
    path = write(tmp_path / "p.yaml", {"storage": {"path": str(db)}})
    assert main(["--config", str(path), "--check"], environ={}) == 0
    out = capsys.readouterr().out
    why = f"{blocker} is not a directory" if where == "under_a_file" else \
        f"{tmp_path} is a directory"
    assert f"warning: storage.path: {why}: the proxy would keep its statistics" in out


def test_a_history_database_in_a_directory_still_to_make_passes(tmp_path, capsys):
    path = write(tmp_path / "p.yaml", {"storage": {"path": str(tmp_path / "a" / "b" / "h.db")}})
    assert main(["--config", str(path), "--check"], environ={}) == 0
    assert "warning" not in capsys.readouterr().out
    assert not (tmp_path / "a").exists()     # the check made nothing


def test_a_history_path_the_system_cannot_even_look_at_is_a_warning(tmp_path, capsys):
    """A path the system refuses to look up (here a name too long; a directory on the way
    that may not be searched does the same) is said, not a traceback."""
    db = tmp_path / ("x" * 300) / "h.sqlite3"
    path = write(tmp_path / "p.yaml", {"storage": {"path": str(db)}})
    assert main(["--config", str(path), "--check"], environ={}) == 0
    out = capsys.readouterr().out
    assert f"warning: storage.path: cannot reach {db} (File name too long)" in out
