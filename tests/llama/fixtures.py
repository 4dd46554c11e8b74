"""Fixtures for tests against a real llama.cpp router (imported by tests/conftest.py).

Without a built binary the tests that use them are skipped with one line saying how to build
it; with `REQUIRE_LLAMA_SERVER=1` (as in CI) its absence is a failure instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.llama.build import binary_path
from tests.llama.models import TinyModels, write_models
from tests.llama.router import LlamaRouter, require_llama_server


def llama_server_or_skip(*, module_level: bool = False) -> Path:
    """The binary's path; skips (or, with REQUIRE_LLAMA_SERVER=1, fails) when it is missing.

    Called at a test module's top with `module_level=True`, the whole module is skipped with
    a single line instead of one per test."""
    path = binary_path()
    if not path.exists():
        why = f"no llama-server at {path}; build it with `python -m tests.llama.build`"
        if require_llama_server():
            pytest.fail(f"REQUIRE_LLAMA_SERVER=1 but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=module_level)
    return path


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    return llama_server_or_skip()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return write_models(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def make_llama_router(llama_server_binary: Path, tiny_models: TinyModels,
                      tmp_path: Path) -> Iterator[Callable[..., LlamaRouter]]:
    """Starts routers over the tiny models; all are stopped, children included, at teardown."""
    started: list[LlamaRouter] = []

    def make(*extra_args: str, **kwargs: Any) -> LlamaRouter:
        workdir = tmp_path / f"router{len(started)}"
        workdir.mkdir()
        router = LlamaRouter(llama_server_binary, tiny_models, workdir, list(extra_args),
                             **kwargs)
        started.append(router)
        return router.start()

    yield make
    for router in started:
        router.stop()


@pytest.fixture
def llama_router(make_llama_router: Callable[..., LlamaRouter]) -> LlamaRouter:
    return make_llama_router()
