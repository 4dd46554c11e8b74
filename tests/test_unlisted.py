"""A model name in the configuration that the server does not list — a pin or other settings
under `models:`, a `tasks:` entry, a group's member — is warned of once the server has answered
with its list, naming the entry, once per entry (not at every reconcile); an entry a reload adds
is judged at the next. A fleet judges a host-scoped entry by that host's list and any other by
every host that may hold the model, once each has answered. (--check cannot know the list.)"""
from __future__ import annotations

import logging
import socket

from proxy.configload import load_config
from proxy.emulator.catalog import GB, CatalogModel
from proxy.server.keys import CONFIG

from .conftest import proxy_config

MODEL = "qwen/qwen3-4b"
WHY = "(a typo, or not downloaded there?); until it is, this entry has no effect"


def unlisted(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "proxy.config" and "is not a model" in r.getMessage()]


async def test_entries_naming_a_model_the_server_lacks_are_warned_of_once(
        emulator, make_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.config")
    config = proxy_config(emulator.url, **{
        "models": {MODEL: {"pinned": True, "aliases": ["fast"]},
                   "no/such-model": {"pinned": True}},
        "tasks": {"coding": ["no/other", MODEL], "chat": [{"model": "fast"}]},
        "groups": [{"name": "pair", "members": ["fast", "ghost"]}]})
    proxy = await make_proxy(emulator.url, config=config)   # started: reconciled once
    assert unlisted(caplog) == [
        f"models.no/such-model: 'no/such-model' is not a model the server lists {WHY}",
        f"tasks.coding[0]: 'no/other' is not a model the server lists {WHY}",
        f"groups[0].members: 'ghost' is not a model the server lists {WHY}"]
    await proxy.engine.reconcile()
    await proxy.engine.reconcile()
    assert len(unlisted(caplog)) == 3          # once, not at every reconcile
    caplog.clear()
    proxy.app[CONFIG].swap(proxy_config(emulator.url, **{   # as a reload does
        "models": {"no/such-model": {"pinned": True}}, "tasks": {"coding": ["no/third"]}}))
    await proxy.engine.reconcile()
    assert unlisted(caplog) == [f"tasks.coding[0]: 'no/third' is not a model the server "
                                f"lists {WHY}"]


async def test_nothing_is_said_while_the_server_has_not_answered(make_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.config")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"     # nothing listens there
    proxy = await make_proxy(url, **{"models": {"no/such-model": {"pinned": True}}})
    await proxy.engine.reconcile()
    assert unlisted(caplog) == []


def catalog(*keys: str) -> list[CatalogModel]:
    return [CatalogModel(key=k, size_bytes=GB, memory_bytes=GB, load_time_s=0.0) for k in keys]


async def test_a_fleet_judges_host_scoped_entries_by_that_host_and_others_by_every_host(
        make_emulator, make_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.config")
    one = await make_emulator(catalog=catalog("lab/a"))
    two = await make_emulator(catalog=catalog("lab/b"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    hosts = [{"name": "one", "url": one.url, "budget_gb": 8},
             {"name": "two", "url": two.url, "budget_gb": 8},
             {"name": "down", "url": down, "budget_gb": 8, "models": ["lab/*"]}]
    config = load_config({
        "upstreams": hosts, "eviction": {"hold": 0}, "storage": {"enabled": False},
        "models": {"lab/a": {"pinned": True},                  # listed by one: fine
                   "lab/b": {"host": "one", "pinned": True},   # two lists it, one does not
                   "gone/x": {}},                              # down may not hold it
        "tasks": {"chat": ["lab/zzz",                          # down has not answered
                           {"model": "lab/a", "host": "two"}]}})
    await make_proxy("", config=config)
    assert sorted(unlisted(caplog)) == [     # in the order the hosts answered: sorted
        f"models.gone/x: 'gone/x' is not a model any host lists {WHY}",
        f"models.lab/b: 'lab/b' is not a model host 'one' lists {WHY}",
        f"tasks.chat[1]: 'lab/a' is not a model host 'two' lists {WHY}"]
