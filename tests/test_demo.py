"""`python -m proxy --demo` as a new user runs it: the banner's examples work when pasted into
a shell (with client keys too, the key coming from the environment, never printed), and the
emulator's port can be fixed."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import build_parser
from proxy.demo import demo_banner
from proxy.server.keys import CONFIG
from .conftest import proxy_config

ROOT = Path(__file__).parent.parent
ALICE = "sk-alice-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def examples(banner: str) -> list[str]:
    """The shell commands of the banner's "Try it" part, continuation lines joined."""
    part = banner.split("Try it:")[1].split("Watch it work:")[0]
    text = part.replace("\\\n", "")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith(("export", "pip"))]


async def sh(command: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def shell_env(**extra: str) -> dict[str, str]:
    # `python` in the banner is the one with the SDK installed, as the install line asks
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **extra}


def test_the_banner_says_to_install_the_sdk_before_using_it():
    banner = demo_banner("http://127.0.0.1:8080", "http://127.0.0.1:1234",
                          proxy_config("http://127.0.0.1:1234"))
    assert banner.index("pip install openai") < banner.index("from openai import")


async def test_with_client_keys_the_examples_carry_the_key_from_the_environment(
        make_proxy, emulator):
    proxy = await make_proxy(emulator.url, **{"auth.keys": [{"name": "alice", "key": ALICE}]})
    banner = demo_banner(proxy.url, emulator.url, proxy.app[CONFIG].current)
    assert ALICE not in banner and "PROXY_API_KEY" in banner
    curl, sdk = examples(banner)
    code, out = await sh(curl + " --fail-with-body -sS", shell_env(PROXY_API_KEY=ALICE))
    assert code == 0 and '"choices"' in out, out
    code, out = await sh(sdk, shell_env(PROXY_API_KEY=ALICE))
    assert code == 0 and out.strip(), out
    code, out = await sh(sdk, shell_env(PROXY_API_KEY="sk-wrong"))
    assert code != 0 and "401" in out


