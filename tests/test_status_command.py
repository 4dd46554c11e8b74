"""`python -m proxy status` finds the proxy the way `healthcheck` does (the config's port, the
admin token from the config or its environment variable) and names a refusal as a refusal."""
from __future__ import annotations

import asyncio

import pytest

from proxy.cli import main

ADMIN = "admin-0123456789"
GUARD = {"auth.keys": [{"name": "alice", "key": "sk-alice-0123456789"}],
         "auth.admin_token": ADMIN}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def status(argv: list[str], environ: dict[str, str]) -> int:
    return await asyncio.to_thread(main, ["status", *argv], environ)


async def test_status_follows_the_configured_port(tmp_path, proxy, capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text(f"server: {{host: 0.0.0.0, port: {port_of(proxy.url)}}}\n")
    assert await status(["--config", str(path)], {}) == 0
    assert "pressure" in capsys.readouterr().out
    assert await status([], {"PROXY_CONFIG": str(path)}) == 0     # as the server reads it
    path.write_text("server: {port: 1}\n")
    assert await status(["--config", str(path)], {}) == 1
    assert "127.0.0.1:1" in capsys.readouterr().out


async def test_status_takes_the_admin_token_from_the_config_or_its_variable(
        tmp_path, make_proxy, emulator, capsys):
    guarded = await make_proxy(emulator.url, **GUARD, **{"auth.read_only_access": "admin"})
    path = tmp_path / "proxy.yaml"
    path.write_text(f"server: {{port: {port_of(guarded.url)}}}\n"
                    f"auth: {{admin_token: {ADMIN}}}\n")
    assert await status(["--config", str(path)], {}) == 0
    path.write_text(f"server: {{port: {port_of(guarded.url)}}}\n"
                    "auth: {admin_token_env: PROXY_TEST_ADMIN}\n")
    assert await status(["--config", str(path)], {"PROXY_TEST_ADMIN": ADMIN}) == 0
    assert "pressure" in capsys.readouterr().out


async def test_a_401_says_unauthorised_and_how_to_pass_the_token(make_proxy, emulator, capsys,
                                                                 tmp_path):
    guarded = await make_proxy(emulator.url, **GUARD)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert await status(["--url", guarded.url, "--config", str(empty)], {}) == 1
    out = capsys.readouterr().out
    assert "unauthorised (401)" in out and "pass the admin token" in out
    assert "cannot reach" not in out
    assert await status(["--url", guarded.url], {"PROXY_API_KEY": "sk-wrong"}) == 1
    assert "the key given was refused" in capsys.readouterr().out


async def test_status_lists_the_hosts_of_a_fleet(make_emulator, make_proxy, capsys):
    from .test_fleet import CATALOG, SMALL, fleet_config
    emus = {n: await make_emulator(catalog=CATALOG) for n in ("mac", "pc")}
    fleet = await make_proxy("", config=fleet_config(
        [("mac", emus["mac"].url, 12), ("pc", emus["pc"].url, 20)]))
    await fleet.engine.load(SMALL, host="mac")
    await emus["pc"].close()
    await fleet.engine.by_name["pc"].core.reconcile()
    assert await status(["--url", fleet.url], {}) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "HOST" in lines
    assert lines["mac"].split()[1] == "up" and lines["mac"].endswith(SMALL)
    assert "12.0" in lines["mac"] and "9.6" in lines["mac"]      # total, and free after 2.4
    assert lines["pc"].split()[1] == "DOWN"
    assert "(1 of 2 hosts up)" in lines["upstream"]


async def test_status_of_a_single_server_has_no_host_lines(proxy, capsys):
    assert await status(["--url", proxy.url], {}) == 0
    out = capsys.readouterr().out
    assert "pressure" in out and "HOST" not in out


async def test_status_of_a_server_the_proxy_cannot_load_on(make_proxy, emulator, capsys):
    """upstream.kind: openai: no footprints (null, which the table could not format) and no
    pressure; the memory line says it is not managed."""
    proxy = await make_proxy(emulator.url, **{"upstream.kind": "openai"})
    assert await status(["--url", proxy.url], {}) == 0
    out = capsys.readouterr().out
    assert "memory     not managed (the server loads its models itself)" in out
    assert "pressure   -" in out
    line = next(line for line in out.splitlines() if line.startswith("qwen/qwen3-4b "))
    assert line.split()[1:3] == ["unknown", "-"] and line.split()[3] == "-"


def test_the_main_help_names_the_commands_and_each_has_its_own_help(capsys):
    """The commands are dispatched before the main parser: its --help must still say they
    exist, as the docs use them (status, healthcheck, mcp)."""
    with pytest.raises(SystemExit) as done:
        main(["--help"], {})
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("status", "healthcheck", "mcp"):
        assert f"python -m proxy {command}" in text
        with pytest.raises(SystemExit) as done:
            main([command, "--help"], {})
        assert done.value.code == 0 and f"python -m proxy {command}" in capsys.readouterr().out
