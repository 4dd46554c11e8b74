"""Mistakes in a server's address that the configuration catches: a URL with the API path
the proxy adds, or without a scheme (refused by --check and at start alike, for upstream.url
and upstreams[].url), and a server on another machine whose memory would be sampled on this
one (warned of by --check and at start)."""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.configcheck import config_warnings
from proxy.configload import load_config
from proxy.errors import ConfigError

from .test_signals import ProxyProcess


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return info.value.problems


# -- the URL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,url,suffix,root", [
    ("llamacpp", "http://127.0.0.1:8081/v1", "/v1", "http://127.0.0.1:8081"),
    ("llamacpp", "http://127.0.0.1:8081/v1/", "/v1", "http://127.0.0.1:8081"),
    ("lmstudio", "http://localhost:1234/v1", "/v1", "http://localhost:1234"),
    ("lmstudio", "http://localhost:1234/api/v1", "/api/v1", "http://localhost:1234"),
    ("ollama", "http://127.0.0.1:11434/api", "/api", "http://127.0.0.1:11434"),
    ("ollama", "http://127.0.0.1:11434/V1/", "/v1", "http://127.0.0.1:11434"),
    ("openai", "https://gateway.example/api/v1", "/v1", "https://gateway.example/api"),
])
def test_a_url_ending_in_a_path_the_proxy_adds_is_refused_naming_the_address_to_give(
        kind, url, suffix, root):
    one = problems_of({"upstream": {"kind": kind, "url": url}})
    fleet = problems_of({"upstreams": [{"name": "a", "kind": kind, "url": url,
                                        "budget_gb": 8}]})
    said = (f"'{url}' ends in {suffix}, which the proxy adds itself (it asks ")
    assert len(one) == 1 and one[0].startswith(f"upstream.url: {said}"), one
    assert one[0].endswith(f"give the server's address without it, {root}")
    assert fleet == [one[0].replace("upstream.url:", "upstreams[0].url:")]


@pytest.mark.parametrize("kind,url", [
    ("llamacpp", "http://gateway.example/llama"),     # a reverse proxy's prefix is a path
    ("openai", "https://gateway.example/api"),
    ("llamacpp", "http://127.0.0.1:8081/api"),        # /api is Ollama's and LM Studio's only
])
def test_a_url_with_another_path_is_accepted(kind, url):
    assert load_config({"upstream": {"kind": kind, "url": url}}).upstream.url == url


def test_check_and_start_both_refuse_a_url_without_a_scheme(tmp_path, capsys):
    """It passed --check, then the start died with a traceback (unsupported scheme)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"kind": "llamacpp", "url": "127.0.0.1:42101"},
                                    "storage": {"enabled": False}}))
    expected = ("  upstream.url: '127.0.0.1:42101' is not an http(s) URL with a host: write "
                "http://127.0.0.1:42101")
    for argv in (["--config", str(path), "--check"], ["--config", str(path)]):
        assert main(argv, environ={}) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == ["configuration is invalid:", expected], err
    assert problems_of({"upstreams": [{"name": "a", "url": "localhost:1234"}]}) == [
        "upstreams[0].url: 'localhost:1234' is not an http(s) URL with a host: write "
        "http://localhost:1234"]


# -- memory sampled here for a server elsewhere ----------------------------------------------

REMOTE = {"upstream": {"kind": "llamacpp", "url": "http://192.0.2.10:8081",
                       "connect_timeout_s": 0.2, "probe_timeout_s": 0.5},
          "server": {"port": 0}, "storage": {"enabled": False}}
REMOTE_WARNING = ("upstream.url: 192.0.2.10 is not this machine as far as the proxy can tell, "
                  "but memory.sampler is 'local': the proxy would manage this machine's "
                  "memory, not that server's. Set memory.sampler: budget and memory.budget_gb "
                  "to the memory its models may use there (ignore this if the name is this "
                  "machine's)")


def test_check_warns_of_a_server_elsewhere_whose_memory_would_be_sampled_here(tmp_path,
                                                                              capsys):
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(REMOTE))
    assert main(["--config", str(path), "--check"], environ={}) == 0
    assert capsys.readouterr().out.splitlines() == [f"warning: {REMOTE_WARNING}",
                                                    "configuration is valid"]
    for quiet in ({"upstream": {"url": "http://192.0.2.10:8081"},
                   "memory": {"sampler": "budget", "budget_gb": 24}},
                  {"upstream": {"url": "http://localhost:1234"}},
                  {"upstream": {"url": "http://host.docker.internal:1234"}},
                  # nothing is loaded on a plain OpenAI-compatible server: no memory managed
                  {"upstream": {"url": "https://api.example.com", "kind": "openai"}}):
        assert not any("memory.sampler is 'local'" in w
                       for w in config_warnings(load_config(quiet))), quiet


async def test_the_start_warns_of_it_too(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(REMOTE))
    proc = await ProxyProcess.start(path)
    try:
        line = await proc.wait_for_line("memory.sampler is 'local'")
    finally:
        await proc.stop()
    assert " WARNING proxy: " in line and line.endswith(REMOTE_WARNING)
