"""LM Studio's own clients (the `lmstudio` SDKs, `lms`) through the proxy."""
