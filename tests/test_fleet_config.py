"""`--check` on the keys that name hosts: aliases resolved to their model key, a host's patterns
checked wherever a host is named for a model, one server per host, and host names where there
are no hosts."""
from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.configload import load_config
from proxy.configcheck import config_warnings

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
        "upstreams[1].url: 'http://127.0.0.1:9' and upstreams[0].url 'http://127.0.0.1:9/' "
        "name one server; each host is a server of its own"]
    assert problems_of({"upstreams": [{"name": "a"}, {"name": "b"}]}) == [
        "upstreams[1].url: 'http://127.0.0.1:1234' (the default, for a host that sets no url) "
        "and upstreams[0].url 'http://127.0.0.1:1234' (the default, for a host that sets no "
        "url) name one server; each host is a server of its own"]
    assert problems_of({"upstreams": [{"name": "a", "url": "http://h.lan:80",
                                       "budget_gb": 8},
                                      {"name": "b", "url": "HTTP://H.lan", "budget_gb": 8}]}
                       )[0].startswith("upstreams[1].url: 'HTTP://H.lan' and upstreams[0].url")


@pytest.mark.parametrize("first, second", [
    ("http://127.0.0.1:9", "http://localhost:9/"),
    ("http://[::1]:9", "http://127.0.0.1:9"),
    ("http://LOCALHOST:9", "http://[0:0:0:0:0:0:0:1]:9/"),
    ("https://localhost", "https://127.0.0.1:443"),
    ("http://localhost.:9", "http://127.0.0.1:9")])     # (on this machine: no budget asked)
def test_two_spellings_of_the_loopback_are_one_server(first, second):
    assert problems_of({"upstreams": [{"name": "a", "url": first},
                                      {"name": "b", "url": second},
                                      {"name": "c", "url": "http://127.0.0.2:9"}]}) == [
        f"upstreams[1].url: '{second}' and upstreams[0].url '{first}' name one server; "
        "each host is a server of its own"]


def test_a_host_named_on_a_single_server_is_a_problem():
    why = ("names a host, but there is no upstreams: list (one server, upstream:, has no host "
           "name): remove it, or list the servers under upstreams:")
    assert problems_of({"placement": {"native_host": "a"},
                        "models": {QWEN: {"host": "b"}},
                        "tasks": {"coding": [QWEN, {"model": QWEN, "host": "c"}]}}) == [
        f"placement.native_host: 'a' {why}",
        f"models.{QWEN}.host: 'b' {why}",
        f"tasks.coding[1].host: 'c' {why}"]


# -- footprints against each host's own memory ------------------------------------------------

def budget_hosts(*hosts: tuple[str, float, list[str] | None]) -> list[dict[str, Any]]:
    return [{"name": name, "url": f"http://10.0.0.{i + 1}:1234", "budget_gb": gb,
             **({"models": patterns} if patterns else {})}
            for i, (name, gb, patterns) in enumerate(hosts)]


def test_a_footprint_no_host_can_load_is_warned_naming_each_host_and_its_budget():
    c = load_config({"memory": {"sampler": "budget", "budget_gb": 16},   # no host's budget
                     "upstreams": budget_hosts(("a", 16, None), ("b", 24, None)),
                     "models": {"lab/mid": {"footprint_gb": 14},       # fits b
                                "lab/big": {"footprint_gb": 20}}})     # fits neither
    assert config_warnings(c) == [
        "models.lab/big.footprint_gb: 20 GB can never load: it is above the ceiling for one "
        "model on every host that may hold it: 'a' 12.0 GB of 16.0 GB (upstreams[0].budget_gb), "
        "'b' 19.2 GB of 24.0 GB (upstreams[1].budget_gb) (memory.max_memory_usage_percent, "
        "memory.min_free_memory_gb)"]


