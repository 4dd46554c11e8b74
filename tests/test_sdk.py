"""The official openai SDK, sync and async, works against the proxy as against LM Studio."""
from __future__ import annotations

import asyncio

import openai
import pytest

MODEL = "qwen/qwen3-4b"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="lm-studio", max_retries=0)


async def test_async_chat_non_streaming(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    await client.close()
    assert reply.model == MODEL
    assert len(reply.choices[0].message.content.split()) == 5
    assert reply.usage.completion_tokens == 5


async def test_async_chat_streaming_sees_no_usage_chunk_it_did_not_ask_for(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, stream=True)]
    await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    assert all(c.usage is None for c in chunks)
    stats = proxy.engine.usage(MODEL)
    assert stats.completion_tokens == 6 and stats.estimated_tokens == 0


async def test_async_chat_streaming_with_usage(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True})]
    await client.close()
    assert chunks[-1].usage.completion_tokens == 4


async def test_async_embeddings_responses_and_models(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    emb = await client.embeddings.create(model="text-embedding-nomic-embed-text-v1.5",
                                         input=["a", "b c"])
    resp = await client.responses.create(model=MODEL, input="hi", max_output_tokens=3)
    models = await client.models.list()
    await client.close()
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 64
    assert len(resp.output_text.split()) == 3 and resp.usage.output_tokens == 3
    assert MODEL in {m.id for m in models.data}


async def test_async_responses_streaming(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    events = [e async for e in await client.responses.create(
        model=MODEL, input="hi", max_output_tokens=3, stream=True)]
    await client.close()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert proxy.engine.usage(MODEL).completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_sync_sdk_chat_and_completions(proxy, stream):
    def run() -> tuple[str, str]:
        client = sync_client(proxy.url)
        if stream:
            chat = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                          max_tokens=3, stream=True)
                           if c.choices)
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt="once", max_tokens=3, stream=True) if c.choices)
        else:
            chat = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                  max_tokens=3).choices[0].message.content
            text = client.completions.create(model=MODEL, prompt="once",
                                             max_tokens=3).choices[0].text
        client.close()
        return chat, text
    chat, text = await asyncio.to_thread(run)
    assert len(chat.split()) == 3 and len(text.split()) == 3


async def test_sync_sdk_embeddings_and_models(proxy):
    def run() -> tuple[int, set[str]]:
        client = sync_client(proxy.url)
        emb = client.embeddings.create(model="text-embedding-nomic-embed-text-v1.5", input="x")
        ids = {m.id for m in client.models.list()}
        client.close()
        return len(emb.data[0].embedding), ids
    dims, ids = await asyncio.to_thread(run)
    assert dims == 64 and MODEL in ids


async def test_sdk_sees_openai_errors(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="qwen/qwen3-4", messages=MESSAGES)
    await client.close()
    assert info.value.code == "model_not_found"
    assert "qwen/qwen3-4b" in info.value.message
