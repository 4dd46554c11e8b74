"""A user's script over the documented library API passes `mypy --strict` against the package
as it installs: built by setuptools from pyproject.toml (so py.typed must be in its package
data) and found in site-packages (so mypy reads it as an installed, PEP 561 package). The
read-through attributes carry the core's own types: a wrong argument to one is an error."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)     # mypy's first run over the package: ~10 s
ROOT = Path(__file__).resolve().parent.parent

USER = '''
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy import (CognitiveModelIntegrator, ManagerClosed, MemoryPressure, ModelHealthMonitor,
                   ModelMemoryManager, ModelMemoryMiddleware, ModelMetrics, ModelStatus,
                   WrongEventLoop, create_model_memory_manager)
from proxy.configload import load_config
from proxy.errors import ProxyError


class Kernel:
    async def process(self, prompt: str) -> str:
        return prompt


async def main() -> None:
    async with ModelMemoryManager(max_memory_usage_percent=80, min_free_memory_gb=1,
                                  upstream="http://127.0.0.1:1234") as manager:
        ok: bool = await manager.load_model("qwen/qwen3-4b", priority=8)
        avail: dict[str, bool] = await manager.ensure_models_available(["qwen/qwen3-4b"])
        manager.record_model_usage("qwen/qwen3-4b", latency=0.8, success=True, tokens_used=120)
        stats: dict[str, Any] = manager.get_memory_stats()
        recs: dict[str, Any] = manager.get_model_recommendations({"task_type": "chat"})
        status: dict[str, ModelStatus] = manager.model_status
        metrics: dict[str, ModelMetrics] = manager.model_metrics
        pressure: MemoryPressure = manager.memory_pressure
        loaded: list[str] = manager.get_loaded_models()
        manager.set_pinned("qwen/qwen3-4b", True)
        pinned: bool = manager.is_pinned("qwen/qwen3-4b")
        completion: int = manager.usage("qwen/qwen3-4b").completion_tokens
        manager.on_model_loaded = lambda model: print("loaded", model)
        await manager.start_monitoring()
        await manager.stop_monitoring()
        cleared: list[str] = await manager.clear_all_models()
        optimized: dict[str, Any] = await manager.optimize_memory_usage()
        unloaded: bool = await manager.unload_model("qwen/qwen3-4b")
        lease = await manager.acquire("qwen/qwen3-4b")
        lease.release()
        health = ModelHealthMonitor(manager)
        report: dict[str, Any] = health.get_health_report()
        print(ok, avail, stats, recs, status, metrics, pressure, loaded, pinned, completion,
              cleared, optimized, unloaded, report)
    other = ModelMemoryManager(config=load_config({"storage": {"enabled": False}}))
    await other.cleanup()
    m2 = await create_model_memory_manager(min_free_memory_gb=1)
    middleware = ModelMemoryMiddleware(m2)
    app = web.Application(middlewares=[middleware.aiohttp])
    kernel = CognitiveModelIntegrator(m2).integrate_with_kernel(Kernel(), model="qwen/qwen3-4b")
    print(app, kernel, await middleware({"model": "qwen/qwen3-4b"}, step))
    try:
        await m2.cleanup()
    except (ManagerClosed, WrongEventLoop, ProxyError) as exc:
        print(exc)


async def step(context: Any) -> dict[str, Any]:
    return {"usage": {"completion_tokens": 3}}


asyncio.run(main())
'''

WRONG = '''
from proxy import ModelMemoryManager


async def main(manager: ModelMemoryManager) -> None:
    manager.usage(5)
    await manager.load("qwen/qwen3-4b", priority="high")
    manager.memory_pressure.no_such_attribute
'''


def installed_copy(tmp_path: Path) -> Path:
    """The package as setuptools builds it from pyproject.toml (the files a wheel gets)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "proxy", src / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = tmp_path / "build"
    subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(f"""
        from setuptools.dist import Distribution
        from setuptools.config.pyprojecttoml import apply_configuration
        dist = apply_configuration(Distribution(), "pyproject.toml")
        dist.script_name = "setup.py"
        build_py = dist.get_command_obj("build_py")
        build_py.build_lib = {str(build)!r}
        build_py.ensure_finalized()
        build_py.run()""")], cwd=src, check=True, capture_output=True)
    return build


def python_with(tmp_path: Path, *paths: str) -> Path:
    """An interpreter whose site-packages holds `paths` (a .pth file, as an install makes)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "here.pth").write_text("\n".join(paths) + "\n")
    return venv / "bin" / "python"


def mypy(tmp_path: Path, python: Path, script: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--cache-dir", str(tmp_path / "cache"), "--python-executable",
                           str(python), path.name], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "MYPYPATH": ""})


def test_the_documented_api_passes_mypy_strict_as_installed(tmp_path):
    build = installed_copy(tmp_path)
    assert (build / "proxy" / "py.typed").exists()
    python = python_with(tmp_path, str(build), *site.getsitepackages())
    done = mypy(tmp_path, python, USER)
    assert (done.returncode, done.stdout) == (0, "")
    wrong = mypy(tmp_path, python, WRONG)
    errors = [line.split(": error: ")[1] for line in wrong.stdout.splitlines()]
    assert len(errors) == 3, wrong.stdout
    assert '"usage"' in errors[0] and '"int"; expected "str"' in errors[0]
    assert '"load"' in errors[1] and '"str"; expected "int | None"' in errors[1]
    assert '"MemoryPressure" has no attribute "no_such_attribute"' in errors[2]
