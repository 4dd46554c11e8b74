"""The original design's Quick Start, against the emulator, through the library API only; the
history it keeps across a restart; its constructor's checks."""
from __future__ import annotations

import pytest

from proxy import ModelMemoryManager, ModelStatus
from proxy.config import UpstreamConfig
from proxy.configload import load_config, replace_config
from proxy.upstream.lmstudio import LMStudioUpstream


async def test_quick_start_flow(emulator, private_home):
    upstream = LMStudioUpstream(UpstreamConfig(url=emulator.url))
    async with ModelMemoryManager(max_memory_usage_percent=90, min_free_memory_gb=1,
                                  upstream=upstream, owns_upstream=True) as manager:
        ok = await manager.ensure_models_available(
            ["qwen/qwen3-4b", "text-embedding-nomic-embed-text-v1.5"], priority=7)
        assert ok == {"qwen/qwen3-4b": True, "text-embedding-nomic-embed-text-v1.5": True}
        manager.record_model_usage("qwen/qwen3-4b", latency=0.8, success=True, tokens_used=120)
        manager.record_model_usage("qwen/qwen3-4b", latency=1.2, success=False)
        stats = manager.get_memory_stats()
        assert stats["system_memory"]["total_gb"] > 0
        assert stats["model_counts"]["loaded"] == 2
        top = stats["top_models_by_usage"][0]
        assert top["model"] == "qwen/qwen3-4b" and top["requests"] == 2
        assert top["success_rate"] == 0.5
        metrics = manager.model_metrics["qwen/qwen3-4b"]
        assert metrics.success_rate == 0.5 and abs(metrics.avg_latency - 1.0) < 0.01
        assert metrics.usage_frequency == 2 and metrics.estimated_memory_mb > 0
        assert manager.model_status["qwen/qwen3-4b"] is ModelStatus.LOADED
        recs = manager.get_model_recommendations({"task_type": "embedding"})
        assert recs["recommended_models"][0] == "text-embedding-nomic-embed-text-v1.5"
        chat = manager.get_model_recommendations({"task_type": "chat", "urgency": 1.0})
        assert chat["recommended_models"][0] == "qwen/qwen3-4b"
        assert "already loaded" in chat["reasoning"]["qwen/qwen3-4b"]["why"]
        assert set(chat) >= {"recommended_models", "models_to_preload", "models_to_unload",
                             "reasoning"}
        assert sorted(await manager.clear_all_models()) == sorted(ok)
    assert not upstream.started   # closed with the manager


async def test_statistics_survive_a_restart_in_the_default_history(emulator, private_home):
    """The documented constructor keeps its history by default, in a file of its own beside
    the proxy's default one, and closes it with the manager."""
    async with ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url) as first:
        first.record_model_usage("qwen/qwen3-4b", latency=0.5, tokens_used=100)
        first.record_model_usage("qwen/qwen3-4b", latency=0.7, success=False)
        store = first.store
    assert store is not None and not store.ok                 # closed with the manager
    # beside the proxy's default, in a file of its own
    assert store.path == private_home / ".local/state/lmstudio-proxy/library-history.sqlite3"
    async with ModelMemoryManager(min_free_memory_gb=1, upstream=emulator.url) as again:
        usage = again.usage("qwen/qwen3-4b")
        assert (usage.requests, usage.failures, usage.completion_tokens) == (2, 1, 100)
        assert again.get_memory_stats()["persistence"] == {
            "ok": True, "path": str(store.path), "error": None, "damage": [], "skipped": []}


async def test_a_configured_history_is_used_and_a_disabled_one_is_not(emulator, private_home,
                                                                        tmp_path):
    path = tmp_path / "lib-history.sqlite3"
    config = load_config({"upstream": {"url": emulator.url},
                          "memory": {"min_free_memory_gb": 1},
                          "storage": {"path": str(path)}})
    async with ModelMemoryManager(config=config) as first:
        first.record_model_usage("qwen/qwen3-4b", latency=0.5, tokens_used=7)
    async with ModelMemoryManager(config=config) as again:
        assert again.usage("qwen/qwen3-4b").completion_tokens == 7
    off = replace_config(config, {"storage.enabled": False})
    async with ModelMemoryManager(config=off) as memory_only:
        assert memory_only.store is None and memory_only.usage("qwen/qwen3-4b").requests == 0
    assert not (private_home / ".local").exists()


@pytest.mark.parametrize("upstream", [42, 1.5, b"http://127.0.0.1:1234", object()])
def test_an_upstream_that_is_neither_a_url_nor_an_adapter_is_a_type_error(upstream):
    with pytest.raises(TypeError, match=r"upstream must be the server's URL \(a str\) or an "
                                        r"adapter .*, not " + type(upstream).__name__):
        ModelMemoryManager(upstream=upstream)
