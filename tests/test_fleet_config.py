"""`--check` on the keys that name hosts: aliases resolved to their model key, a host's patterns
checked wherever a host is named for a model, one server per host, and host names where there
are no hosts."""
from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, load_config

QWEN = "qwen/qwen3-4b"
HOSTS = [{"name": "small", "url": "http://127.0.0.1:1", "models": ["qwen/*"]},
         {"name": "big", "url": "http://127.0.0.1:2"}]


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    return err.value.problems


def test_a_task_naming_a_model_by_its_alias_is_checked_against_the_model_key():
    c = load_config({"upstreams": HOSTS, "models": {QWEN: {"aliases": ["fast"]}},
                     "tasks": {"coding": [{"model": "fast", "host": "small"}]}})
    assert c.preferred_host(QWEN) == "small"     # the fleet asks by key
    assert problems_of({
        "upstreams": HOSTS, "models": {"lab/x": {"aliases": ["odd"]}},
        "tasks": {"coding": [{"model": "odd", "host": "small"}]}}) == [
        "tasks.coding[0].host: host 'small' may not hold 'lab/x' (alias 'odd') (its models: "
        "qwen/*)"]


def test_one_model_named_by_key_and_by_alias_for_two_hosts_is_a_problem():
    assert problems_of({
        "upstreams": HOSTS, "models": {QWEN: {"aliases": ["fast"]}},
        "tasks": {"coding": [{"model": "fast", "host": "big"}],
                  "chat": [{"model": QWEN, "host": "small"}]}}) == [
        f"tasks.chat[0].host: 'small' for '{QWEN}', but tasks.coding[0].host names 'big'; "
        "a model has one preferred host"]


def test_a_models_host_whose_patterns_exclude_the_model_is_a_problem():
    assert problems_of({"upstreams": HOSTS, "models": {"lab/x": {"host": "small"}}}) == [
        "models.lab/x.host: host 'small' may not hold 'lab/x' (its models: qwen/*)"]
    assert load_config({"upstreams": HOSTS,
                        "models": {QWEN: {"host": "small"}}}).preferred_host(QWEN) == "small"


def test_two_hosts_on_one_server_are_a_problem_defaults_included():
    assert problems_of({"upstreams": [
        {"name": "a", "url": "http://127.0.0.1:9/"},
        {"name": "b", "url": "http://127.0.0.1:9"},
        {"name": "c", "url": "http://127.0.0.1:10"}]}) == [
        "upstreams[1].url: 'http://127.0.0.1:9' is upstreams[0]'s too; each host is a "
        "server of its own"]
    assert problems_of({"upstreams": [{"name": "a"}, {"name": "b"}]}) == [
        "upstreams[1].url: 'http://127.0.0.1:1234' (the default, for a host that sets no url) "
        "is upstreams[0]'s too; each host is a server of its own"]
    assert problems_of({"upstreams": [{"name": "a", "url": "http://h.lan:80",
                                       "budget_gb": 8},
                                      {"name": "b", "url": "http://H.lan", "budget_gb": 8}]}
                       )[0].startswith("upstreams[1].url: 'http://H.lan' is upstreams[0]'s")


def test_a_host_named_on_a_single_server_is_a_problem():
    why = ("names a host, but there is no upstreams: list (one server, upstream:, has no host "
           "name): remove it, or list the servers under upstreams:")
    assert problems_of({"placement": {"native_host": "a"},
                        "models": {QWEN: {"host": "b"}},
                        "tasks": {"coding": [QWEN, {"model": QWEN, "host": "c"}]}}) == [
        f"placement.native_host: 'a' {why}",
        f"models.{QWEN}.host: 'b' {why}",
        f"tasks.coding[1].host: 'c' {why}"]
