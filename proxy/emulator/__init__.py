"""An LM Studio emulator for tests, the demo and benchmarks: `python -m proxy.emulator`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from ..server.serving import Served, serve
from .catalog import GB, CatalogModel, load_catalog
from .server import EmulatorOptions, create_emulator_app
from .state import EmulatorState

__all__ = ["CatalogModel", "Emulator", "EmulatorOptions", "EmulatorState", "GB",
           "create_emulator_app", "load_catalog", "start_emulator"]


S = TypeVar("S")


@dataclass
class Emulator(Generic[S]):
    """A running emulator of any flavour: its state (what tests look at) and its server."""
    state: S
    served: Served

    @property
    def url(self) -> str:
        return self.served.url

    async def close(self) -> None:
        await self.served.close()


async def start_emulator(catalog: list[CatalogModel] | None = None, *,
                         host: str = "127.0.0.1", port: int = 0,
                         capacity_bytes: int = 64 * GB, load_time_scale: float = 0.0,
                         real_memory_scale: float | None = None, jit: bool = True,
                         options: EmulatorOptions | None = None) -> Emulator[EmulatorState]:
    state = EmulatorState(catalog if catalog is not None else load_catalog(),
                          capacity_bytes=capacity_bytes, load_time_scale=load_time_scale,
                          real_memory_scale=real_memory_scale, jit=jit)
    served = await serve(create_emulator_app(state, options), host, port)
    return Emulator(state, served)
