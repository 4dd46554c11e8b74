"""metrics.inference_gateway: the vLLM series a Kubernetes inference gateway's endpoint picker
scrapes, read from a real proxy's /metrics over the emulator and parsed with prometheus_client's
own parser, as they move while a model loads, requests wait and requests run."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main
from proxy.emulator import CatalogModel

from .conftest import Proxy

GB = 10**9
A, B, C, BIG = "lab/a-10g", "lab/b-10g", "lab/c-10g", "lab/d-30g"
VLLM = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info")


def catalog(*models: tuple[str, int]) -> list[CatalogModel]:
    return [CatalogModel(key, size_bytes=size, memory_bytes=size, load_time_s=0.0)
            for key, size in models]


# A 40 GB budget that a model may fill to the last byte: the ceiling is 40 GB, and footprints
# are the file sizes, so every expected number below is plain arithmetic.
MEMORY = {"memory.budget_gb": 40, "memory.max_memory_usage_percent": 100,
          "memory.footprint_factor": 1.0, "metrics.inference_gateway": True}


async def scrape(http: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    """Family name → its one sample's (labels, value)."""
    async with http.get(f"{proxy.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("vllm:"):
            (sample,) = family.samples
            assert family.type == "gauge" and sample.name == family.name
            out[family.name] = (sample.labels, sample.value)
    return out


async def until(http: aiohttp.ClientSession, proxy: Proxy,
                ok: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0) -> dict[str, Any]:
    """Scrape until ok(series) holds, or fail with the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = await scrape(http, proxy)
        if ok(series):
            return series
        assert time.monotonic() < deadline, series
        await asyncio.sleep(0.02)


def value(series: dict[str, Any], name: str) -> float:
    return series[name][1]


def lora(series: dict[str, Any]) -> dict[str, str]:
    return series["vllm:lora_requests_info"][0]


async def stream(http: aiohttp.ClientSession, proxy: Proxy, model: str) -> int:
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        await r.read()
        return r.status


async def test_the_series_follow_a_load_waiting_and_running_requests(make_emulator, make_proxy,
                                                                     http):
    emulator = await make_emulator(catalog=catalog((A, 10 * GB), (B, 10 * GB), (C, 10 * GB)))
    proxy = await make_proxy(emulator.url, **MEMORY)
    before_s = time.time()
    idle = await scrape(http, proxy)
    assert set(idle) == set(VLLM)
    assert value(idle, "vllm:num_requests_waiting") == 0
    assert value(idle, "vllm:num_requests_running") == 0
    assert value(idle, "vllm:kv_cache_usage_perc") == 0
    assert lora(idle) == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                          "max_lora": "4"}                   # 40 GB of room, 10 GB models
    # vLLM's labels; the LoRA gauge's value is the time it was set, in Unix seconds.
    assert idle["vllm:num_requests_running"][0] == {
        "model_name": emulator.url.removeprefix("http://"), "engine": "0"}
    assert before_s <= value(idle, "vllm:lora_requests_info") <= time.time()

    load_gate = emulator.state.faults.load_gate[A] = asyncio.Event()
    emulator.state.faults.stream_gate = stream_gate = asyncio.Event()
    requests = [asyncio.create_task(stream(http, proxy, A)) for _ in range(2)]
    try:
        loading = await until(http, proxy, lambda s: value(s, "vllm:num_requests_waiting") == 2)
        assert value(loading, "vllm:num_requests_running") == 0
        assert lora(loading) == {"running_lora_adapters": "", "waiting_lora_adapters": A,
                                 "max_lora": "4"}
        assert value(loading, "vllm:kv_cache_usage_perc") == 0.25   # the load's memory

        load_gate.set()
        running = await until(http, proxy,
                              lambda s: value(s, "vllm:num_requests_running") == 2)
        assert value(running, "vllm:num_requests_waiting") == 0
        assert lora(running) == {"running_lora_adapters": A, "waiting_lora_adapters": "",
                                 "max_lora": "4"}
        assert value(running, "vllm:kv_cache_usage_perc") == 0.25
    finally:
        load_gate.set()
        stream_gate.set()
        statuses = await asyncio.gather(*requests, return_exceptions=True)
    assert statuses == [200, 200]
    done = await until(http, proxy, lambda s: value(s, "vllm:num_requests_running") == 0)
    assert lora(done)["running_lora_adapters"] == A


async def test_max_lora_counts_what_fits_beside_the_resident_models(make_emulator, make_proxy,
                                                                    http):
    emulator = await make_emulator(catalog=catalog((A, 10 * GB), (B, 10 * GB), (BIG, 30 * GB)))
    proxy = await make_proxy(emulator.url, **MEMORY)
    assert lora(await scrape(http, proxy))["max_lora"] == "4"   # median footprint 10 GB
    assert await stream(http, proxy, BIG) == 200
    full = await scrape(http, proxy)
    # 30 GB taken: the big model, and one more 10 GB model in the 10 GB left.
    assert lora(full) == {"running_lora_adapters": BIG, "waiting_lora_adapters": "",
                          "max_lora": "2"}
    assert value(full, "vllm:kv_cache_usage_perc") == 0.75
    assert await stream(http, proxy, A) == 200
    both = await scrape(http, proxy)
    assert lora(both)["running_lora_adapters"] == f"{A},{BIG}"   # comma-joined, no spaces
    assert lora(both)["max_lora"] == "2" and value(both, "vllm:kv_cache_usage_perc") == 1.0


async def test_the_series_are_absent_unless_the_key_is_on(emulator, make_proxy, http):
    proxy = await make_proxy(emulator.url)
    assert await stream(http, proxy, "qwen/qwen3-4b") == 200
    async with http.get(f"{proxy.url}/metrics") as r:
        names = {f.name for f in text_string_to_metric_families(await r.text())}
    assert "proxy_model_loaded" in names
    assert not any(n.startswith("vllm:") for n in names)


def test_check_validates_the_key(tmp_path, capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text("metrics: {inference_gateway: true}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    path.write_text("metrics: {inference_gateway: 'yes'}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 2
    assert "metrics.inference_gateway: must be true or false (got str 'yes')" in \
        capsys.readouterr().err
