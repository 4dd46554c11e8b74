"""Loading progress for a streaming request that waits for its model (`server.loading_progress`).

A chat UI that asks for a cold model otherwise sees nothing for as long as the load takes. Once
such a request has waited `min(1 s, loading_progress_interval_s)`, its response starts: 200,
`text/event-stream`, and every `loading_progress_interval_s` a note on the load,

    : loading qwen/qwen3-4b, 12 s so far, about 8 s left

as an SSE comment (`comments`, the default), which every SDK skips and which keeps idle-timeout
proxies from closing the connection; or, on /v1/chat/completions with `content`, as a
`delta.reasoning_content` chunk, which chat UIs (Open WebUI) show as the model's reasoning. The
estimate is the model's learned load time (`ModelEntry.load_time_s`) less the time its load
has run; with none learned yet the note says only how long the request has waited. A model
that is resident, or that becomes so within the first delay, gets no extra byte: its response
is exactly today's.

Once the headers are out, the status can no longer say what went wrong: a refused or failed
load, an unreachable or silent upstream, or an upstream's non-200 answer reaches the client as
an error event (`data: {"error": ...}`, which the SDKs raise) and the stream ends; the request
is recorded with the status it would have had. The early response carries the proxy's own
headers (`Content-Type: text/event-stream`, `Cache-Control: no-cache`, `X-Accel-Buffering: no`
and `X-Proxy-Model` when `auto:` picked the model), not the upstream's, which arrive too late.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from ..engine.face import Engine
from ..engine.lifecycle import Lease, ModelEntry, ModelStatus
from ..errors import UpstreamError, clip
from ..upstream.base import UpstreamResponse
from .headers import ROUTED_HEADER
from .inflight import INFLIGHT, write_or_stall
from .keys import CONFIG, RESPONSE_STARTED, ROUTED_TO

STREAMED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses",
                             "/v1/messages"})
REASONING_ROUTES = frozenset({"/v1/chat/completions"})   # where `content` mode can speak
FIRST_NOTE_MAX_S = 1.0    # a load shorter than this adds no byte to the response
EARLY_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                 ("X-Accel-Buffering", "no"))   # nginx: pass each note on at once
S = ModelStatus


class EarlyStream:
    """The response of one streaming request, started while its model loads (`resp` is set
    once the headers went out)."""
    __slots__ = ("request", "model", "reasoning", "interval_s", "resp")

    def __init__(self, request: web.Request, model: str, *, reasoning: bool,
                 interval_s: float) -> None:
        self.request = request
        self.model = model
        self.reasoning = reasoning
        self.interval_s = interval_s
        self.resp: web.StreamResponse | None = None

    @classmethod
    def of(cls, request: web.Request, payload: dict[str, Any]) -> "EarlyStream | None":
        """The request's early stream, or None: not a stream, or progress is off."""
        server = request.app[CONFIG].current.server
        if server.loading_progress == "off" or payload.get("stream") is not True or \
                request.path not in STREAMED_ROUTES:
            return None
        return cls(request, str(payload.get("model", "")),
                   reasoning=server.loading_progress == "content" and
                   request.path in REASONING_ROUTES,
                   interval_s=server.loading_progress_interval_s)

    async def acquire(self, engine: Engine, key: str) -> Lease:
        """engine.acquire(key), with a note to the client every interval while it waits."""
        e = engine.entry(key)
        if e is not None and e.status is S.LOADED or not engine.manages_loading:
            return await engine.acquire(key)     # nothing to wait for: no task, no timer
        waiting_since_s = engine.clock.now()
        task = asyncio.ensure_future(engine.acquire(key))
        delay_s = min(FIRST_NOTE_MAX_S, self.interval_s)
        claimed = False
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=delay_s)
                if done:
                    claimed = True
                    return task.result()
                await self._note(note_text(key, engine.entry(key), engine.clock.now(),
                                           waiting_since_s))
                delay_s = self.interval_s
        finally:
            if not claimed:   # the client left, or the shutdown ended the request
                task.cancel()
                # A lease that came as the note failed (or comes despite the cancel) goes back.
                task.add_done_callback(_release_unclaimed)

    async def _note(self, text: str) -> None:
        if self.resp is None:
            await self._start()
        if self.reasoning:
            data = b"data: " + orjson.dumps(self._reasoning_chunk(text + "\n")) + b"\n\n"
        else:
            data = b": " + text.encode() + b"\n\n"
        await write_or_stall(self.request, self.resp, data)

    async def _start(self) -> None:
        request = self.request
        headers = list(EARLY_HEADERS)
        if ROUTED_TO in request:
            headers.append((ROUTED_HEADER, request[ROUTED_TO]))
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        self.resp = resp
        request[RESPONSE_STARTED] = True
        request.app[INFLIGHT].stream_started(request, resp)

    def _reasoning_chunk(self, text: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-loading-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                             "delta": {"role": "assistant", "reasoning_content": text}}]}

    async def fail(self, event: bytes) -> web.StreamResponse:
        """End the started stream with an error event (what the status would have said)."""
        assert self.resp is not None
        await write_or_stall(self.request, self.resp, event)
        await self.resp.write_eof()
        return self.resp


def note_text(key: str, e: ModelEntry | None, now_s: float, waiting_since_s: float) -> str:
    """`loading qwen/qwen3-4b, 12 s so far, about 8 s left`: what the wait is for, how long the
    request has waited, and what the learned load time says is left."""
    waited = f"{round(now_s - waiting_since_s)} s so far"
    usual_s = e.load_time_s if e is not None else None
    if e is None or e.status is not S.LOADING or e.loading_since_s is None:
        # Queued: memory is being made, or waits for a model in use to finish.
        then = f", then about {round(usual_s)} s to load" if usual_s is not None else ""
        return f"waiting to load {key}, {waited}{then}"
    if usual_s is None:
        return f"loading {key}, {waited}"
    left_s = usual_s - (now_s - e.loading_since_s)
    if left_s < 0.5:
        return f"loading {key}, {waited}, longer than its usual {round(usual_s)} s"
    return f"loading {key}, {waited}, about {round(left_s)} s left"


async def upstream_refusal(up: UpstreamResponse) -> bytes:
    """An upstream answer that cannot follow the early headers, as the error event's JSON:
    its own error object when it has one (passed on, as a status would have been), else an
    upstream_error naming what came back."""
    raw = await up.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return orjson.dumps(body)
    what = f"status {up.status}" if up.status != 200 else "a whole body to a stream request"
    text = raw.decode("utf-8", "replace").strip()
    return orjson.dumps(UpstreamError(
        f"The upstream answered with {what}: {clip(text) or '(empty)'}").body())


def _release_unclaimed(task: asyncio.Task[Lease]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()

