"""A prompt certain not to fit the model's context is refused before it is forwarded, and
before a cold model is loaded for it.

The proxy has no tokenizer, so it counts a lower bound: the prompt's characters, with every run
of one repeated character (a row of `=`, of spaces) counted as one, divided by
MAX_CHARS_PER_TOKEN. Real text averages 3–5 characters per token in the tokenizers of current
models; no text averages 8 over a whole prompt, so a prompt refused here would certainly have
been refused (or cut) by the server, after a wait. Anything closer goes through: the server
has the last word.

A cold model is checked against the most context its load can give it (`load_context`), so no
load is made for a prompt that would be refused once loaded; a loaded one against its own.
"""
from __future__ import annotations

import re
from typing import Any

from ..config import Config
from ..engine.lifecycle import ModelEntry, ModelStatus
from ..errors import ContextLengthExceeded
from ..loadoptions import SIZES_CONTEXT, kinds
from ..loadoptions import context_length as configured_option

MAX_CHARS_PER_TOKEN = 8
_RUNS = re.compile(r"(.)\1{3,}", re.DOTALL)   # four or more of one character: one token at most
RUN_CHUNK_CHARS = 1 << 16
# Where each route keeps its prompt: the body field (named in the error's `param`).
PROMPT_FIELDS = {"/v1/chat/completions": "messages", "/v1/messages": "messages",
                 "/v1/completions": "prompt", "/v1/responses": "input"}


def refuse_oversized(path: str, payload: dict[str, Any], context_length: int | None) -> None:
    """Raise ContextLengthExceeded when the prompt is certain to exceed context_length."""
    field = PROMPT_FIELDS.get(path)
    if field is None or not context_length:
        return
    values = [payload.get(field)]
    if path == "/v1/messages":
        values.append(payload.get("system"))
    chars = prompt_chars(values, (context_length + 1) * MAX_CHARS_PER_TOKEN)
    at_least = chars // MAX_CHARS_PER_TOKEN
    if at_least > context_length:
        raise ContextLengthExceeded(
            f"The prompt has at least {at_least} tokens ({chars} characters), more than the "
            f"{context_length} tokens of context '{payload.get('model')}' is loaded with. "
            f"Shorten the prompt, or load the model with a larger context "
            f"(models.<key>.load.context_length).", param=field)


def prompt_chars(values: list[Any], enough: int) -> int:
    """The characters of every string in values (a run of one character counted once), counted
    until `enough` are found: a hostile body of a million messages is refused after the first
    few thousand, not after walking them all on the event loop."""
    chars, stack = 0, values[::-1]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            chars += _run_chars(value, enough - chars)
            if chars >= enough:
                break
        elif isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            stack.extend(value[name] for name in ("input", "text", "content") if name in value)
    return chars


def _run_chars(text: str, enough: int) -> int:
    if len(text) < 4:
        return len(text)           # no run to fold: the common short string, no regex
    if len(text) <= RUN_CHUNK_CHARS:
        return len(_RUNS.sub(r"\1", text))
    # In chunks, so that counting stops soon after enough; a run cut at a chunk's edge is
    # counted at most 5 too many (3 + 3 of a 6-character run), taken off to stay a lower bound.
    total = 0
    for i in range(0, len(text), RUN_CHUNK_CHARS):
        total += len(_RUNS.sub(r"\1", text[i:i + RUN_CHUNK_CHARS])) - (5 if i else 0)
        if total >= enough:
            break
    return max(total, 1)


def load_context(e: ModelEntry | None, config: Config, loads: bool) -> int | None:
    """The most context a load of the cold model e can give it, when known: its configured
    `load.context_length` if the proxy loads it (`loads`; fit only ever lowers it), else on LM
    Studio the listing's maximum (a load naming none gets LM Studio's default, which the user
    may have raised, up to that). None when e is loaded or loading (its own context is checked
    once leased) or the server's choice is unknown."""
    if e is None or e.status not in (ModelStatus.UNLOADED, ModelStatus.ERROR):
        return None
    hosts = kinds(config)
    configured = configured_option(config.model(e.key).load)
    if configured and loads and hosts <= SIZES_CONTEXT:
        return configured
    return e.max_context_length if hosts == {"lmstudio"} else None


def texts(value: Any, out: list[str]) -> None:
    """Every string in a prompt field: plain text, message contents, content parts (the
    emulator reads prompts with it too)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            texts(item, out)
    elif isinstance(value, dict):
        for name in ("content", "text", "input"):
            if name in value:
                texts(value[name], out)
