"""The emulator's model catalogue: what is "downloaded", how big it is and how long it loads.

A loaded instance's memory depends on its context length as a real one does: the weights plus
the KV cache, which holds per token of context `n_layers × n_kv_heads × head_dim × 2` (keys
and values) elements of `kv_bytes_per_element` bytes (2: f16). `memory_bytes` is the resident
size at the default context (`default_context_length`, LM Studio's 4096 or the model's maximum
if smaller); defaults describe a Llama-3-8B-like shape (128 KiB per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

GB = 1_000_000_000
DEFAULT_CONTEXT_LENGTH = 4096   # LM Studio's context when a load names none


@dataclass(frozen=True)
class CatalogModel:
    key: str
    type: str = "llm"                 # llm | embedding
    size_bytes: int = 4 * GB          # file size on disk, as LM Studio reports it
    memory_bytes: int | None = None   # resident size once loaded; default size_bytes x 1.1
    load_time_s: float = 2.0
    max_context_length: int = 32768
    params_string: str | None = None
    quantization: str = "Q4_K_M"
    bits_per_weight: float = 4.0
    architecture: str = "llama"
    format: str = "gguf"
    n_layers: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    kv_bytes_per_element: float = 2.0

    @property
    def publisher(self) -> str:
        return self.key.split("/", 1)[0] if "/" in self.key else "local"

    @property
    def resident_bytes(self) -> int:
        return self.memory_bytes if self.memory_bytes is not None else int(self.size_bytes * 1.1)

    @property
    def default_context_length(self) -> int:
        return min(self.max_context_length, DEFAULT_CONTEXT_LENGTH)

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token (an embedding model keeps none)."""
        if self.type == "embedding":
            return 0
        return int(self.n_layers * self.n_kv_heads * self.head_dim * 2
                   * self.kv_bytes_per_element)

    def memory_at(self, context_length: int) -> int:
        """Resident bytes of an instance loaded with this context: the KV cache grows and
        shrinks with it; never below the weights (taken as the smaller of file and
        resident size)."""
        delta = self.kv_bytes_per_token * (context_length - self.default_context_length)
        return max(min(self.size_bytes, self.resident_bytes), self.resident_bytes + delta)


_FIELDS = set(CatalogModel.__dataclass_fields__)


def parse_catalog(data: Any, source: str = "catalog") -> list[CatalogModel]:
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ValueError(f"{source}: expected a mapping with a 'models' list")
    models = []
    for i, item in enumerate(data["models"]):
        if not isinstance(item, dict) or "key" not in item:
            raise ValueError(f"{source}: models[{i}] needs at least a 'key'")
        unknown = set(item) - _FIELDS - {"size_gb", "memory_gb"}
        if unknown:
            raise ValueError(f"{source}: models[{i}]: unknown keys {sorted(unknown)}")
        item = dict(item)
        if "size_gb" in item:
            item["size_bytes"] = int(float(item.pop("size_gb")) * GB)
        if "memory_gb" in item:
            item["memory_bytes"] = int(float(item.pop("memory_gb")) * GB)
        models.append(CatalogModel(**item))
    return models


def load_catalog(path: str | Path | None = None) -> list[CatalogModel]:
    """Read a YAML catalogue; without a path, the built-in demo catalogue."""
    if path is None:
        text = resources.files(__package__).joinpath("demo_catalog.yaml").read_text("utf-8")
        return parse_catalog(yaml.safe_load(text), "demo_catalog.yaml")
    return parse_catalog(yaml.safe_load(Path(path).read_text("utf-8")), str(path))
