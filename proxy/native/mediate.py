"""What the proxy takes part in on LM Studio's native protocol; everything else passes as is.

    loadModel / getOrLoad channels   held while the engine admits the load (room made by its
                                     policy, the same refusals as for an OpenAI request), then
                                     forwarded unchanged; the result tells the engine the
                                     instance, the model is its client's (`sdk:<identifier>`)
    predict channel / embedString    a USE lease while running (eviction never cuts it), then a
                                     RequestRecord like an OpenAI request's
    unloadModel                      the engine reconciles once LM Studio answers

Before any of that the connection's `guard.Guard` sees each frame: what the client's key may
not do is answered by the proxy (`channelError` / `rpcError`) and never reaches LM Studio. A
refusal goes back as the error the SDKs raise. Frames are forwarded as the text they came in;
parsing is only for deciding.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import orjson

from ..engine.face import Engine
from ..engine.mediated import MediatedLoad
from ..engine.lifecycle import Lease, ModelStatus
from ..engine.usage import CLIENT_CLOSED, RequestRecord
from ..errors import ModelNotFound, ProxyError
from .guard import REQUESTS, Guard, Refusal

log = logging.getLogger("proxy.native")
Send = Callable[[str], Awaitable[None]]
LOAD_ENDPOINTS = ("loadModel", "getOrLoad")
LOAD_DONE = ("success", "alreadyLoaded", "loadSuccess")
KEEPALIVE_S = 60.0   # a held load tells its client it is alive this often


@dataclass
class _Use:
    """A native prediction or embedding in flight, under a USE lease."""
    key: str
    lease: Lease
    endpoint: str
    started_s: float
    ttft_s: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class _Held:
    """A load channel waiting for admission, and the client's frames for it meanwhile."""
    frames: list[str] = field(default_factory=list)
    task: asyncio.Task | None = None
    admission: asyncio.Future | None = None


