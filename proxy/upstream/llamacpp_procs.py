"""The memory of llama.cpp's model processes, seen from the router's host.

A router runs one child `llama-server` per loaded model, on a port the kernel picks; `GET
/models` lists each loaded model's child command line (`status.args`) but no memory. On the
same host psutil sees those children: a model's resident bytes are its child's RSS, the child
found by the model file and the port in its command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import psutil


@dataclass(frozen=True)
class ChildSpec:
    """What identifies a model's child process: its model file and, when known, its port."""
    model_path: str
    port: str | None = None


def child_spec(args: Sequence[str]) -> ChildSpec | None:
    """From a child's command line as the router reports it; None without a model file."""
    path = _value_after(args, ("-m", "--model"))
    return None if path is None else ChildSpec(path, _value_after(args, ("--port",)))


def resident_bytes(specs: dict[str, ChildSpec]) -> dict[str, int]:
    """key → RSS of the process matching its spec, for those found (blocking: psutil reads
    /proc; call it in a thread)."""
    found: dict[str, int] = {}
    if not specs:
        return found
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = proc.info.get("cmdline") or []
        mem = proc.info.get("memory_info")
        if len(cmdline) < 2 or mem is None or "llama-server" not in cmdline[0]:
            continue
        for key, spec in specs.items():
            if key not in found and _matches(cmdline, spec):
                found[key] = int(mem.rss)
    return found


def _matches(cmdline: Sequence[str], spec: ChildSpec) -> bool:
    if _value_after(cmdline, ("-m", "--model")) != spec.model_path:
        return False
    return spec.port is None or _value_after(cmdline, ("--port",)) == spec.port


def _value_after(args: Sequence[str], flags: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            return str(args[i + 1])
        for flag in flags:
            if flag.startswith("--") and arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
    return None
