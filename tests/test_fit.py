"""Per-model load options and fit by context, end to end through the proxy and the emulator:
options reach LM Studio's load call, a model that does not fit at its context is loaded with a
smaller one instead of evicting, never below its floor, and the context is shown and enforced."""
from __future__ import annotations

import random
import string
from typing import Any

import pytest

from proxy.configload import load_config
from proxy.emulator import GB, CatalogModel
from proxy.engine.lifecycle import ModelStatus
from proxy.errors import ConfigError

from .conftest import proxy_config

BIG, OTHER, FIT = "big/a", "big/b", "fit/b"
KV_PER_TOKEN = 32 * 8 * 128 * 2 * 2          # the emulator's default shape: 128 KiB per token
AT_32K_GB = (4.4 * GB + KV_PER_TOKEN * (32768 - 4096)) / GB   # FIT's memory at 32768: 8.16


def catalog(*fillers: tuple[str, float]) -> list[CatalogModel]:
    return [CatalogModel(FIT, size_bytes=4 * GB, memory_bytes=int(4.4 * GB),
                         max_context_length=131072),
            *(CatalogModel(k, size_bytes=int(gb * GB), memory_bytes=int(gb * GB))
              for k, gb in fillers)]


def config(url: str, fillers: dict[str, float], *, budget_gb: float = 16,
           fit: dict | None = None) -> Any:
    models: dict[str, Any] = {k: {"footprint_gb": gb} for k, gb in fillers.items()}
    models[FIT] = {"footprint_gb": round(AT_32K_GB, 2), "load": {"context_length": 32768}}
    if fit is not None:
        models[FIT]["fit"] = fit
    return proxy_config(url, models=models, **{"memory.budget_gb": budget_gb,
                                               "memory.max_memory_usage_percent": 100})


async def chat(http: Any, proxy: Any, model: str, text: str = "hi") -> Any:
    async with http.post(f"{proxy.url}/v1/chat/completions", json={
            "model": model, "max_tokens": 2,
            "messages": [{"role": "user", "content": text}]}) as r:
        return r.status, dict(r.headers), await r.json()


async def row(http: Any, proxy: Any, model: str) -> dict:
    async with http.get(f"{proxy.url}/proxy/models") as r:
        return next(m for m in (await r.json())["data"] if m["model"] == model)


def test_the_emulator_holds_a_kv_cache_that_grows_with_the_context():
    (m,) = catalog()
    assert m.memory_at(4096) == int(4.4 * GB)
    assert m.memory_at(32768) - m.memory_at(16384) == KV_PER_TOKEN * 16384
    assert m.memory_at(1) >= m.size_bytes     # the weights stay


async def test_load_options_reach_the_load_call_and_the_context_is_shown(
        make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=catalog())
    proxy = await make_proxy(emu.url, models={FIT: {"load": {
        "context_length": 8192, "flash_attention": True, "eval_batch_size": 256,
        "offload_kv_cache_to_gpu": False, "num_experts": 2}}})
    status, headers, _ = await chat(http, proxy, FIT)
    assert status == 200
    (inst,) = emu.state.instances_of(FIT)
    assert inst.context_length == 8192
    assert inst.load_config == {"flash_attention": True, "eval_batch_size": 256,
                                "offload_kv_cache_to_gpu": False, "num_experts": 2}
    assert headers["X-Proxy-Context-Length"] == "8192"
    assert (await row(http, proxy, FIT))["context_length"] == 8192


