"""Headless Chromium for the dashboard's tests and screenshots: the system's Chromium (Debian's
`chromium` package) driven by Playwright; nothing is downloaded at run time."""
from __future__ import annotations

import os
import shutil
from typing import Any

# Flags that keep Chromium quiet and self-contained in a container: no sandbox (root), no GPU,
# no background traffic to Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """$CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


async def launch(playwright: Any) -> Any:
    """A headless browser with a fresh profile (Playwright gives each launch its own)."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("no Chromium found: apt-get install chromium (or set CHROMIUM)")
    return await playwright.chromium.launch(executable_path=path, headless=True,
                                            args=CHROMIUM_ARGS)
