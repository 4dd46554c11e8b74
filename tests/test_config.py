"""Configuration: every problem reported with its path; --check exits 0 or 2; env overrides."""
from __future__ import annotations

import pytest

from proxy.cli import main
from proxy.configload import load_config
from proxy.configfile import read_config_file
from proxy.errors import ConfigError


def problems_of(raw):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return info.value.problems


def test_defaults_keep_the_original_names_and_values():
    c = load_config({})
    assert c.memory.max_memory_usage_percent == 80.0 and c.memory.min_free_memory_gb == 4.0
    assert c.memory.monitoring_interval == 30.0 and c.eviction.model_timeout_hours == 2.0
    assert c.upstream.url == "http://127.0.0.1:1234"


def test_every_error_is_listed_with_its_path():
    problems = problems_of({
        "models": {"qwen/qwen3-8b": {"priority": 12, "colour": "red"}},
        "eviction": {"policy": "random", "model_timeout_hours": -1},
        "memory": {"min_free_memory_gb": "four"},
        "extra": 1})
    assert "models.qwen/qwen3-8b.priority: must be 1..10 (got 12)" in problems
    assert any(p.startswith("models.qwen/qwen3-8b.colour: unknown key") for p in problems)
    assert any(p.startswith("eviction.policy: must be one of lru, priority, cost-aware")
               for p in problems)
    assert "eviction.model_timeout_hours: must be >= 0 (got -1.0)" in problems
    assert any(p.startswith("memory.min_free_memory_gb: must be a number") for p in problems)
    assert any(p.startswith("extra: unknown key") for p in problems)
    assert len(problems) == 6


@pytest.mark.parametrize("raw,expected", [
    ({"models": {"a/b": {"ttl_s": -5}}}, "models.a/b.ttl_s: must be > 0 (got -5.0)"),
    ({"models": {"a/b": {"pinned": "yes"}}}, "models.a/b.pinned: must be true or false"),
    ({"models": {"a/b": {"aliases": "x,y"}}}, "models.a/b.aliases: must be a list"),
    ({"memory": {"sampler": "budget"}}, "memory.budget_gb: required when memory.sampler"),
    ({"memory": {"sampler": "budget", "budget_gb": 10},
      "models": {"a/b": {"footprint_gb": 11}}}, "models.a/b.footprint_gb: 11 exceeds total"),
    ({"memory": {"sampler": "budget", "budget_gb": 10},
      "models": {"a/b": {"pinned": True, "footprint_gb": 6},
                 "c/d": {"pinned": True, "footprint_gb": 6}}}, "models: pinned footprints"),
    ({"models": {"a/b": {"aliases": ["x"]}, "c/d": {"aliases": ["x"]}}},
     "models.c/d.aliases: 'x' is already an alias"),
    ({"native": {"evict": "sometimes"}},
     "native.evict: must be one of never, after_disconnect, always"),
    ({"native": {"max_frame_bytes": 10}}, "native.max_frame_bytes: must be >= 1024"),
    ({"upstream": {"probe_timeout_s": 0}}, "upstream.probe_timeout_s: must be > 0"),
    ({"upstreams": [{"name": "a", "url": "http://127.0.0.1:1", "probe_timeout_s": -1}]},
     "upstreams[0].probe_timeout_s: must be > 0"),
])
def test_specific_refusals(raw, expected):
    assert any(p.startswith(expected) for p in problems_of(raw)), problems_of(raw)


def test_check_flag_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("upstream:\n  url: http://127.0.0.1:1234\nmodels:\n  a/b:\n    priority: 9\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a/b:\n    priority: 12\neviction:\n  policy: nope\n")
    assert main(["--config", str(good), "--check"], environ={}) == 0
    assert main(["--config", str(bad), "--check"], environ={}) == 2
    err = capsys.readouterr().err
    assert "models.a/b.priority: must be 1..10 (got 12)" in err and "eviction.policy" in err


def test_unreadable_and_invalid_yaml_are_reported(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    assert main(["--config", str(broken), "--check"], environ={}) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), "--check"], environ={}) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "cannot read" in err


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    from proxy.cli import build_parser, resolve_config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proxy.yaml").write_text("server:\n  port: 9000\n  host: 0.0.0.0\n"
                                          "  allow_unauthenticated: true\n")
    env = {"PROXY_PORT": "9100", "PROXY_UPSTREAM": "http://10.0.0.5:1234"}
    c = resolve_config(build_parser().parse_args([]), env)
    assert (c.server.host, c.server.port, c.upstream.url) == ("0.0.0.0", 9100,
                                                              "http://10.0.0.5:1234")
    c = resolve_config(build_parser().parse_args(["--port", "9200"]), env)
    assert c.server.port == 9200
    with pytest.raises(ConfigError):
        resolve_config(build_parser().parse_args([]), {"PROXY_PORT": "abc"})


def test_shipped_proxy_yaml_is_valid_and_documents_every_key():
    from pathlib import Path
    import dataclasses
    import yaml
    from proxy.config import Config, HostConfig
    path = Path(__file__).parent.parent / "proxy.yaml"
    assert main(["--config", str(path), "--check"], environ={}) == 0
    text = path.read_text()
    for section in dataclasses.fields(Config):
        if section.name in ("models", "tasks", "groups"):
            continue
        kind = HostConfig if section.name == "upstreams" else \
            type(getattr(Config(), section.name))
        for f in dataclasses.fields(kind):
            assert f"{f.name}:" in text, f"proxy.yaml does not document {section.name}.{f.name}"
    assert yaml.safe_load(text)


def test_the_forwarding_client_is_fast_unless_aiohttp_is_chosen():
    assert load_config({}).upstream.client == "fast"
    assert load_config({"upstream": {"client": "aiohttp"}}).upstream.client == "aiohttp"
    assert problems_of({"upstream": {"client": "curl"}}) == [
        "upstream.client: must be one of fast, aiohttp (got 'curl')"]


def test_an_unquoted_off_for_the_hold_is_off_not_a_type_error(tmp_path):
    """YAML 1.1 reads `hold: off` as false; the user meant the word."""
    path = tmp_path / "proxy.yaml"
    path.write_text("eviction:\n  hold: off\n")
    assert load_config(read_config_file(path)).eviction.hold == "off"
