"""Repairs of LM Studio's OpenAI-compatibility bugs, applied to responses on their way back.

- `embeddings_base64`: LM Studio ignores `encoding_format` and always answers float arrays
  (its tracker #756). The openai Node SDK asks for base64 by default and decodes what comes
  back as base64, so it sees zeros. When the client asked for base64 and got floats, each
  vector is re-encoded as OpenAI does: base64 of the little-endian float32 array. A vector that
  is already a string (an LM Studio that honours the field) is left alone.
- `embedding_usage`: some versions (0.4.3, #1546) report 0 prompt tokens for every embedding.
  The count is then filled in: exact for token-id inputs, otherwise estimated without a
  tokenizer (ESTIMATE_CHARS_PER_TOKEN characters a token, at least 1 per non-empty input) and
  marked estimated in the statistics. The corrected usage is written into the response body.
- `models_retrieve`: `GET /v1/models/{id}` answered from the model list (see `model_object`).

Everything here is a pure function of bytes and dicts, plus a counter of repairs by kind.
"""
from __future__ import annotations

import base64
import math
import sys
from array import array
from typing import Any, NamedTuple

import orjson

from ..config import CompatConfig
from ..liveconfig import LiveConfig

KINDS = ("embeddings_base64", "embedding_usage", "models_retrieve")
EMBEDDINGS_PATH = "/v1/embeddings"
ESTIMATE_CHARS_PER_TOKEN = 4
_BIG_ENDIAN = sys.byteorder == "big"


class Repaired(NamedTuple):   # built for every non-streaming response: a tuple is cheapest
    body: bytes
    tokens_estimated: bool = False


class Compat:
    """The configured repairs (read live: a reload switches them) and how many responses each
    has repaired."""

    def __init__(self, live: LiveConfig) -> None:
        self.live = live
        self.repairs = dict.fromkeys(KINDS, 0)

    @property
    def config(self) -> CompatConfig:
        return self.live.current.compat

    def repair(self, path: str, payload: dict[str, Any], status: int, body: bytes) -> Repaired:
        """The body to send the client for a non-streaming response from the upstream."""
        if path != EMBEDDINGS_PATH or status != 200:
            return Repaired(body)
        cfg = self.config
        want_base64 = cfg.embeddings_base64 and payload.get("encoding_format") == "base64"
        if not want_base64 and not (cfg.embedding_usage and _usage_may_be_zero(body)):
            return Repaired(body)   # the common float request: not even decoded
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Repaired(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            return Repaired(body)
        encoded = want_base64 and encode_embeddings(doc)
        counted, estimated = (fill_embedding_usage(doc, payload.get("input"))
                              if cfg.embedding_usage else (False, False))
        if encoded:
            self.note("embeddings_base64")
        if counted:
            self.note("embedding_usage")
        if not (encoded or counted):
            return Repaired(body)
        return Repaired(orjson.dumps(doc), tokens_estimated=estimated)

    def note(self, kind: str) -> None:
        self.repairs[kind] += 1

    def counts(self) -> dict[str, int]:
        return dict(self.repairs)


def float32_base64(vector: list[float]) -> str:
    """OpenAI's base64 embedding: the little-endian float32 bytes of the vector."""
    packed = array("f", vector)
    if _BIG_ENDIAN:
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def encode_embeddings(doc: dict[str, Any]) -> bool:
    """Encode every float-array embedding in place; True if any was."""
    changed = False
    for item in doc["data"]:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list):
            continue                      # already base64 (or absent): never encoded twice
        try:
            item["embedding"] = float32_base64(vector)
        except TypeError:                 # not a vector of numbers: leave it as it came
            continue
        changed = True
    return changed


def fill_embedding_usage(doc: dict[str, Any], inputs: Any) -> tuple[bool, bool]:
    """Fill a zero or missing prompt-token count in place: (filled, estimated)."""
    usage = doc.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int) \
            and usage["prompt_tokens"] > 0:
        return False, False
    tokens, estimated = count_input_tokens(inputs)
    if tokens <= 0:
        return False, False
    doc["usage"] = {**(usage if isinstance(usage, dict) else {}),
                    "prompt_tokens": tokens, "total_tokens": tokens}
    return True, estimated


def count_input_tokens(inputs: Any) -> tuple[int, bool]:
    """Tokens in an embeddings `input`: (count, estimated). Token-id arrays count exactly."""
    if isinstance(inputs, str):
        return estimate_text_tokens(inputs), bool(inputs)
    if not isinstance(inputs, list):
        return 0, False
    if inputs and all(isinstance(t, int) for t in inputs):
        return len(inputs), False         # one input given as token ids
    total, estimated = 0, False
    for item in inputs:
        if isinstance(item, str):
            total += estimate_text_tokens(item)
            estimated = estimated or bool(item)
        elif isinstance(item, list):
            total += len(item)
    return total, estimated


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text) / ESTIMATE_CHARS_PER_TOKEN) if text else 0


def _usage_may_be_zero(body: bytes) -> bool:
    """A cheap look at the tail, where LM Studio puts usage, before decoding a large body."""
    at = body.rfind(b'"prompt_tokens"')
    if at < 0:
        return True
    value = body[at + 15:at + 40].lstrip(b": \t\r\n")
    return not value[:1].isdigit() or (value[:1] == b"0" and not value[1:2].isdigit())


def model_object(list_body: bytes, model_id: str) -> dict[str, Any] | None:
    """The entry for `model_id` in an OpenAI model list, in OpenAI's Model shape (`created`
    is 0 when the upstream does not say); None if it is not listed. ValueError when the body
    is not a model list."""
    try:
        doc = orjson.loads(list_body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError("no 'data' list")
    for entry in data:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            return {"id": model_id, "object": "model", "created": 0,
                    "owned_by": model_id.split("/")[0], **entry}
    return None
