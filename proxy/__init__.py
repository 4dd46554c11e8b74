"""OpenAI-compatible proxy in front of LM Studio that manages model memory.

Library use: `ModelMemoryManager` (the engine), `ModelHealthMonitor` (alerts and health), and
the integration API: `ModelMemoryMiddleware`, `CognitiveModelIntegrator`,
`create_model_memory_manager` (all from `proxy.library`).
"""
from .engine.lifecycle import ModelStatus
from .engine.memory import MemoryPressure
from .library import (CognitiveModelIntegrator, ManagerClosed, ModelHealthMonitor,
                      ModelMemoryManager, ModelMemoryMiddleware, ModelMetrics, WrongEventLoop,
                      create_model_memory_manager)

__all__ = ["CognitiveModelIntegrator", "ManagerClosed", "MemoryPressure", "ModelHealthMonitor",
           "ModelMemoryManager", "ModelMemoryMiddleware", "ModelMetrics", "ModelStatus",
           "WrongEventLoop", "create_model_memory_manager"]
__version__ = "0.1.0"
