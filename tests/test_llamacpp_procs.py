"""Finding a llama.cpp model's child process by its command line, on a real process: a Python
interpreter linked under the name `llama-server`, given the arguments a child gets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from proxy.upstream.llamacpp_procs import ChildSpec, child_spec, resident_bytes

MODEL = "/models/tiny-chat-small.gguf"


@pytest.fixture
def child(tmp_path: Path) -> Iterator[subprocess.Popen]:
    exe = tmp_path / "llama-server"
    os.symlink(sys.executable, exe)
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    with subprocess.Popen([str(exe), "-c", code, "--host", "127.0.0.1", "--port", "43210",
                           "-m", MODEL], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
        proc.kill()


def test_the_spec_comes_from_the_args_the_router_reports():
    assert child_spec(["llama-server", "--port", "43210", "-m", MODEL, "-c", "512"]) == \
        ChildSpec(MODEL, "43210")
    assert child_spec(["llama-server", f"--model={MODEL}"]) == ChildSpec(MODEL, None)
    assert child_spec(["llama-server", "--models-dir", "/models"]) is None   # the router


def test_a_models_memory_is_its_child_processes_rss(child):
    rss = psutil.Process(child.pid).memory_info().rss
    found = resident_bytes({"tiny": ChildSpec(MODEL, "43210")})
    assert 0.5 * rss <= found["tiny"] <= 2 * rss


def test_another_port_or_file_is_another_process(child):
    assert resident_bytes({"a": ChildSpec(MODEL, "43211"),
                           "b": ChildSpec("/models/other.gguf", None)}) == {}