def test_a_model_is_judged_on_the_hosts_its_patterns_allow():
    c = load_config({"memory": {"sampler": "budget", "budget_gb": 48},
                     "upstreams": budget_hosts(("small", 16, ["qwen/*"]),
                                               ("big", 48, ["lab/*"])),
                     "models": {"qwen/huge": {"footprint_gb": 14},     # only small may hold it
                                "lab/huge": {"footprint_gb": 14}}})
    assert config_warnings(c) == [
        "models.qwen/huge.footprint_gb: 14 GB can never load: it is above the ceiling for one "
        "model on every host that may hold it: 'small' 12.0 GB of 16.0 GB "
        "(upstreams[0].budget_gb) (memory.max_memory_usage_percent, memory.min_free_memory_gb); "
        "upstreams[1].models keeps it off 'big'"]


def test_footprints_above_every_hosts_memory_are_problems_not_the_fleets_memory():
    hosts = budget_hosts(("a", 16, None), ("b", 48, None))
    c = load_config({"memory": {"sampler": "budget", "budget_gb": 16}, "upstreams": hosts,
                     "models": {"lab/x": {"footprint_gb": 30, "pinned": True},
                                "lab/y": {"footprint_gb": 10, "pinned": True}}})
    assert config_warnings(c) == []               # b holds x; each pin may stay on another
    assert problems_of({"upstreams": hosts, "models": {
        "lab/z": {"footprint_gb": 60},
        "lab/p": {"footprint_gb": 10, "pinned": True, "host": "a"},
        "lab/q": {"footprint_gb": 10, "pinned": True, "host": "a"}}}) == [
        "models.lab/z.footprint_gb: 60 exceeds the memory of every host that may hold it "
        "('a' 16.0 GB (upstreams[0].budget_gb), 'b' 48.0 GB (upstreams[1].budget_gb))",
        "upstreams[0]: the footprints of the models pinned on 'a' add up to 20 GB, more than "
        "its memory (16.0 GB, upstreams[0].budget_gb)"]


def test_check_warns_per_host_in_a_fleet(tmp_path, capsys):
    from proxy.cli import main
    path = tmp_path / "proxy.yaml"
    path.write_text("upstreams:\n"
                    "  - {name: a, url: 'http://10.0.0.1:1234', budget_gb: 16}\n"
                    "  - {name: b, url: 'http://10.0.0.2:1234', budget_gb: 24}\n"
                    "models: {lab/big: {footprint_gb: 20}}\n")
    assert main(["--config", str(path), "--check"], environ={}) == 0
    out = capsys.readouterr().out
    assert "warning: models.lab/big.footprint_gb: 20 GB can never load" in out
    assert "'b' 19.2 GB of 24.0 GB (upstreams[1].budget_gb)" in out


def test_a_host_without_a_budget_is_judged_on_this_machines_memory():
    problems = problems_of({"upstreams": [{"name": "here", "url": "http://127.0.0.1:1234"}],
                            "models": {"lab/z": {"footprint_gb": 100_000}}})
    assert len(problems) == 1 and problems[0].startswith(
        "models.lab/z.footprint_gb: 100000 exceeds the memory of every host that may hold it "
        "('here' ") and problems[0].endswith(" GB (this machine's memory))")


TWO_BUDGETS = [{"name": "a", "url": "http://10.0.0.1:1234", "budget_gb": 16},
               {"name": "b", "url": "http://10.0.0.2:1234", "budget_gb": 48, "models": ["lab/*"]}]
PAIR = {"name": "pair", "members": ["lab/x", "lab/y"]}


