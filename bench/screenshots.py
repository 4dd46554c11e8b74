"""Screenshots of the dashboard for the README: `python -m bench.screenshots [--out docs]`.

Starts the LM Studio emulator (demo catalogue) and the proxy under a 20 GB budget, drives a
short story — loads, a stream holding a model, an eviction to admit a bigger model, requests
that wait and one that gets a 503 while the holders are pinned or busy, an unload from the
dashboard's own button — and writes dashboard-light.png and dashboard-dark.png.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import aiohttp

from proxy.app import create_app
from proxy.configload import load_config
from proxy.emulator import EmulatorOptions, start_emulator
from proxy.server.serving import serve

from .browser import launch

QWEN, GEMMA, GPT, EMBED = ("qwen/qwen3-4b", "google/gemma-3-12b", "openai/gpt-oss-20b",
                           "text-embedding-nomic-embed-text-v1.5")
VIEWPORT = {"width": 1440, "height": 960}


async def chat(http: aiohttp.ClientSession, url: str, model: str, tokens: int = 8,
               stream: bool = False) -> int:
    body = {"model": model, "max_tokens": tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Tell me about memory."}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status


async def embed(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(f"{url}/v1/embeddings", json={"model": EMBED, "input": "hi"}) as r:
        await r.read()
        return r.status


async def admin(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> None:
    async with http.post(f"{url}/proxy/{path}", json=body) as r:
        await r.read()


async def story(http: aiohttp.ClientSession, url: str, pace_s: float) -> None:
    async def traffic(model: str, n: int, **kw: object) -> None:
        for _ in range(n):
            await chat(http, url, model, **kw)  # type: ignore[arg-type]
            await asyncio.sleep(pace_s / n)

    await traffic(QWEN, 6)
    await asyncio.gather(traffic(GEMMA, 5), traffic(QWEN, 3))
    await asyncio.gather(*(embed(http, url) for _ in range(4)))
    await admin(http, url, "models/pin", {"model": QWEN, "pinned": True})
    # gpt-oss does not fit beside gemma: gemma is evicted to admit it
    await asyncio.gather(traffic(GPT, 4, stream=True), traffic(QWEN, 4))
    # a long stream holds gpt-oss; gemma waits for memory, and gets a 503 at the deadline
    holder = asyncio.create_task(chat(http, url, GPT, tokens=480, stream=True))
    await asyncio.sleep(0.5)
    await asyncio.gather(*(chat(http, url, GEMMA) for _ in range(2)))
    await holder
    # now gpt-oss is idle: gemma's next request evicts it
    await asyncio.gather(traffic(GEMMA, 6), traffic(QWEN, 4, stream=True))


async def main_async(out: Path, pace_s: float) -> None:
    from playwright.async_api import async_playwright

    # queue_timeout_s bounds a request's whole wait, its model's load included: loads (at most
    # 4.5 s here) fit in it, the 12 s stream holding gpt-oss does not (gemma's 503).
    emu = await start_emulator(load_time_scale=0.5, capacity_bytes=int(32e9),
                               options=EmulatorOptions(tokens_per_s=40.0))
    config = load_config({"upstream": {"url": emu.url},
                          "memory": {"sampler": "budget", "budget_gb": 20,
                                     "min_free_memory_gb": 1,
                                     "max_memory_usage_percent": 95},
                          "eviction": {"hold": 0, "queue_timeout_s": 6.0},
                          "storage": {"enabled": False}})
    served = await serve(create_app(config))
    url = served.url
    out.mkdir(parents=True, exist_ok=True)
    try:
        async with aiohttp.ClientSession() as http, async_playwright() as pw:
            browser = await launch(pw)
            page = await browser.new_page(viewport=VIEWPORT, color_scheme="light")
            await page.goto(f"{url}/ui/")
            await page.wait_for_selector("#models tbody tr")
            await story(http, url, pace_s)
            await page.click("button.unload >> nth=-1")       # the embedding model, from the UI
            await page.wait_for_selector(f'tr[data-model="{EMBED}"] td.state[data-state="unloaded"]')
            await page.click(".zoom button[data-hours='0.0833']")
            await page.wait_for_selector(".evict-mark")
            await page.screenshot(path=str(out / "dashboard-light.png"), full_page=True)
            dark = await browser.new_page(viewport=VIEWPORT, color_scheme="dark")
            await dark.goto(f"{url}/ui/")
            await dark.click(".zoom button[data-hours='0.0833']")
            await dark.wait_for_selector(".evict-mark")
            await dark.screenshot(path=str(out / "dashboard-dark.png"), full_page=True)
            await browser.close()
    finally:
        await served.close()
        await emu.close()
    print(f"wrote {out / 'dashboard-light.png'} and {out / 'dashboard-dark.png'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.screenshots", description=__doc__)
    ap.add_argument("--out", default="docs", help="directory for the PNGs (default: docs)")
    ap.add_argument("--pace-s", type=float, default=12.0,
                    help="seconds each phase of the story spreads its requests over")
    args = ap.parse_args(argv)
    asyncio.run(main_async(Path(args.out), args.pace_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
