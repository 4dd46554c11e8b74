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


async def served_app(manager, routes):
    app = web.Application(middlewares=[ModelMemoryMiddleware(manager).aiohttp])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    return await serve(app)


async def test_a_model_the_middleware_cannot_have_is_answered_as_the_proxy_answers(manager,
                                                                                    http):
    async def handler(request):
        raise AssertionError("never called without its model")
    served = await served_app(manager, {"/work": handler})
    try:
        async with http.get(f"{served.url}/work", headers={"X-Model": "no/such"}) as r:
            assert r.status == 404
            error = (await r.json())["error"]
    finally:
        await served.close()
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "'no/such'" in error["message"]


async def test_the_handlers_4xx_is_no_failure_of_the_model_and_its_5xx_is(manager, http):
    async def refuses(request):
        raise web.HTTPBadRequest(text="the user said no")

    async def breaks(request):
        raise web.HTTPInternalServerError()

    async def answers_503(request):
        return web.json_response({}, status=503)
    served = await served_app(manager, {"/refuses": refuses, "/breaks": breaks,
                                        "/503": answers_503})
    try:
        async with http.get(f"{served.url}/refuses", headers={"X-Model": MODEL}) as r:
            assert r.status == 400
        usage = manager.usage(MODEL)
        assert (usage.requests, usage.failures) == (0, 0)
        for path in ("/breaks", "/503"):
            async with http.get(f"{served.url}{path}", headers={"X-Model": MODEL}) as r:
                assert r.status >= 500
    finally:
        await served.close()
    usage = manager.usage(MODEL)
    assert (usage.requests, usage.failures) == (2, 2)
    assert manager.entry(MODEL).leases == 0


async def test_a_request_with_no_route_never_loads_its_model(manager, http, emulator):
    async def handler(request):
        return web.json_response({})
    await manager.clear_all_models()
    loads = emulator.state.load_calls[MODEL]
    served = await served_app(manager, {"/work": handler})
    try:
        async with http.get(f"{served.url}/nope", headers={"X-Model": MODEL}) as r:
            assert r.status == 404
        async with http.post(f"{served.url}/work", headers={"X-Model": MODEL}) as r:
            assert r.status == 405
    finally:
        await served.close()
    assert emulator.state.load_calls[MODEL] == loads and MODEL not in manager.get_loaded_models()
    assert manager.usage(MODEL).requests == 0