@pytest.mark.parametrize("fit", [None, {"min_context_length": 8192}], ids=["no-fit", "fit"])
async def test_a_model_that_does_not_fit_loads_smaller_instead_of_evicting(
        make_emulator, make_proxy, http, fit):
    emu = await make_emulator(catalog=catalog((BIG, 9)), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, {BIG: 9}, fit=fit))
    assert (await chat(http, proxy, BIG))[0] == 200
    status, headers, _ = await chat(http, proxy, FIT)     # 8.2 GB wanted, 7 GB free
    assert status == 200
    (inst,) = emu.state.instances_of(FIT)
    if fit is None:                                       # today's way: the other one goes
        assert emu.state.unload_calls[BIG] == 1 and inst.context_length == 32768
        return
    assert emu.state.unload_calls[BIG] == 0 and emu.state.instances_of(BIG)
    # 8.16 GB − 96 kB (its estimate per token) × tokens given up ≤ 7 GB: 20684, in steps of 256
    assert inst.context_length == 20480
    assert headers["X-Proxy-Context-Length"] == "20480"
    r = await row(http, proxy, FIT)
    assert r["context_length"] == 20480 and r["footprint_source"] == "fitted"
    assert emu.state.used_bytes() <= 16 * GB


async def test_the_context_never_goes_below_the_floor(make_emulator, make_proxy, http):
    """20684 fits, its step 20480 would be below a floor of 20600: the floor wins."""
    emu = await make_emulator(catalog=catalog((BIG, 9)), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, {BIG: 9},
                                                    fit={"min_context_length": 20600}))
    await chat(http, proxy, BIG)
    assert (await chat(http, proxy, FIT))[0] == 200
    (inst,) = emu.state.instances_of(FIT)
    assert inst.context_length == 20684 and emu.state.unload_calls[BIG] == 0


@pytest.mark.parametrize("fit,evicted", [(None, 2), ({"min_context_length": 8192}, 1)],
                         ids=["no-fit", "fit"])
async def test_when_even_the_floor_needs_room_only_that_room_is_made(
        make_emulator, make_proxy, http, fit, evicted):
    fillers = {f"small/{i}": 3.0 for i in range(4)}      # 12 GB in four, 4 GB free
    emu = await make_emulator(catalog=catalog(*fillers.items()), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, fillers, fit=fit))
    for key in fillers:
        assert (await chat(http, proxy, key))[0] == 200
    assert (await chat(http, proxy, FIT))[0] == 200
    assert sum(emu.state.unload_calls.values()) == evicted
    (inst,) = emu.state.instances_of(FIT)
    assert inst.context_length == (32768 if fit is None else 20480)


async def test_too_large_even_at_the_floor_is_refused_naming_both_sizes(
        make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=catalog(), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, {}, budget_gb=6,
                                                    fit={"min_context_length": 16384}))
    status, _, body = await chat(http, proxy, FIT)
    assert status == 503 and body["error"]["code"] == "model_too_large"
    message = body["error"]["message"]
    assert "6.6 GB at its smallest context 16384" in message      # 8.16 − 96 kB × 16384
    assert "8.2 GB at its configured context 32768" in message
    assert emu.state.load_calls[FIT] == 0


async def test_a_prompt_certain_to_exceed_the_context_is_refused_before_forwarding(
        make_emulator, make_proxy, http):
    emu = await make_emulator(catalog=catalog())
    proxy = await make_proxy(emu.url, models={FIT: {"load": {"context_length": 2048}}})
    assert (await chat(http, proxy, FIT, "hello world " * 1000))[0] == 200   # ≥ 1500 tokens
    status, _, body = await chat(http, proxy, FIT, "hello world " * 1400)    # ≥ 2100 tokens
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and "2048" in body["error"]["message"]
    assert emu.state.inference_calls[FIT] == 1


async def test_a_cold_model_is_not_loaded_for_a_prompt_certain_to_exceed_its_context(
        make_emulator, make_proxy, http):
    """Checked against the context its load would ask for, before the load; the refusal reads
    as the one the loaded model gets."""
    emu = await make_emulator(catalog=catalog())
    proxy = await make_proxy(emu.url, models={FIT: {"load": {"context_length": 2048}}})
    long_text = "hello world " * 1400                                  # ≥ 2100 tokens
    status, _, cold = await chat(http, proxy, FIT, long_text)
    assert status == 400 and cold["error"]["code"] == "context_length_exceeded"
    assert emu.state.load_calls[FIT] == 0 and emu.state.inference_calls[FIT] == 0
    assert (await chat(http, proxy, FIT))[0] == 200                    # now it is loaded
    status, _, warm = await chat(http, proxy, FIT, long_text)
    assert status == 400 and warm == cold and "2048" in cold["error"]["message"]
    assert emu.state.load_calls[FIT] == 1 and emu.state.inference_calls[FIT] == 1


