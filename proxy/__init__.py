"""OpenAI-compatible proxy in front of LM Studio that manages model memory.

Library use: `ModelMemoryManager` (the engine), `ModelMemoryMiddleware`, `ModelHealthMonitor`.
"""
from .engine.lifecycle import ModelStatus
from .engine.manager import ModelMemoryManager, ModelMetrics
from .engine.memory import MemoryPressure

__all__ = ["MemoryPressure", "ModelMemoryManager", "ModelMetrics", "ModelStatus"]
__version__ = "0.1.0"
