"""The HTTP server's side of a proxied request: what goes upstream, what comes back."""