async def test_an_unloaded_model_with_no_configured_context_is_checked_against_its_maximum(
        make_emulator, make_proxy, http):
    """As reported: a limited key, the model unloaded by the admin, a megabyte of random text.
    No load option names a context, so the most a load can give is the listing's maximum."""
    emu = await make_emulator()
    model, admin = "qwen/qwen3-4b", {"Authorization": "Bearer admin-0123456789"}
    proxy = await make_proxy(emu.url, **{
        "auth.keys": [{"name": "bob", "key": "sk-bob-0123456789", "models": ["fast"]}],
        "auth.admin_token": "admin-0123456789", "models": {model: {"aliases": ["fast"]}}})
    bob = {"Authorization": "Bearer sk-bob-0123456789"}
    url = f"{proxy.url}/v1/chat/completions"
    async with http.post(url, headers=bob, json={
            "model": "fast", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            ) as r:
        assert r.status == 200
    async with http.post(f"{proxy.url}/proxy/models/unload", headers=admin,
                         json={"model": model}) as r:
        assert r.status == 200
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(1_000_000))
    async with http.post(url, headers=bob, json={
            "model": "fast", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
            ) as r:
        error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "context_length_exceeded"
    assert "than the 32768 tokens of context" in error["message"]
    assert emu.state.load_calls[model] == 1 and emu.state.inference_calls[model] == 1


async def test_a_model_whose_load_failed_is_cold_too(make_emulator, make_proxy, http):
    """A failed load leaves it in error, not loaded: a prompt certain to exceed what its load
    would give is the client's 400, not the load failure's answer."""
    emu = await make_emulator(catalog=catalog())
    proxy = await make_proxy(emu.url, models={FIT: {"load": {"context_length": 2048}}})
    emu.state.faults.load_fail[FIT] = "a broken file"
    status, _, _ = await chat(http, proxy, FIT)
    assert status >= 500 and proxy.engine.entry(FIT).status is ModelStatus.ERROR
    status, _, body = await chat(http, proxy, FIT, "hello world " * 1400)   # ≥ 2100 tokens
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert emu.state.load_calls[FIT] == 1


async def test_a_configured_context_is_not_the_bound_when_lm_studios_jit_loads(
        make_emulator, make_proxy, http):
    """LM Studio 0.3 loads on its own (JIT), without the proxy's load options: the configured
    2048 is not what the model gets, so a prompt past it is forwarded, not refused."""
    from proxy.emulator import EmulatorOptions
    emu = await make_emulator(catalog=catalog(), options=EmulatorOptions(version="0.3"))
    proxy = await make_proxy(emu.url, models={FIT: {"load": {"context_length": 2048}}})
    assert not proxy.engine.manages_loading
    status, _, body = await chat(http, proxy, FIT, "hello world " * 1400)   # ≥ 2100 tokens
    assert status == 200, body
    assert emu.state.load_calls[FIT] == 1


def test_check_names_each_bad_load_option():
    with pytest.raises(ConfigError) as caught:
        load_config({"models": {"m": {"load": {"context_length": "big", "flash_attention": "yes",
                                               "gpu": 0.5}},
                                "n": {"load": {"context_length": 4096},
                                      "fit": {"min_context_length": 8192}}}})
    problems = caught.value.problems
    assert any(p.startswith("models.m.load.context_length: must be a whole number")
               for p in problems)
    assert any(p.startswith("models.m.load.flash_attention: must be true or false")
               for p in problems)
    assert any(p.startswith("models.m.load.gpu: not an option of LM Studio's load call")
               for p in problems)
    assert any(p.startswith("models.n.fit.min_context_length: 8192 is above") for p in problems)
    with pytest.raises(ConfigError) as caught:
        load_config({"models": {"m": {"fit": {"min_context_length": 0}}}})
    assert caught.value.problems[0].startswith("models.m.fit.min_context_length: must be")


def test_options_for_ollama_are_its_own():
    config = load_config({"upstream": {"kind": "ollama"},
                          "models": {"m": {"load": {"num_ctx": 8192, "num_gpu": 99}}}})
    assert dict(config.model("m").load) == {"num_ctx": 8192, "num_gpu": 99}


async def test_footprints_measured_at_two_contexts_replace_the_estimate():
    """What fitted loads measured is kept per context, apart from the configured footprint,
    and two contexts give the line the next choice uses."""
    from proxy.engine.core import EngineCore
    from proxy.upstream.base import Capabilities

    from .fakes import ScriptedBackend, SettableSampler
    caps = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                        multi_instance=False, native_clients=False)
    core = EngineCore(load_config({"models": {FIT: {"load": {"context_length": 32768},
                                                    "fit": {"min_context_length": 4096}}}}),
                      ScriptedBackend({FIT: 4.0}, caps), sampler=SettableSampler())
    await core.reconcile()
    e, fit = core.registry.entries[FIT], core.scheduler.fit
    assert fit.kv_bytes_per_token(e) == 96_000          # estimated from its 4 GB file
    for context, measured_gb in ((8192, 5.0), (16384, 6.0)):
        e.fit_context_length = context
        assert fit.learned(e, measured_gb * GB)
    assert e.footprint_bytes is None                    # the configured one is not touched
    assert fit.kv_bytes_per_token(e) == pytest.approx(GB / 8192)
    assert fit.need_at(e, 32768) == pytest.approx(8.0 * GB)
    assert fit.largest_fitting(e, 4096, 32768, 7.0 * GB) == 24576


