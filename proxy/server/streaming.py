"""SSE relay bookkeeping: split upstream bytes on event boundaries, read usage, and take out the
usage the proxy asked for on the client's behalf.

The relay forwards every complete event as soon as it has it; only an incomplete trailing event
is held back (the client could not use half an event anyway). JSON is decoded only for the few
events that may carry usage, found by a byte search first.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

import orjson

_BOUNDARY = re.compile(rb"\r?\n\r?\n")
# An event that carries generated tokens: chat delta, completion text, responses/messages delta,
# a tool call's arguments, reasoning (`reasoning_content`, or `reasoning` as Ollama and vLLM
# name it), Anthropic's thinking and tool input: the key, then a non-empty string, compact or as
# Python's json writes it (": "). One C scan.
_CONTENT = re.compile(rb'"(?:content|text|delta|arguments|reasoning(?:_content)?|thinking|'
                      rb'partial_json)"\s*:\s*"[^"]')
# The end of an OpenAI stream: an event of its own, not "[DONE]" in a model's text.
_DONE = re.compile(rb"^data: ?\[DONE\]\r?$", re.MULTILINE)
_USAGE_KEY = re.compile(r'"usage"\s*:\s*')
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_VALUE = json.JSONDecoder()   # raw_decode: where a JSON value that starts at an index ends


class StreamMeter:
    def __init__(self, started_at: float, *, strip_usage_chunk: bool) -> None:
        self.started_at = started_at
        self.strip_usage_chunk = strip_usage_chunk
        self.ttft_s: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.usage_seen = False
        self.content_events = 0
        self.done = False
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the bytes to send to the client now."""
        if not self._tail and data.endswith(b"\n\n") and b'"usage"' not in data:
            # Fast path: whole events, none of them with usage. Scans in C, no splitting.
            found = len(_CONTENT.findall(data))
            if found:
                self.content_events += found
                if self.ttft_s is None:
                    self.ttft_s = time.perf_counter() - self.started_at
            if b"[DONE]" in data and _DONE.search(data):
                self.done = True
            return data
        buf = self._tail + data if self._tail else data
        out: list[bytes] = []
        start = 0
        for m in _BOUNDARY.finditer(buf):
            event = buf[start:m.end()]
            start = m.end()
            event = self._inspect(event)
            if event:
                out.append(event)
        self._tail = buf[start:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return self._inspect(tail) if tail else tail

    def _inspect(self, event: bytes) -> bytes:
        """Measure one event; the bytes of it the client gets (none, or it without the usage
        the proxy asked for)."""
        if _CONTENT.search(event):
            self.content_events += 1
            if self.ttft_s is None:
                self.ttft_s = time.perf_counter() - self.started_at
        if b"[DONE]" in event and _DONE.search(event):
            self.done = True
            return event
        if b'"usage"' not in event:
            return event
        data = _data_of(event)
        if data is None:
            return event
        self._read_usage(data)
        if not self.strip_usage_chunk or "usage" not in data:
            return event
        if data.get("choices") == [] and data["usage"]:
            return b""                 # the usage-only chunk
        return without_usage(event, data)   # usage on a chunk with choices (or null on each)

    def _read_usage(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if data.get("type") == "response.completed" and isinstance(data.get("response"), dict):
            usage = data["response"].get("usage")
        elif data.get("type") == "message_start" and isinstance(data.get("message"), dict):
            usage = data["message"].get("usage")
        if not isinstance(usage, dict):
            return
        self.usage_seen = True
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int) and prompt:
            self.prompt_tokens = prompt
        if isinstance(completion, int) and completion:
            self.completion_tokens = completion

    @property
    def tokens_estimated(self) -> bool:
        return not self.usage_seen

    def completion_tokens_or_estimate(self) -> int:
        return self.completion_tokens if self.usage_seen else self.content_events


def without_usage(event: bytes, data: dict[str, Any]) -> bytes:
    """`event` without its top-level "usage" member, every other byte as it came; re-written
    only if the cut cannot be made (a data field split over several lines)."""
    at = event.find(b'"usage"')
    if data["usage"] is None and event.find(b'"usage"', at + 7) < 0:
        # On every chunk of an OpenAI stream: the one "usage" in it is the top-level key (no
        # server writes a key's letters as escapes), so a byte cut needs no second decode.
        m = _NULL_USAGE.match(event, at)
        if m is not None:
            start, end = _with_comma(event, at, m.end(), b" \t\r\n", b",")
            return event[:start] + event[end:]
    expected = {k: v for k, v in data.items() if k != "usage"}
    text = event.decode(errors="surrogateescape")   # bytes outside the data line kept as is
    for m in reversed(list(_USAGE_KEY.finditer(text))):   # top-level usage is usually last
        try:
            _, end = _VALUE.raw_decode(text, m.end())
        except ValueError:
            continue
        start, end = _with_comma(text, m.start(), end, " \t\r\n", ",")
        cut = (text[:start] + text[end:]).encode(errors="surrogateescape")
        if _data_of(cut) == expected:              # the member cut was the top-level one
            return cut
    kept = [line for line in event.splitlines() if line and not line.startswith(b"data:")]
    return b"\n".join([*kept, b"data: " + orjson.dumps(expected)]) + b"\n\n"


def _with_comma(buf: Any, start: int, end: int, space: Any, comma: Any) -> tuple[int, int]:
    """The span of the object member at [start, end) with the comma that separates it: the one
    before it (`…, "usage": …`), else the one after it and the space that follows."""
    before = start - 1
    while before >= 0 and buf[before:before + 1] in space:
        before -= 1
    if before >= 0 and buf[before:before + 1] == comma:
        return before, end
    n = len(buf)
    while end < n and buf[end:end + 1] in space:
        end += 1
    if end < n and buf[end:end + 1] == comma:
        end += 1
        while end < n and buf[end:end + 1] in space:
            end += 1
    return start, end


def _data_of(event: bytes) -> dict[str, Any] | None:
    lines = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        data = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


SMALL_BODY_BYTES = 16_384   # below this, decoding the whole body is cheaper than a regex
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def usage_of_body(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a non-streaming response body, if it reports them.
    Only the usage object is decoded, not the whole body (embeddings can be megabytes)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    m = _USAGE_OBJECT.match(body, at) if len(body) > SMALL_BODY_BYTES else None
    try:
        usage = orjson.loads(m.group(1)) if m else orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)


ERROR_CODE_MAX_CHARS = 64    # a code is a short word; anything longer is not one


def error_code(body: bytes) -> str | None:
    """The code of a server's error body — OpenAI's `{"error": {"code" or "type"}}` — so a
    failure's record says why; None for a body without one (LM Studio's `{"error": "..."}`
    strings carry no code)."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code[:ERROR_CODE_MAX_CHARS] if isinstance(code, str) and code else None
