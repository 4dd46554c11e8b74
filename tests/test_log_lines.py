"""What the operator's log says, and at which level: critical memory pressure once an episode
(and when it ends), a pressure change at WARNING only into high or critical, and a reload that
names the keys it changed without their secrets."""
from __future__ import annotations

import logging

from proxy.engine.clock import ManualClock
from proxy.server.reload import RELOADER

from .conftest import proxy_config
from .test_observability import monitored
from .fakes import SettableSampler

CRITICAL_LINE = "critical memory pressure; evicting idle models regardless of residency"


def engine_lines(caplog, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "proxy.engine" and (level is None or r.levelno == level)]


async def test_critical_pressure_is_an_error_once_an_episode_and_its_end_is_said(
        emulator, caplog):
    caplog.set_level(logging.DEBUG, logger="proxy.engine")
    clock, sampler = ManualClock(), SettableSampler(total_gb=32, available_gb=30)
    mgr, _ = await monitored(emulator.url, clock, sampler)
    sampler.set_available(1)                   # nothing the proxy could evict: it stays
    for _ in range(4):                         # four monitoring ticks
        clock.advance(30)
        await mgr.sample_memory()
        await mgr.core.relieve_pressure()
    assert engine_lines(caplog, logging.ERROR) == [CRITICAL_LINE]
    assert sum("critical memory pressure for" in line
               for line in engine_lines(caplog, logging.DEBUG)) == 3
    sampler.set_available(20)
    await mgr.sample_memory()
    await mgr.core.relieve_pressure()
    assert "critical memory pressure over after 90s (pressure low)" in \
        engine_lines(caplog, logging.INFO)
    sampler.set_available(1)                   # a new episode is said again
    await mgr.sample_memory()
    await mgr.core.relieve_pressure()
    assert engine_lines(caplog, logging.ERROR) == [CRITICAL_LINE, CRITICAL_LINE]
    await mgr.cleanup()


async def test_a_pressure_change_warns_only_on_the_way_into_high_or_critical(emulator, caplog):
    caplog.set_level(logging.INFO, logger="proxy.engine")
    sampler = SettableSampler(total_gb=32, available_gb=30)      # low
    mgr, _ = await monitored(emulator.url, ManualClock(), sampler)
    levels = {}
    for available_gb, to in ((12, "normal"), (5, "high"), (1, "critical"), (12, "normal"),
                             (30, "low")):
        sampler.set_available(available_gb)
        await mgr.sample_memory()
        (record,) = [r for r in caplog.records if f"→ {to} (" in r.getMessage()]
        levels[record.getMessage().split(" (")[0]] = record.levelname
        caplog.clear()
    assert levels == {"memory pressure low → normal": "INFO",
                      "memory pressure normal → high": "WARNING",
                      "memory pressure high → critical": "WARNING",
                      "memory pressure critical → normal": "INFO",
                      "memory pressure normal → low": "INFO"}
    await mgr.cleanup()


async def test_no_pressure_is_logged_where_memory_is_not_managed(make_emulator, caplog):
    """LM Studio before 0.4.0 loads by its own JIT: the proxy manages no memory there (its
    views show no pressure), so its log must not tell of a level either, nor warn of one."""
    from proxy.emulator import EmulatorOptions
    old = await make_emulator(options=EmulatorOptions(version="0.3"))
    caplog.set_level(logging.INFO, logger="proxy.engine")
    sampler = SettableSampler(total_gb=32, available_gb=30)
    mgr, _ = await monitored(old.url, ManualClock(), sampler)
    assert not mgr.core.memory_managed
    for available_gb in (5, 1, 30):
        sampler.set_available(available_gb)
        await mgr.sample_memory()
    assert not [line for line in engine_lines(caplog) if "memory pressure" in line]
    await mgr.cleanup()


SECRETS = ("adm-old", "adm-new", "sk-old", "sk-new", "hook-secret", "pw-1")


async def test_a_reload_names_the_keys_it_changed_never_a_secret(make_proxy, emulator,
                                                               caplog):
    caplog.set_level(logging.INFO, logger="proxy.reload")

    def config(**changes):
        return proxy_config(emulator.url, **{
            "auth.admin_token": "adm-old", "auth.keys": [{"name": "alice", "key": "sk-old"}],
            "health.webhook_url": "http://u:pw-1@127.0.0.1:9/hook-secret", **changes})
    box = {"next": config()}
    proxy = await make_proxy(emulator.url, config=box["next"],
                             app_kwargs={"config_source": lambda: box["next"]})
    box["next"] = config(**{
        "auth.admin_token": "adm-new", "auth.keys": [{"name": "alice", "key": "sk-new"}],
        "health.webhook_url": "http://u:pw-1@127.0.0.1:9/hook-secret-2",
        "upstream.api_token": "sk-new",                     # needs a restart
        "memory.budget_gb": 80, "eviction.policy": "lru",
        "models": {"qwen/qwen3-4b": {"priority": 9}}})
    assert proxy.app[RELOADER].reload(proxy.app)["reloaded"]
    (line,) = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert line.startswith("configuration reloaded; changed: ")
    for change in ("auth.keys", "auth.admin_token", "health.webhook_url",
                   "memory.budget_gb (64.0 → 80.0)", "eviction.policy ('cost-aware' → 'lru')",
                   "models.qwen/qwen3-4b (added)"):
        assert change in line, change
    assert "restart to take effect: upstream.api_token" in line
    assert not any(secret in line for secret in SECRETS)
    caplog.clear()
    assert proxy.app[RELOADER].reload(proxy.app)["reloaded"]
    assert [r.getMessage() for r in caplog.records] == [
        "configuration reloaded; nothing changed; these changes need a restart to take "
        "effect: upstream.api_token"]


async def test_an_upstream_that_comes_back_is_said_as_its_loss_was(make_emulator, caplog):
    caplog.set_level(logging.INFO, logger="proxy.engine")
    emu = await make_emulator()
    port = int(emu.url.rsplit(":", 1)[1])
    clock = ManualClock()
    mgr, _ = await monitored(emu.url, clock)
    await emu.close()
    await mgr.core.reconcile()
    assert [line for line in engine_lines(caplog, logging.WARNING)
            if line.startswith("upstream unavailable: ")]
    clock.advance(42)
    await make_emulator(port=port)
    await mgr.core.reconcile()
    assert "upstream reachable again after 42s" in engine_lines(caplog, logging.INFO)
    await mgr.core.reconcile()   # said once, not at every look
    assert sum("reachable again" in line for line in engine_lines(caplog)) == 1
    await mgr.cleanup()