async def test_once_unloaded_a_fitted_model_forgets_its_fitted_context(
        make_emulator, make_proxy, http):
    """Loaded smaller beside another model, then unloaded: its row shows no context and its
    configured footprint; with room again, its next load takes its configured context."""
    emu = await make_emulator(catalog=catalog((BIG, 9)), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, {BIG: 9},
                                                    fit={"min_context_length": 8192}))
    assert (await chat(http, proxy, BIG))[0] == 200
    assert (await chat(http, proxy, FIT))[0] == 200
    assert emu.state.instances_of(FIT)[0].context_length == 20480
    assert await proxy.engine.unload(FIT) and await proxy.engine.unload(BIG)
    r = await row(http, proxy, FIT)
    assert r["context_length"] is None and r["footprint_source"] == "configured"
    assert r["footprint_mb"] == round(round(AT_32K_GB, 2) * GB / 1e6)
    status, headers, _ = await chat(http, proxy, FIT)
    assert status == 200 and headers["X-Proxy-Context-Length"] == "32768"
    assert emu.state.instances_of(FIT)[0].context_length == 32768


async def test_a_fitted_load_that_failed_forgets_its_fitted_context(
        make_emulator, make_proxy, http):
    """Its smaller load failed: the model in error holds nothing, and its row shows its
    configured footprint, not the fitted one it did not get."""
    emu = await make_emulator(catalog=catalog((BIG, 9)), capacity_bytes=16 * GB)
    proxy = await make_proxy(emu.url, config=config(emu.url, {BIG: 9},
                                                    fit={"min_context_length": 8192}))
    assert (await chat(http, proxy, BIG))[0] == 200
    emu.state.faults.load_fail[FIT] = "the model file is damaged"
    assert (await chat(http, proxy, FIT))[0] >= 500
    r = await row(http, proxy, FIT)
    assert r["state"] == "error" and r["context_length"] is None
    assert r["footprint_source"] == "configured"
