"""The original design's Quick Start, against the emulator, through the library API only."""
from __future__ import annotations

from proxy import ModelMemoryManager, ModelStatus
from proxy.config import UpstreamConfig
from proxy.upstream.lmstudio import LMStudioUpstream


async def test_quick_start_flow(emulator):
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
