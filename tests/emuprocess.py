"""The LM Studio emulator in a process of its own (`python -m proxy.emulator`), so that a test
can kill it (SIGKILL: a host that dies) or freeze it (SIGSTOP: a host that still accepts
connections and never answers), and start it again on its port."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def answering(url: str, timeout_s: float = 30.0) -> None:
    """Wait until a GET of url answers 200 (a server process started up)."""
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    async with http.get(url) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)


class EmulatorProcess:
    def __init__(self, catalog: Path, port: int, *, tokens_per_s: float = 20) -> None:
        self.catalog, self.port, self.tokens_per_s = catalog, port, tokens_per_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.emulator", "--port", str(self.port), "--catalog",
             str(self.catalog), "--tokens-per-s", str(self.tokens_per_s)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await answering(f"{self.url}/v1/models", 20.0)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def freeze(self) -> None:
        """It keeps its port: the kernel still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@contextlib.asynccontextmanager
async def emulator_process(tmp_path: Path, catalog_yaml: str) -> AsyncIterator[EmulatorProcess]:
    """An emulator process on a free port serving catalog_yaml, killed at the end."""
    path = tmp_path / "catalog.yaml"
    path.write_text(catalog_yaml)
    emu = EmulatorProcess(path, free_port())
    await emu.start()
    try:
        yield emu
    finally:
        emu.stop()
