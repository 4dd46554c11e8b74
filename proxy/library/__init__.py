"""The library wing: the original design's API over the engine, for use in-process.

`ModelMemoryManager` wraps an `EngineCore`; the middleware and the integrator make a model
resident around any async call; `ModelHealthMonitor` (the engine's alert rules) takes a
manager as well as a core.
"""
from ..observe.health import ModelHealthMonitor
from .integration import (CognitiveModelIntegrator, ModelMemoryMiddleware,
                          create_model_memory_manager)
from .manager import ModelMemoryManager, ModelMetrics

__all__ = ["CognitiveModelIntegrator", "ModelHealthMonitor", "ModelMemoryManager",
           "ModelMemoryMiddleware", "ModelMetrics", "create_model_memory_manager"]
