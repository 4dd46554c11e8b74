"""OpenAI-compatible proxy in front of LM Studio that manages model memory.

Library use: `ModelMemoryManager` (the engine) and `ModelHealthMonitor` (alerts and health).
"""
from .engine.health import ModelHealthMonitor
from .engine.lifecycle import ModelStatus
from .engine.manager import ModelMemoryManager, ModelMetrics
from .engine.memory import MemoryPressure

__all__ = ["MemoryPressure", "ModelHealthMonitor", "ModelMemoryManager", "ModelMetrics",
           "ModelStatus"]
__version__ = "0.1.0"
