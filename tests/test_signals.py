"""A real `python -m proxy` process: SIGTERM and SIGHUP with streams in flight, port in use."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.emulator import EmulatorOptions

from .conftest import FIXED_CREATED_S

ROOT = Path(__file__).parent.parent
MODEL = "qwen/qwen3-4b"


class ProxyProcess:
    """The proxy as an operator runs it; its log is read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, config_path: Path) -> "ProxyProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--config", str(config_path), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def ready(self) -> None:
        """Port 0 in the config: the proxy's log says which port it got (no race for one)."""
        line = await self.wait_for_line("proxy listening on ")
        self.url = line.split("proxy listening on ")[1].split(",")[0]

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    async def wait_for_line(self, text: str) -> str:
        async with self._changed:
            await self._changed.wait_for(lambda: any(text in ln for ln in self.lines)
                                         or "<eof>" in self.lines)
        found = [ln for ln in self.lines if text in ln]
        assert found, f"{text!r} never logged:\n" + "\n".join(self.lines)
        return found[0]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.kill()
        rc = await self.proc.wait()
        await self._reader
        return rc


def write_config(path: Path, upstream: str, port: int, **server: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "server": {"port": port, **server}, "upstream": {"url": upstream},
        "memory": {"sampler": "budget", "budget_gb": 64, "min_free_memory_gb": 0},
        "eviction": {"hold": 0}, "storage": {"enabled": False},
        "models": {MODEL: {"priority": 5}}}))
    return path


@pytest.fixture
async def slow_emulator(make_emulator):
    # 25 tokens per second: a 100-token stream takes four seconds.
    return await make_emulator(options=EmulatorOptions(tokens_per_s=25.0,
                                                       created_s=FIXED_CREATED_S))


@pytest.fixture
async def running(tmp_path, slow_emulator):
    started: list[ProxyProcess] = []

    async def run(**server: Any) -> ProxyProcess:
        config = write_config(tmp_path / "proxy.yaml", slow_emulator.url, 0, **server)
        p = await ProxyProcess.start(config)
        started.append(p)
        await p.ready()
        return p

    yield run
    for p in started:
        await p.stop()


async def open_stream(http: aiohttp.ClientSession, url: str, max_tokens: int
                      ) -> aiohttp.ClientResponse:
    resp = await http.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "stream": True, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "go"}]})
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")     # the stream is flowing
    return resp


async def test_sigterm_ends_long_streams_at_the_deadline_and_exits_0(running, slow_emulator,
                                                                     http):
    proxy = await running(shutdown_timeout_s=1)
    streams = [await open_stream(http, proxy.url, 1000) for _ in range(3)]
    host, port = proxy.url.removeprefix("http://").split(":")
    _, silent = await asyncio.open_connection(host, int(port))      # says nothing at all
    _, half = await asyncio.open_connection(host, int(port))
    half.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # headers unfinished
    await half.drain()
    sent_at = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    for resp in streams:
        rest = await resp.content.read()
        last = rest.strip().split(b"\n\n")[-1]
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "shutting_down"
        resp.release()
    assert await proxy.proc.wait() == 0
    assert time.monotonic() - sent_at < 1 + 2.5
    state = slow_emulator.state
    await state.wait_for(lambda: state.cancelled_streams == 3)   # nothing left generating
    assert not any("Traceback" in ln for ln in proxy.lines)
    silent.close()
    half.close()


async def test_sigterm_lets_short_streams_finish(running, http):
    proxy = await running(shutdown_timeout_s=20)
    streams = [await open_stream(http, proxy.url, 20) for _ in range(2)]
    sent_at = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    for resp in streams:
        assert (await resp.content.read()).rstrip().endswith(b"data: [DONE]")
        resp.release()
    assert await proxy.proc.wait() == 0
    assert time.monotonic() - sent_at < 10      # drained, not the whole timeout


async def test_sighup_reloads_without_cutting_streams(running, tmp_path, http):
    proxy = await running()
    streams = [await open_stream(http, proxy.url, 30) for _ in range(3)]
    config = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
    config["models"][MODEL]["priority"] = 9
    config["server"]["port"] = 18080
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(config))
    proxy.proc.send_signal(signal.SIGHUP)
    line = await proxy.wait_for_line("configuration reloaded")
    assert "server.port" in line
    for resp in streams:
        assert (await resp.content.read()).rstrip().endswith(b"data: [DONE]")
        resp.release()
    async with http.get(f"{proxy.url}/proxy/models") as r:
        (row,) = [m for m in (await r.json())["data"] if m["model"] == MODEL]
    assert row["priority"] == 9 and row["state"] == "loaded"

    (tmp_path / "proxy.yaml").write_text("models:\n  x: {priority: 99}\nbogus: 1\n")
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.wait_for_line("reload rejected")
    await proxy.wait_for_line("bogus: unknown key")
    await proxy.wait_for_line("models.x.priority: must be 1..10")
    async with http.get(f"{proxy.url}/proxy/models") as r:
        assert r.status == 200      # still serving, on the old configuration
    assert proxy.proc.returncode is None


async def test_sighup_applies_a_new_alias_and_compat_switch_and_names_route_changes(
        running, tmp_path, http):
    proxy = await running()
    config = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
    config["models"][MODEL]["aliases"] = ["fast"]
    config["compat"] = {"embeddings_base64": False, "models_retrieve": False}
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(config))
    proxy.proc.send_signal(signal.SIGHUP)
    line = await proxy.wait_for_line("configuration reloaded")
    assert line.endswith("need a restart to take effect: compat.models_retrieve (True → False)")
    async with http.get(f"{proxy.url}/v1/models/fast") as r:
        assert r.status == 200 and (await r.json())["id"] == MODEL
    async with http.post(f"{proxy.url}/v1/embeddings", json={
            "model": "text-embedding-nomic-embed-text-v1.5", "input": "x",
            "encoding_format": "base64"}) as r:
        assert isinstance((await r.json())["data"][0]["embedding"], list)   # not re-encoded


async def test_a_port_in_use_is_one_line_and_a_nonzero_exit(tmp_path, slow_emulator):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = await ProxyProcess.start(write_config(tmp_path / "p.yaml", slow_emulator.url, port))
        rc = await p.stop() if await p.proc.wait() is not None else None
    assert rc == 1
    text = "\n".join(p.lines)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in text
    assert "Traceback" not in text and "Unclosed" not in text
