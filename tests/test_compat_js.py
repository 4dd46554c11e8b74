"""The official openai Node SDK through the proxy: the JavaScript clients LM Studio breaks.

tests/js holds the client script and its pinned SDK; `.ci/run` installs it with `npm ci`.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from array import array
from pathlib import Path
from typing import Any

import pytest

EMBED = "text-embedding-nomic-embed-text-v1.5"
MODEL = "qwen/qwen3-4b"
JS_DIR = Path(__file__).parent / "js"


async def node(base_url: str, command: str, model: str) -> Any:
    """Run tests/js/client.mjs while the proxy keeps serving on this loop."""
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: the Node SDK tests need Node.js 20+")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js` "
                    "(.ci/run does) before the suite")
    proc = await asyncio.create_subprocess_exec(
        "node", str(JS_DIR / "client.mjs"), f"{base_url}/v1", command, model, cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def direct_floats(http, emulator) -> list[list[float]]:
    async with http.post(f"{emulator.url}/v1/embeddings", json={
            "model": EMBED, "input": ["a", "b c"], "encoding_format": "float"}) as r:
        return [d["embedding"] for d in (await r.json())["data"]]


async def test_node_sdk_defaults_get_the_direct_floats(proxy, emulator, http):
    got = await node(proxy.url, "embed", EMBED)
    direct = await direct_floats(http, emulator)
    assert got["vectors"] == [array("f", v).tolist() for v in direct]


async def test_without_the_repair_the_node_sdk_sees_garbage(make_proxy, emulator, http):
    # LM Studio's bug, reproduced by the emulator: floats decoded as base64.
    proxy = await make_proxy(emulator.url, **{"compat.embeddings_base64": False})
    got = await node(proxy.url, "embed", EMBED)
    assert set(got["vectors"][0]) == {0} and len(got["vectors"][0]) != 64


async def test_node_sdk_float_request_gets_the_floats_as_sent(proxy, emulator, http):
    got = await node(proxy.url, "embed-float", EMBED)
    assert got["vectors"] == await direct_floats(http, emulator)


async def test_node_sdk_models_retrieve(proxy):
    got = await node(proxy.url, "retrieve", MODEL)
    assert got["model"] == {"id": MODEL, "object": "model", "created": 0, "owned_by": "qwen"}


async def test_node_sdk_models_retrieve_unknown_is_not_found(proxy):
    got = await node(proxy.url, "retrieve", "qwen/nope")
    assert got["not_found"]["status"] == 404
    assert got["not_found"]["code"] == "model_not_found"
