"""`python -m proxy status --watch` redraws in place from the event stream."""
from __future__ import annotations

import asyncio
import threading

from proxy.status import CLEAR, watch

MODEL = "qwen/qwen3-4b"


def model_row(frame: str) -> str:
    return next(line for line in frame.splitlines() if line.startswith(MODEL))


class Screen:
    """A terminal stand-in: collects frames; ends the watch once the model shows loaded."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.first = threading.Event()
        self.stop = threading.Event()

    def write(self, text: str) -> None:
        self.frames.append(text)
        self.first.set()
        if " loaded" in model_row(text):
            self.stop.set()

    def flush(self) -> None:
        pass


async def test_watch_redraws_in_place_when_a_model_loads(proxy, http):
    screen = Screen()
    # refresh_s is long: every frame after the first comes from an event
    watching = asyncio.create_task(asyncio.to_thread(
        watch, proxy.url, screen, interval_s=0.01, refresh_s=60, stop=screen.stop))
    assert await asyncio.to_thread(screen.first.wait, 30)
    async with http.post(f"{proxy.url}/v1/chat/completions",
                         json={"model": MODEL, "max_tokens": 1, "messages": []}) as r:
        assert r.status == 200
    assert await watching == 0
    assert len(screen.frames) >= 2 and all(f.startswith(CLEAR) for f in screen.frames)
    assert "unloaded" in model_row(screen.frames[0])
    assert " loaded" in model_row(screen.frames[-1])
