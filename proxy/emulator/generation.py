"""Deterministic text, token counts and OpenAI/Anthropic-shaped payloads for the emulator."""
from __future__ import annotations

import base64
import hashlib
import random
import struct
from typing import Any

import orjson

from ..server.promptsize import texts

_WORDS = (
    "the model answers with a short and careful reply about memory load time cache token stream "
    "request local server quantized weights context window latency throughput agent tool call "
    "prompt system user assistant vector embedding eviction budget pressure idle warm cold fast "
    "slow small large batch queue lease ready loaded unloaded metric health probe alert history"
).split()


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request asks about, across the request shapes of every endpoint."""
    parts: list[str] = []
    for key in ("messages", "input", "prompt", "system"):
        texts(body.get(key), parts)
    return " ".join(parts)


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def generate(model: str, body: dict[str, Any], default_tokens: int = 24) -> list[str]:
    """Same model, prompt and seed → the same tokens, every time."""
    prompt = prompt_text(body)
    seed = body.get("seed", 0)
    digest = hashlib.sha256(f"{model}\0{seed}\0{prompt}".encode()).digest()
    rng = random.Random(digest)
    limit = body.get("max_tokens") or body.get("max_output_tokens") or body.get(
        "max_completion_tokens")
    n = int(limit) if isinstance(limit, int) and limit > 0 else default_tokens
    return [(" " if i else "") + rng.choice(_WORDS) for i in range(n)]


def embed(model: str, text: str, dims: int = 64) -> list[float]:
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    rng = random.Random(digest)
    return [round(rng.uniform(-1, 1), 6) for _ in range(dims)]


def embed_base64(model: str, text: str, dims: int = 64) -> str:
    """As OpenAI encodes it: base64 of the little-endian float32 vector."""
    return base64.b64encode(struct.pack(f"<{dims}f", *embed(model, text, dims))).decode()


def request_id(prefix: str, model: str, body: dict[str, Any]) -> str:
    """Deterministic per (model, prompt, seed), independent of transport options."""
    digest = hashlib.sha256(f"{model}\0{body.get('seed', 0)}\0{prompt_text(body)}".encode())
    return f"{prefix}{digest.hexdigest()[:24]}"


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"
