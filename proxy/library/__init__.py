"""The library wing: the original design's API over the engine, for use in-process.

`ModelMemoryManager` wraps an `EngineCore`; the middleware and the integrator make a model
resident around any async call; `ModelHealthMonitor` (the engine's alert rules) takes a
manager as well as a core. A manager belongs to one event loop; `ManagerClosed` and
`WrongEventLoop` say it was used after cleanup() or from elsewhere.
"""
from ..observe.health import ModelHealthMonitor
from .integration import (CognitiveModelIntegrator, ModelMemoryMiddleware,
                          create_model_memory_manager)
from .face import ManagerClosed, WrongEventLoop
from .manager import ModelMemoryManager, ModelMetrics

__all__ = ["CognitiveModelIntegrator", "ManagerClosed", "ModelHealthMonitor",
           "ModelMemoryManager", "ModelMemoryMiddleware", "ModelMetrics", "WrongEventLoop",
           "create_model_memory_manager"]
