"""LM Studio's own clients (the `lmstudio` SDKs, `lms`) through the proxy."""
# The paths of LM Studio's own protocol: the SDKs' probe and one websocket per namespace.
NAMESPACES = ("llm", "embedding", "system", "diagnostics", "files", "repository", "plugins",
              "runtime")
GREETING = "/lmstudio-greeting"
PATHS = frozenset({GREETING, *(f"/{ns}" for ns in NAMESPACES)})
