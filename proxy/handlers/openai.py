"""The OpenAI surface: forward to the upstream byte for byte, with the model made resident first.

An inference request reads top-down: parse the body, route the model name to a key, and hand
both to a `server.relay.Relay`, which holds the model, forwards, relays the answer and records
the request (what changes on the way is said there). The model list and `GET /v1/models/{id}`
go through the same header policy.
"""
from __future__ import annotations

import orjson
from aiohttp import web

from ..server import intake
from ..server.auth import check_model, visible_models
from ..server.compat import model_object
from ..errors import InvalidRequest, ModelNotFound, UpstreamError
from ..server.keys import COMPAT, CONFIG, ENGINE
from ..server.modellist import read_model_list
from ..server.relay import Relay
from . import routing


async def read_body(request: web.Request) -> bytes:
    return await intake.read_body(request, request.app[CONFIG].current.server)


def parse_request(body: bytes) -> dict:
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    intake.check_nesting(payload)
    model = payload.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    return payload


async def inference(request: web.Request) -> web.StreamResponse:
    async with Relay(request) as relay:   # a refusal from here on is logged and counted too
        body = await read_body(request)
        payload = parse_request(body)
        relay.model = name = payload["model"]
        intake.check_model_name(name, request.app[CONFIG].current.server)
        key = await routing.route(request, payload, name)
        return await relay.run(key, payload, body)


async def list_models(request: web.Request) -> web.StreamResponse:
    resp = await read_model_list(request, request.path_qs)
    if resp.status == 200:
        resp.body = visible_models(request, resp.body)
    return resp


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{id} (the SDKs' models.retrieve), answered from the upstream's list."""
    model_id = request.match_info["model"]
    check_model(request, model_id)    # a key limited to models sees only those
    key = request.app[CONFIG].aliases.get(model_id, model_id)
    listed = await read_model_list(request)
    if listed.status != 200:   # e.g. LM Studio's 401: its answer is the client's answer
        return listed
    try:
        found = model_object(listed.body, key)
        if found is None:
            # Any other name a request may use (Ollama's `llama3.2` for `llama3.2:latest`, an
            # instance id): resolved as inference resolves it, or a 404 naming close matches.
            found = model_object(listed.body, await request.app[ENGINE].resolve(model_id))
    except ValueError as exc:
        raise UpstreamError(f"The upstream's model list could not be read: {exc}") from None
    if found is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    request.app[COMPAT].note("models_retrieve")
    return web.Response(body=orjson.dumps(found), content_type="application/json")


INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                             "/v1/responses", "/v1/messages"})


def is_inference(request: web.BaseRequest) -> bool:
    return request.method == "POST" and request.path in INFERENCE_PATHS


def add_routes(app: web.Application) -> None:
    for path in sorted(INFERENCE_PATHS):
        app.router.add_post(path, inference)
    app.router.add_get("/v1/models", list_models)
    if app[CONFIG].current.compat.models_retrieve:
        app.router.add_get("/v1/models/{model:.+}", retrieve_model)
