"""What a client sends, taken in with limits: the body (declared and decoded size, encoding, read
deadline, nesting depth), the model name's length, and untrusted strings made safe to echo in logs
and errors.

The server's own request decompression is off (serving.py), so a `Content-Encoding` reaches this
module untouched: gzip and deflate are decoded here with the *decoded* size held to
`server.max_body_bytes` (a bomb is refused after one bounded pass that keeps nothing), any other
encoding is a 415, and the body goes upstream decoded and without the header.
"""
from __future__ import annotations

import asyncio
import zlib

import orjson
from aiohttp import web

from ..config import ServerConfig
from ..errors import BodyTooLarge, InvalidRequest, RequestTimeout, UnsupportedEncoding, clip

DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
IDENTITY = frozenset({"", "identity"})
_STEP_BYTES = 256 * 1024
_THREAD_ABOVE_BYTES = 64 * 1024   # decode bigger bodies off the event loop
# orjson.loads reads 1,024 nested arrays and objects but orjson.dumps writes only 254: a body the
# proxy rewrites on the way (an alias, include_usage) must be one it can write back.
MAX_NESTING = 254


def check_model_name(name: str, server: ServerConfig) -> None:
    if len(name) > server.max_model_name_chars:
        raise InvalidRequest(f"'model' is longer than {server.max_model_name_chars} characters "
                             "(server.max_model_name_chars).", param="model")


def check_nesting(payload: object) -> None:
    """Refuse a decoded body nested deeper than the proxy can re-serialise, whatever the route
    (alias, stream) would do with it. One C-speed dumps: cheaper than walking the body."""
    try:
        orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise InvalidRequest(f"The request body nests arrays and objects more than {MAX_NESTING}"
                             f" levels deep; the proxy forwards at most {MAX_NESTING}.") from None


async def read_body(request: web.BaseRequest, server: ServerConfig) -> bytes:
    limit = server.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)   # refused before a byte is read
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in IDENTITY and encoding not in DECODABLE:
        raise UnsupportedEncoding(f"Content-Encoding '{clip(encoding, 40)}' is not supported "
                                  "(use gzip, deflate or none).")
    try:
        if request.content.is_eof():      # all here already (the usual case): no timer
            raw = await request.read()
        else:
            async with asyncio.timeout(server.body_timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {server.body_timeout_s:g}"
                             " s (server.body_timeout_s).") from None
    if encoding in IDENTITY:
        return raw
    if len(raw) > _THREAD_ABOVE_BYTES:
        return await asyncio.to_thread(decode, raw, encoding, limit)
    return decode(raw, encoding, limit)


def decode(raw: bytes, encoding: str, limit: int) -> bytes:
    """Decompress `raw`; BodyTooLarge past `limit` decoded bytes, InvalidRequest if corrupt."""
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else _deflate_wbits(raw)
    if _decoded_size(raw, wbits, limit) > limit:
        raise _too_large(limit, decoded=True)
    return zlib.decompressobj(wbits).decompress(raw)


def _decoded_size(raw: bytes, wbits: int, limit: int) -> int:
    """Count the decoded bytes in bounded steps, keeping none; stops once past `limit`."""
    d = zlib.decompressobj(wbits)
    size, data = 0, raw
    try:
        while True:
            size += len(d.decompress(data, _STEP_BYTES))
            if size > limit or d.eof:
                return size
            data = d.unconsumed_tail
            if not data:
                break
        size += len(d.flush())
    except zlib.error as exc:
        raise InvalidRequest(f"The request body is not valid {encoding_name(wbits)}: {exc}"
                             ) from None
    if not d.eof:
        raise InvalidRequest(f"The request body is a truncated {encoding_name(wbits)} stream.")
    return size


def _deflate_wbits(raw: bytes) -> int:
    # HTTP's "deflate" is zlib-wrapped, but some clients send raw deflate: accept both.
    if len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


def encoding_name(wbits: int) -> str:
    return "gzip" if wbits > zlib.MAX_WBITS else "deflate"


def _too_large(limit: int, *, decoded: bool = False) -> BodyTooLarge:
    what = "decompressed request body" if decoded else "request body"
    return BodyTooLarge(f"The {what} is larger than the {limit} bytes allowed "
                        "(server.max_body_bytes).")
