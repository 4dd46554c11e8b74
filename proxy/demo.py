"""`python -m proxy --demo`: the emulated server the demo starts, and the banner it prints."""
from __future__ import annotations

from typing import Any

from .config import Config


async def start_demo_emulator(flavor: str, port: int) -> Any:
    if flavor == "ollama":
        from .emulator.ollama import start_ollama_emulator
        return await start_ollama_emulator(load_time_scale=0.25, vram_bytes=int(24e9),
                                           port=port)
    if flavor == "llamacpp":   # as recommended: the proxy alone loads and evicts
        from .emulator.catalog import load_catalog
        from .emulator.llamacpp import start_router_emulator
        return await start_router_emulator(load_catalog(), load_time_scale=0.25, port=port,
                                           tokens_per_s=30.0, models_max=0, autoload=False,
                                           files=True)
    from .emulator import EmulatorOptions, start_emulator
    return await start_emulator(load_time_scale=0.25, capacity_bytes=int(24e9), port=port,
                                options=EmulatorOptions(tokens_per_s=30.0))


DEMO_SERVER_NAMES = {"lmstudio": "LM Studio emulator", "ollama": "Ollama emulator",
                     "llamacpp": "llama.cpp router emulator",
                     "openai": "OpenAI-compatible server (the LM Studio emulator's /v1)"}


def demo_banner(url: str, upstream_url: str, config: Config, flavor: str = "lmstudio",
                 fleet: str | None = None) -> str:
    """Examples that work as printed: the SDK's install line first, and with client keys the
    key read from PROXY_API_KEY (the banner never prints a secret)."""
    keyed = bool(config.auth.keys)
    header = " -H \"Authorization: Bearer $PROXY_API_KEY\"" if keyed else ""
    sdk_key = "$PROXY_API_KEY" if keyed else "lm-studio"
    key_line = ("  export PROXY_API_KEY=...   # one of the client keys in auth.keys\n\n"
                if keyed else "")
    where = f"({DEMO_SERVER_NAMES[flavor]} on {upstream_url})"
    if fleet is not None:   # the hosts of a demo fleet, one line each
        where = f"(a fleet of {DEMO_SERVER_NAMES[flavor]}s, one per host)\n\nHosts:\n{fleet}"
    return f"""
Proxy ready on {url}  {where}

Try it:
{key_line}  curl {url}/v1/chat/completions{header} -H 'Content-Type: application/json' \\
    -d '{{"model": "qwen/qwen3-4b", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  pip install openai   # the OpenAI SDK, once
  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{sdk_key}'); \\
print(c.chat.completions.create(model='qwen/qwen3-4b', messages=[{{'role': 'user', 'content': 'Hello'}}]).choices[0].message.content)"

Watch it work:  {url}/ui  (dashboard)   curl -N{header} {url}/proxy/events   curl{header} {url}/metrics
Stop with Ctrl-C.
"""
