"""The bodies the emulator answers inference with: OpenAI chat and text completions, the
Responses API and Anthropic-style messages, whole or as the server-sent events of a stream,
shaped as LM Studio shapes them (lmstudio-api.md). Pure: the server decides when to send."""
from __future__ import annotations

from typing import Any

from . import generation as gen
from .state import Instance


def completion(kind: str, inst: Instance, body: dict[str, Any], tokens: list[str],
               prompt_tokens: int, created: int, tokens_per_s: float) -> dict[str, Any]:
    """The whole answer of a request that did not ask to stream."""
    text, n = "".join(tokens), len(tokens)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
             "total_tokens": prompt_tokens + n}
    model = inst.instance_id
    if kind in ("chat", "chat-v0"):
        out: dict[str, Any] = {
            "id": gen.request_id("chatcmpl-", model, body), "object": "chat.completion",
            "created": created, "model": model, "choices": [{
                "index": 0, "logprobs": None, "finish_reason": "stop",
                "message": {"role": "assistant", "content": text}}],
            "usage": usage, "system_fingerprint": model}
        if kind == "chat-v0":
            out["stats"] = {"tokens_per_second": tokens_per_s or 1000.0,
                            "time_to_first_token": 0.01, "generation_time": 0.01 * n,
                            "stop_reason": "eosFound"}
            out["model_info"] = {"arch": inst.model.architecture,
                                 "quant": inst.model.quantization, "format": "gguf",
                                 "context_length": inst.context_length}
        return out
    if kind == "text":
        return {"id": gen.request_id("cmpl-", model, body), "object": "text_completion",
                      "created": created, "model": model, "choices": [{
                          "index": 0, "text": text, "logprobs": None,
                          "finish_reason": "stop"}], "usage": usage}
    if kind == "responses":
        return response_object(model, body, text, prompt_tokens, n, "completed", created)
    return message_object(model, body, text, prompt_tokens, n)

def response_object(model: str, body: dict[str, Any], text: str, in_tokens: int,
                    out_tokens: int, status: str, created: int) -> dict[str, Any]:
    """An OpenAI Responses API `response` object, in progress or completed."""
    rid = gen.request_id("resp_", model, body)
    output = [{"type": "message", "id": "msg_" + rid[5:], "status": status,
               "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
              ] if status == "completed" else []
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
            "instructions": None, "metadata": {}, "temperature": body.get("temperature"),
            "top_p": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens,
                      "total_tokens": in_tokens + out_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}
            if status == "completed" else None}

def message_object(model: str, body: dict[str, Any], text: str, in_tokens: int,
                   out_tokens: int) -> dict[str, Any]:
    """An Anthropic-style /v1/messages `message` object."""
    return {"id": gen.request_id("msg_", model, body), "type": "message",
            "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens}}

def stream_events(kind: str, inst: Instance, body: dict[str, Any], tokens: list[str],
                  prompt_tokens: int, created: int, usage_chunk: bool) -> list[bytes]:
    """The server-sent events of a streamed answer, in order (usage_chunk: when the client
    asks for stream_options.include_usage, send it)."""
    model, n = inst.instance_id, len(tokens)
    if kind in ("chat", "chat-v0", "text"):
        chat = kind != "text"
        rid = gen.request_id("chatcmpl-" if chat else "cmpl-", model, body)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
            data = {"id": rid, "object": obj, "created": created, "model": model,
                    "system_fingerprint": model,
                    "choices": [dict(index=0, logprobs=None, **choice)] if choice else []}
            data.update(extra)
            return gen.sse(data)
        out = []
        for i, tok in enumerate(tokens):
            if chat:
                delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
                out.append(chunk({"delta": delta, "finish_reason": None}))
            else:
                out.append(chunk({"text": tok, "finish_reason": None}))
        out.append(chunk({"delta": {}, "finish_reason": "stop"} if chat
                         else {"text": "", "finish_reason": "stop"}))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") and usage_chunk:
            out.append(chunk(None, usage={"prompt_tokens": prompt_tokens,
                                          "completion_tokens": n,
                                          "total_tokens": prompt_tokens + n}))
        out.append(b"data: [DONE]\n\n")
        return out
    if kind == "responses":
        text = "".join(tokens)
        started = response_object(model, body, "", prompt_tokens, 0, "in_progress", created)
        done = response_object(model, body, text, prompt_tokens, n, "completed", created)
        item_id = "msg_" + started["id"][5:]
        seq = iter(range(10_000))
        out = [gen.sse({"type": "response.created", "sequence_number": next(seq),
                        "response": started}, "response.created")]
        for tok in tokens:
            out.append(gen.sse({"type": "response.output_text.delta", "item_id": item_id,
                                "output_index": 0, "content_index": 0, "delta": tok,
                                "logprobs": [], "sequence_number": next(seq)},
                               "response.output_text.delta"))
        out.append(gen.sse({"type": "response.completed", "sequence_number": next(seq),
                            "response": done}, "response.completed"))
        return out
    # Anthropic-style /v1/messages
    start = message_object(model, body, "", prompt_tokens, 0)
    start["stop_reason"] = None
    out = [gen.sse({"type": "message_start", "message": start}, "message_start"),
           gen.sse({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    for tok in tokens:
        out.append(gen.sse({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": tok}},
                           "content_block_delta"))
    out += [gen.sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            gen.sse({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                        "stop_sequence": None},
                     "usage": {"output_tokens": n}}, "message_delta"),
            gen.sse({"type": "message_stop"}, "message_stop")]
    return out
