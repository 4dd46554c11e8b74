from .base import ApiLevel, LoadResult, ModelBackend, Upstream, UpstreamModel

__all__ = ["ApiLevel", "LoadResult", "ModelBackend", "Upstream", "UpstreamModel"]