def test_a_together_group_is_judged_on_the_hosts_that_may_hold_it_whole():
    """18 GB together fits only 'b' (its ceiling 38.4 GB): valid, although the fleet's memory:
    (no budget) and 'a' could not hold it; too big for 'b' too, it is refused naming 'b' only;
    a group no host may hold whole is refused for that."""
    fits = {"upstreams": TWO_BUDGETS, "groups": [PAIR],
            "models": {"lab/x": {"footprint_gb": 10}, "lab/y": {"footprint_gb": 8}}}
    assert load_config(fits).groups[0].name == "pair"
    too_big = {**fits, "models": {"lab/x": {"footprint_gb": 30}, "lab/y": {"footprint_gb": 9}}}
    assert problems_of(too_big) == [
        "groups[0]: 'pair' can never be resident at once: its members' "
        "models.<key>.footprint_gb add up to 39 GB (lab/x 30 + lab/y 9), more than models may "
        "take at once, on 'a': 12.0 GB of 16.0 GB (upstreams[0].budget_gb), on 'b': 38.4 GB of "
        "48.0 GB (upstreams[1].budget_gb); make it exclusive, or change those (models' share: "
        "memory.max_memory_usage_percent, memory.min_free_memory_gb)"]
    split = {"upstreams": TWO_BUDGETS, "groups": [{"name": "split", "members": ["lab/x", "q/z"]}]}
    assert problems_of({**split, "upstreams": [TWO_BUDGETS[1], {**TWO_BUDGETS[0],
                                                                "models": ["q/*"]}]}) == [
        "groups[0]: 'split' can never be resident at once: no host's upstreams[].models "
        "patterns allow all of its members; change those, or make it exclusive"]


def test_a_memory_models_may_take_nothing_of_is_a_problem_on_one_server_and_per_host():
    assert problems_of({"memory": {"sampler": "budget", "budget_gb": 8,
                                   "min_free_memory_gb": 50}}) == [
        "memory: models may take nothing of 8.0 GB (memory.budget_gb): min_free_memory_gb 50, "
        "max_memory_usage_percent 80; every load would be refused"]
    assert problems_of({"memory": {"min_free_memory_gb": 7}, "upstreams": [
        {"name": "a", "url": "http://10.0.0.1:1234", "budget_gb": 8},
        {"name": "b", "url": "http://10.0.0.2:1234", "budget_gb": 6}]}) == [
        "memory: models may take nothing of 6.0 GB (upstreams[1].budget_gb) on 'b': "
        "min_free_memory_gb 7, max_memory_usage_percent 80; every load would be refused"]


def test_a_memory_whose_ceiling_is_exactly_nothing_is_a_problem():
    assert problems_of({"memory": {"sampler": "budget", "budget_gb": 8,
                                   "min_free_memory_gb": 8}}) == [
        "memory: models may take nothing of 8.0 GB (memory.budget_gb): min_free_memory_gb 8, "
        "max_memory_usage_percent 80; every load would be refused"]


def test_a_footprint_that_fit_may_shrink_is_not_judged_against_a_hosts_memory():
    """With fit.min_context_length, footprint_gb is the need at the configured context."""
    hosts = budget_hosts(("a", 16, None))
    fits = {"footprint_gb": 30, "fit": {"min_context_length": 4096}}
    c = load_config({"upstreams": hosts, "models": {"lab/x": fits}})
    assert config_warnings(c) == []


def test_a_host_that_samples_its_own_memory_is_not_judged_on_its_budget_gb():
    """sampler: local reads this machine's memory; budget_gb is then not its memory."""
    hosts = [{"name": "here", "url": "http://127.0.0.1:1234", "sampler": "local",
              "budget_gb": 1}]
    c = load_config({"upstreams": hosts, "models": {"lab/x": {"footprint_gb": 2}}})
    assert c.upstreams[0].budget() is None and config_warnings(c) == []


def test_a_together_group_with_one_known_footprint_is_left_to_that_models_own_check():
    """One member's footprint above every ceiling is that model's warning (it can never
    load), not a group problem that refuses the config."""
    c = load_config({"upstreams": budget_hosts(("a", 16, None)),
                     "groups": [{"name": "pair", "members": ["lab/x", "lab/y"]}],
                     "models": {"lab/x": {"footprint_gb": 14}}})
    assert [w.split(":")[0] for w in config_warnings(c)] == ["models.lab/x.footprint_gb"]