class Mediator:
    """One client websocket's mediation (namespace `llm`, `embedding`, ...)."""

    def __init__(self, engine: Engine, namespace: str, to_upstream: Send,
                 to_client: Send, owner: str, guard: Guard) -> None:
        self.engine, self.ns = engine, namespace
        self.to_upstream, self.to_client = to_upstream, to_client
        self.owner, self.guard = owner, guard
        self.held: dict[Any, _Held] = {}
        self.loads: dict[Any, MediatedLoad] = {}
        self.channel_uses: dict[Any, _Use] = {}
        self.call_uses: dict[Any, _Use] = {}
        self.unload_calls: dict[Any, Any] = {}   # callId → the identifier to unload
        self.load_channels: set[Any] = set()     # loadModel / getOrLoad channels open
        self.unadmitted: set[Any] = set()     # load channels forwarded without admission
        self.refs: dict[str, str] = {}     # instanceReference → identifier, from load results
        self._tasks: set[asyncio.Task] = set()

    @property
    def models(self) -> bool:
        return self.ns in ("llm", "embedding")

    # -- client → LM Studio ------------------------------------------------------------------
    async def from_client(self, data: str) -> None:
        frame = _parse(data)
        if frame is not None and await self._refused(frame):
            return
        kind = frame.get("type") if frame else None
        if kind == "channelCreate" and self.models:
            cid, endpoint = frame.get("channelId"), frame.get("endpoint")
            param = frame.get("creationParameter")
            param = param if isinstance(param, dict) else {}
            if endpoint in LOAD_ENDPOINTS:
                self.load_channels.add(cid)
            # Loads on another device (LM Link) spend no local memory; against an LM Studio
            # older than 0.4 the engine cannot unload, so it admits nothing either.
            if endpoint in LOAD_ENDPOINTS and param.get("deviceIdentifier") is None and \
                    self.engine.manages_loading:
                name = param.get("modelKey" if endpoint == "loadModel" else "identifier")
                if isinstance(name, str):
                    held = self.held[cid] = _Held([data])
                    held.task = self._spawn(self._admit(cid, endpoint, name))
                    return
            if endpoint in LOAD_ENDPOINTS:
                self.unadmitted.add(cid)
            elif endpoint == "predict":
                await self._begin_use(self.channel_uses, cid, param.get("modelSpecifier"),
                                      "lmstudio:predict")
        elif kind == "channelSend" and frame.get("channelId") in self.held:
            self.held[frame["channelId"]].frames.append(data)
            return
        elif kind == "rpcCall" and self.models:
            endpoint, call_id = frame.get("endpoint"), frame.get("callId")
            param = frame.get("parameter")
            if endpoint == "embedString" and isinstance(param, dict):
                await self._begin_use(self.call_uses, call_id, param.get("modelSpecifier"),
                                      "lmstudio:embedString")
            elif endpoint == "unloadModel":
                self.unload_calls[call_id] = param.get("identifier") \
                    if isinstance(param, dict) else None
        await self.to_upstream(data)

    async def _refused(self, frame: dict[str, Any]) -> bool:
        """Answer a frame the client's key may not send, in the SDK's error shape."""
        kind = frame.get("type")
        refused = self.guard.check(frame, self.refs)
        if refused is None:
            return False
        log.info("refused %s %s for %s: %s", kind, frame.get("endpoint"), self.owner,
                 refused.error.message)
        answer, id_field = REQUESTS[kind]
        await self.to_client(_dumps({"type": answer, id_field: frame.get(id_field),
                                     "error": refused.serialized()}))
        return True

    async def _admit(self, cid: Any, endpoint: str, name: str) -> None:
        held = self.held[cid]
        load: MediatedLoad | None = None
        try:
            admission = held.admission = asyncio.ensure_future(
                self.engine.admit_load(name, owner=self.owner))
            try:
                while not (await asyncio.wait({admission}, timeout=KEEPALIVE_S))[0]:
                    await self._keepalive(cid, endpoint)
            finally:
                if not admission.done():
                    admission.cancel()
                    await asyncio.gather(admission, return_exceptions=True)
            load = admission.result()
        except ModelNotFound:
            pass        # LM Studio answers with its own not-found error
        except Exception as exc:
            del self.held[cid]
            if not isinstance(exc, ProxyError):
                log.exception("admitting %s of %s failed", endpoint, name)
                exc = ProxyError("Internal error in the proxy; see its log.")
            log.info("refused %s of %s for %s: %s", endpoint, name, self.owner, exc.message)
            await self.to_client(_dumps({"type": "channelError", "channelId": cid,
                                         "error": memory_refusal(exc).serialized()}))
            return
        if load is not None:
            self.loads[cid] = load
        else:
            self.unadmitted.add(cid)
        del self.held[cid]
        for data in held.frames:
            await self.to_upstream(data)

    async def _keepalive(self, cid: Any, endpoint: str) -> None:
        kind = "progress" if endpoint == "loadModel" else "loadProgress"
        await self.to_client(_dumps({"type": "channelSend", "channelId": cid,
                                     "message": {"type": kind, "progress": 0.0}}))

    async def _begin_use(self, uses: dict[Any, _Use], id_: Any, spec: Any,
                         endpoint: str) -> None:
        name = self._spec_name(spec)
        key = self.engine.owner_of(name)[0] if name is not None else None
        e = self.engine.entry(key) if key is not None else None
        if e is None or e.status is not ModelStatus.LOADED:
            return      # not resident in the engine's view: LM Studio answers as it would
        try:
            lease = await self.engine.acquire(e.key)    # the hot path: no load, no wait
        except ProxyError:
            return
        uses[id_] = _Use(e.key, lease, endpoint, self.engine.clock.now())

    def _spec_name(self, spec: Any) -> str | None:
        if not isinstance(spec, dict):
            return None
        if spec.get("type") == "instanceReference":
            return self.refs.get(spec.get("instanceReference"))
        query = spec.get("query")
        name = query.get("identifier") if isinstance(query, dict) else None
        return name if isinstance(name, str) else None

    # -- LM Studio → client ------------------------------------------------------------------
    async def from_upstream(self, data: str) -> None:
        if self.models:
            frame = _parse(data)
            if frame is not None and self._observe(frame):
                # The engine's view is brought up to date before the client hears of it.
                try:
                    await self.engine.reconcile()
                except Exception:
                    log.exception("reconcile after a native load or unload failed")
        await self.to_client(data)

    def _observe(self, frame: dict[str, Any]) -> bool:
        """Take note of an upstream frame; True when the engine must reconcile first."""
        kind = frame.get("type")
        if kind in ("channelSend", "channelClose", "channelError"):
            cid = frame.get("channelId")
            message = frame.get("message") if kind == "channelSend" else None
            message = message if isinstance(message, dict) else {}
            if message.get("type") in LOAD_DONE:
                self._note_instance(message.get("info"))
            if cid in self.load_channels and (message.get("type") in LOAD_DONE
                                              or kind != "channelSend"):
                self.load_channels.discard(cid)
                info = message.get("info")
                if message.get("type") in ("success", "loadSuccess") and \
                        isinstance(info, dict) and isinstance(info.get("identifier"), str):
                    self.guard.loaded(info["identifier"])   # its key may unload it
            if cid in self.unadmitted and (message.get("type") in LOAD_DONE
                                           or kind != "channelSend"):
                # A load the engine did not admit (a second instance of a loaded model, a
                # path it does not know): LM Studio's word is learned by reconciling.
                self.unadmitted.discard(cid)
                return message.get("type") in ("success", "loadSuccess")
            load = self.loads.get(cid)
            if load is not None:
                self._observe_load(cid, load, kind, message, frame)
                if message.get("type") in LOAD_DONE:
                    return True     # its ownership is written before the client hears of it
            use = self.channel_uses.get(cid)
            if use is not None:
                self._observe_prediction(cid, use, kind, message, frame)
        elif kind in ("rpcResult", "rpcError"):
            call_id = frame.get("callId")
            result = frame.get("result")
            for info in result if isinstance(result, list) else [result]:
                self._note_instance(info)     # listLoaded, getModelInfo
            use = self.call_uses.pop(call_id, None)
            if use is not None:
                self._finish(use, kind == "rpcResult", frame.get("error"))
            if call_id in self.unload_calls:
                identifier = self.unload_calls.pop(call_id)
                if kind == "rpcResult" and isinstance(identifier, str):
                    self.guard.unloaded(identifier)
                return True
        return False

    def _note_instance(self, info: Any) -> None:
        if isinstance(info, dict) and isinstance(info.get("instanceReference"), str):
            self.refs[info["instanceReference"]] = str(info.get("identifier"))

    def _observe_load(self, cid: Any, load: MediatedLoad, kind: str, message: dict,
                      frame: dict) -> None:
        if message.get("type") in LOAD_DONE:
            info = message.get("info") or {}
            del self.loads[cid]
            load.loaded(str(info.get("identifier") or load.key))
        elif kind != "channelSend":
            del self.loads[cid]
            error = frame.get("error")
            title = error.get("title") if isinstance(error, dict) else None
            load.failed(str(title or "the load channel closed without a result"))

    def _observe_prediction(self, cid: Any, use: _Use, kind: str, message: dict,
                            frame: dict) -> None:
        mtype = message.get("type")
        if mtype == "fragment":
            if use.ttft_s is None:
                use.ttft_s = self.engine.clock.now() - use.started_s
            fragment = message.get("fragment")
            if isinstance(fragment, dict) and isinstance(fragment.get("tokensCount"), int):
                use.tokens += fragment["tokensCount"]
        elif mtype == "success":
            stats = message.get("stats")
            if isinstance(stats, dict):
                if isinstance(stats.get("predictedTokensCount"), int):
                    use.tokens = stats["predictedTokensCount"]
                if isinstance(stats.get("promptTokensCount"), int):
                    use.prompt_tokens = stats["promptTokensCount"]
            del self.channel_uses[cid]
            self._finish(use, True, None)
        elif kind != "channelSend":
            del self.channel_uses[cid]
            self._finish(use, False, frame.get("error"))

    def _finish(self, use: _Use, ok: bool, error: Any, failed_status: int = 500) -> None:
        use.lease.release()
        now = self.engine.clock.now()
        self.engine.record(RequestRecord(
            model=use.key, ok=ok, latency_s=now - use.started_s, at_s=now,
            endpoint=use.endpoint, status=200 if ok else failed_status, ttft_s=use.ttft_s,
            prompt_tokens=use.prompt_tokens, completion_tokens=use.tokens))

    # -- the connection's end ----------------------------------------------------------------
    async def close(self, client_left: bool = False) -> None:
        """The client (client_left) or LM Studio went away: every load reports, every lease is
        released, and a prediction under way counts as the client's leaving (499: not the
        model's failure) or as LM Studio's failure (502). So does a load under way: the client
        leaving says nothing about the model (it is left: unloaded, no backoff; LM Studio may
        still finish it), LM Studio going away fails it."""
        held = list(self.held.values())
        for h in held:
            if h.task is not None:
                h.task.cancel()
        for load in self.loads.values():
            if client_left:
                load.left(sent=True)
            else:
                load.failed("LM Studio closed the connection during the load")
        self.loads.clear()
        status = CLIENT_CLOSED if client_left else 502
        for use in [*self.channel_uses.values(), *self.call_uses.values()]:
            self._finish(use, False, None, status)
        self.channel_uses.clear()
        self.call_uses.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in held:      # admitted just as the client went: never sent, left all the same
            a = h.admission
            if a is not None and a.done() and not a.cancelled() and a.exception() is None \
                    and a.result() is not None:
                a.result().left(sent=False)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("native mediation failed", exc_info=task.exception())


def memory_refusal(exc: ProxyError) -> Refusal:
    """A refused load as LM Studio serializes errors, so the SDKs raise it as a server error."""
    return Refusal(exc, f"The proxy refused the load ({exc.code}).",
                   "Free memory, or ask for a smaller model; GET /proxy/stats shows what "
                   "holds memory.")


def _parse(data: str) -> dict[str, Any] | None:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None


def _dumps(message: Any) -> str:
    return orjson.dumps(message).decode()
