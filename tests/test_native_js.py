"""The official @lmstudio/sdk (Node) through the proxy: LM Studio's own protocol, one session
(native.mjs), and one against client keys (native_auth.mjs).

tests/js holds the script and its pinned SDK; `.ci/run` installs it with `npm ci`.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.emulator import GB
from proxy.emulator import generation as gen

LLM, EMBED, BIG = "qwen/qwen3-4b", "text-embedding-nomic-embed-text-v1.5", "openai/gpt-oss-20b"
JS_DIR = Path(__file__).parent / "js"


async def session(url: str, script: str = "native.mjs", *args: str) -> Any:
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: the Node SDK tests need Node.js 20+")
    if not (JS_DIR / "node_modules" / "@lmstudio" / "sdk").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js` "
                    "(.ci/run does) before the suite")
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / script), url.replace("http://", "ws://"),
        *(args or (LLM, EMBED, BIG)), cwd=JS_DIR, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@pytest.fixture
async def run(make_emulator, make_proxy) -> Any:
    emulator = await make_emulator(capacity_bytes=10 * GB)
    proxy = await make_proxy(emulator.url, **{"memory.budget_gb": 10})
    return await session(proxy.url), emulator, proxy


async def test_lists_loads_with_progress_and_unloads(run):
    out, emulator, proxy = run
    assert out["downloaded"] == list(emulator.state.catalog)
    assert out["identifier"] == LLM and out["loaded"] == [LLM] and out["progress"][-1] == 1
    assert out["loadedAfterUnload"] == [] and LLM not in emulator.state.instances


async def test_a_streamed_respond_and_an_embedding(run):
    out, emulator, proxy = run
    assert out["fragments"] == 24 and out["joined"] == out["content"]
    assert out["stopReason"] == "eosFound"
    assert out["embedding"] == gen.embed(EMBED, "hello")


async def test_not_found_and_refused_are_the_sdks_errors(run):
    out, emulator, proxy = run
    assert "No loaded model satisfies" in out["notFound"]
    assert "model_too_large" in out["refused"] and emulator.state.load_calls[BIG] == 0


async def test_its_loads_and_predictions_go_through_the_engine(run):
    out, emulator, proxy = run
    usage = proxy.engine.usage(LLM)          # predicted by instance reference, not by name
    assert usage.requests == 1 and usage.completion_tokens == 24
    assert proxy.engine.usage(EMBED).requests == 1


async def test_keys_as_the_js_sdk_passes_them(make_emulator, make_proxy):
    emulator = await make_emulator()
    proxy = await make_proxy(emulator.url, **{"auth.keys": [
        {"name": "alice", "key": "alice-key", "models": [LLM]}]})
    out = await session(proxy.url, "native_auth.mjs", "alice-key", LLM, BIG)
    for refused in (out["noKey"], out["wrongKey"]):
        assert "Failed to authenticate" in refused["error"]
        assert "needs a client key" in refused["error"] and "clientPasskey" in refused["error"]
    assert out["load"] == {"ok": LLM}
    assert "may not use the model" in out["other"]["error"]
    assert emulator.state.load_calls[BIG] == 0