async def test_the_demo_runs_its_emulator_on_the_port_given(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["HOME"] = str(tmp_path)                       # the demo's history goes here
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--demo", "--port", "0", "--demo-upstream-port",
        str(port), cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Stop with Ctrl-C" not in banner:
            line = await proc.stdout.readline()
            assert line, f"the demo ended early:\n{banner}"
            banner += line.decode()
        assert f"LM Studio emulator on http://127.0.0.1:{port}" in banner
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/v1/models") as r:
            assert r.status == 200
        for command in examples(banner):
            code, out = await sh(command, shell_env())
            assert code == 0, out
    finally:
        proc.terminate()
        await proc.wait()


def test_the_demo_upstream_port_is_documented_and_needs_demo(capsys):
    assert "--demo-upstream-port" in build_parser().format_help()
    from proxy.cli import main
    assert main(["--demo-upstream-port", "1234", "--check"], {}) == 2
    assert "only with --demo" in capsys.readouterr().err


@pytest.mark.parametrize("flavor, server, key", [
    ("ollama", "Ollama emulator", "qwen/qwen3-4b:latest"),   # Ollama's name for it
    ("llamacpp", "llama.cpp router emulator", "qwen/qwen3-4b"),
    ("openai", "OpenAI-compatible server", "qwen/qwen3-4b")])
async def test_the_demo_runs_another_flavor_s_emulator(tmp_path, flavor, server, key):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["HOME"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--demo", "--flavor", flavor, "--port", "0",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Stop with Ctrl-C" not in banner:
            line = await proc.stdout.readline()
            assert line, f"the demo ended early:\n{banner}"
            banner += line.decode()
        assert f"({server}" in banner
        proxy_url = banner.split("Proxy ready on ")[1].split()[0]
        for command in examples(banner):
            code, out = await sh(command, shell_env())
            assert code == 0, out
        async with aiohttp.ClientSession() as http, \
                http.get(f"{proxy_url}/proxy/stats") as r:
            stats = await r.json()
        assert stats["models"][key]["requests"] == 2
    finally:
        proc.terminate()
        await proc.wait()


def test_the_demo_flavor_needs_demo(capsys):
    from proxy.cli import main
    assert main(["--flavor", "ollama", "--check"], {}) == 2
    assert "--flavor: only with --demo" in capsys.readouterr().err
    assert main(["--demo", "--check"], {"PROXY_DEMO_FLAVOR": "vllm"}) == 2
    assert "PROXY_DEMO_FLAVOR: must be one of" in capsys.readouterr().err


async def test_the_demo_with_hosts_runs_a_fleet_of_unequal_emulators(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["HOME"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--demo", "--hosts", "3", "--port", "0",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Stop with Ctrl-C" not in banner:
            line = await proc.stdout.readline()
            assert line, f"the demo ended early:\n{banner}"
            banner += line.decode()
        hosts = banner.split("Hosts:\n")[1].split("\n\n")[0].splitlines()
        named = {line.split()[0]: line.split() for line in hosts}
        assert list(named) == ["host-1", "host-2", "host-3"]
        assert [(w[1], w[4]) for w in named.values()] == [("24", "×1.0"), ("16", "×1.5"),
                                                         ("8", "×2.0")]
        proxy_url = banner.split("Proxy ready on ")[1].split()[0]
        for command in examples(banner):
            code, out = await sh(command, shell_env())
            assert code == 0, out
        async with aiohttp.ClientSession() as http:
            for words in named.values():
                async with http.get(f"{words[-1]}/v1/models") as r:
                    assert r.status == 200
            async with http.get(f"{proxy_url}/proxy/stats") as r:
                stats = await r.json()
        assert {n: h["memory"]["total_gb"] for n, h in stats["hosts"].items()} == \
            {"host-1": 24.0, "host-2": 16.0, "host-3": 8.0}
        assert {n: h["url"] for n, h in stats["hosts"].items()} == \
            {n: w[-1] for n, w in named.items()}
        assert stats["models"]["qwen/qwen3-4b"]["requests"] == 2
    finally:
        proc.terminate()
        await proc.wait()


async def test_each_demo_host_loads_at_its_own_speed_with_its_own_memory():
    from proxy.demofleet import BASE_LOAD_TIME_SCALE, demo_hosts, start_demo_fleet
    hosts = demo_hosts(4)
    emulators = await start_demo_fleet(hosts)
    try:
        assert [(e.state.capacity_bytes, e.state.load_time_scale) for e in emulators] == [
            (24 * 10**9, BASE_LOAD_TIME_SCALE), (16 * 10**9, BASE_LOAD_TIME_SCALE * 1.5),
            (8 * 10**9, BASE_LOAD_TIME_SCALE * 2.0), (24 * 10**9, BASE_LOAD_TIME_SCALE)]
        assert len({e.url for e in emulators}) == 4
    finally:
        for e in emulators:
            await e.close()


@pytest.mark.parametrize("argv, env, message", [
    (["--hosts", "3", "--check"], {}, "--hosts: only with --demo"),
    (["--demo", "--hosts", "0", "--check"], {}, "--hosts: must be 1..8"),
    (["--demo", "--check"], {"PROXY_DEMO_HOSTS": "9"}, "PROXY_DEMO_HOSTS: must be 1..8"),
    (["--demo", "--hosts", "2", "--flavor", "ollama", "--check"], {}, "not with --flavor"),
    (["--demo", "--hosts", "2", "--demo-upstream-port", "1234", "--check"], {},
     "not with --hosts")])
def test_the_demo_hosts_flag_is_checked(capsys, argv, env, message):
    from proxy.cli import main
    assert main(argv, env) == 2
    assert message in capsys.readouterr().err


def test_the_demo_keeps_a_storage_path_the_file_gives(tmp_path, monkeypatch):
    """A second demo beside a running one needs a history of its own: the path the config file
    names is the one used, not the demo's default file (which the first demo holds)."""
    from proxy.configsource import resolve_config
    monkeypatch.setenv("HOME", str(tmp_path))
    own = tmp_path / "second-demo.sqlite3"
    (tmp_path / "demo.yaml").write_text(f"storage:\n  path: {own}\n")
    given = resolve_config(build_parser().parse_args(
        ["--demo", "--config", str(tmp_path / "demo.yaml")]), {})
    assert given.storage.path == str(own)
    default = resolve_config(build_parser().parse_args(["--demo"]), {})
    assert default.storage.path is not None and \
        default.storage.path.endswith("demo-history.sqlite3")
