"""A real `llama-server` in router mode on a loopback port, over the tiny models.

The router is asked not to manage memory by itself (`--models-max 0 --no-models-autoload`):
that is the setting the proxy recommends, so the proxy is the only one that loads and evicts.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil

from tests.llama.models import TinyModels

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A test run that is killed must not leave routers (and their model processes) behind.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_preset(path: Path, models: TinyModels) -> Path:
    """Defaults for every model, and the embedding model marked as such."""
    path.write_text(f"[*]\nc = 512\nthreads = 1\n\n"
                    f"[{models.embedding}]\nmodel = {models.path(models.embedding)}\n"
                    f"embeddings = true\n")
    return path


@dataclass
class LlamaRouter:
    binary: Path
    models: TinyModels
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "llama-server.log"

    def command(self) -> list[str]:
        return [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port),
                "--models-dir", str(self.models.directory),
                "--models-preset", str(write_preset(self.workdir / "models.ini", self.models)),
                "--models-max", "0", "--no-models-autoload", *self.extra_args]

    def start(self) -> "LlamaRouter":
        """Starts the router and returns once `/health` answers ok."""
        self.port = self.port or free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        deadline_s = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline_s:
            if self._healthy():
                return self
            try:  # doubles as the poll interval and notices an early exit
                code = self.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"llama-server exited with {code} at start:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"llama-server not healthy after {STARTUP_TIMEOUT_S} s:\n"
                           f"{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200 and json.load(r).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def children(self) -> list[psutil.Process]:
        """The model processes (one `llama-server` per loaded model)."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (the router stops its children), SIGKILL for anything still alive after."""
        if self.process is None:
            return
        children = self.children()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
        for p in alive:
            p.kill()
        self.process = None

    def restart(self) -> "LlamaRouter":
        """Stops and starts again on the same port: every model comes back unloaded."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def model_entry(session: aiohttp.ClientSession, url: str, model_id: str) -> dict[str, Any]:
    async with session.get(url + "/models") as r:
        r.raise_for_status()
        body = await r.json()
    for entry in body["data"]:
        if entry["id"] == model_id:
            return entry
    raise KeyError(model_id)


async def wait_for_model(session: aiohttp.ClientSession, url: str, model_id: str,
                         done: Callable[[dict[str, Any]], bool],
                         timeout_s: float = 20.0) -> dict[str, Any]:
    """Follows `GET /models/sse` until `done(entry)` holds for the model's `GET /models` entry.

    The stream is opened before the first look, so no change between the two is missed.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(url + "/models/sse", timeout=timeout) as events:
        entry = await model_entry(session, url, model_id)
        if done(entry):
            return entry
        async for line in events.content:
            if not line.startswith(b"data:"):
                continue
            if json.loads(line[5:]).get("model") == model_id:
                entry = await model_entry(session, url, model_id)
                if done(entry):
                    return entry
    raise AssertionError(f"{model_id}: the event stream ended; last seen {entry['status']}")


def status_is(value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda entry: entry["status"]["value"] == value


def require_llama_server() -> bool:
    return os.environ.get("REQUIRE_LLAMA_SERVER") == "1"
