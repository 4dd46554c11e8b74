"""The integration API around real calls: leases held during the call, usage recorded after."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy import CognitiveModelIntegrator, ModelMemoryMiddleware, create_model_memory_manager
from proxy.server.serving import serve

MODEL = "qwen/qwen3-4b"


@pytest.fixture
async def manager(emulator, private_home):
    m = await create_model_memory_manager(min_free_memory_gb=1, upstream=emulator.url)
    yield m
    await m.cleanup()


async def test_the_aiohttp_middleware_serves_the_named_model(manager, http):
    seen = []

    async def handler(request):
        seen.append(manager.entry(MODEL).leases)            # resident and leased meanwhile
        return web.json_response({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    mw = ModelMemoryMiddleware(manager)
    app = web.Application(middlewares=[mw.aiohttp])
    app.router.add_get("/work", handler)
    served = await serve(app)
    try:
        async with http.get(f"{served.url}/work", headers={"X-Model": MODEL}) as r:
            assert r.status == 200
        async with http.get(f"{served.url}/work") as r:      # no model named: just served
            assert r.status == 200
    finally:
        await served.close()
    assert seen == [1, 0] and manager.entry(MODEL).leases == 0
    assert manager.usage(MODEL).requests == 1


async def test_a_failing_step_is_recorded_as_a_failure_and_releases(manager):
    async def broken(context):
        raise RuntimeError("step failed")
    with pytest.raises(RuntimeError):
        await ModelMemoryMiddleware(manager)({"model": MODEL}, broken)
    assert manager.usage(MODEL).failures == 1 and manager.entry(MODEL).leases == 0


async def test_wrapped_methods_keep_their_result_and_record_tokens(manager):
    class Kernel:
        async def process(self, prompt):
            return {"answer": prompt.upper(), "usage": {"completion_tokens": 9}}
    kernel = CognitiveModelIntegrator(manager).integrate_with_kernel(Kernel(), model=MODEL)
    assert (await kernel.process("hi"))["answer"] == "HI"
    assert manager.usage(MODEL).completion_tokens == 9
    assert kernel.process.__name__ == "process"


async def test_a_step_its_caller_gave_up_on_is_no_failure_and_releases(manager):
    started = asyncio.Event()

    async def slow(context):
        started.set()
        await asyncio.Event().wait()                        # until cancelled
    step = asyncio.create_task(ModelMemoryMiddleware(manager)({"model": MODEL}, slow))
    await started.wait()
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    usage = manager.usage(MODEL)
    assert (usage.requests, usage.failures, usage.client_closed) == (1, 0, 1)
    assert manager.entry(MODEL).leases == 0
