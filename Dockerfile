# Sidecar image. docker build -t lmstudio-proxy . && docker run -p 8080:8080 \
#   --add-host=host.docker.internal:host-gateway -v lmstudio-proxy:/data \
#   -e PROXY_API_KEY=sk-... -e PROXY_ADMIN_TOKEN=... lmstudio-proxy
# The configuration is /config/proxy.yaml (deploy/container.yaml unless you mount your own);
# no PROXY_* variable is set here, so nothing overrides the file you mount.
# BASE: any Debian-like image with Python 3.11+ and pip as `python` and `pip` (the tests build
# on one made by debootstrap, offline from Docker Hub).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install '.[fast]' && groupadd --gid 10001 lmproxy \
    && useradd --create-home --uid 10001 --gid 10001 lmproxy \
    && mkdir -p /config /data && chown 10001:10001 /data
COPY deploy/container.yaml /config/proxy.yaml

# Numeric: a kubelet told runAsNonRoot refuses an image whose user is a name (it cannot tell
# whether the name is root). 10001:10001 is lmproxy, created above.
USER 10001:10001
VOLUME /data
EXPOSE 8080
# Follows server.port of the mounted file (and PROXY_PORT, if you set one).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-m", "proxy", "healthcheck", "--config", "/config/proxy.yaml"]
# SIGTERM: drains for server.shutdown_timeout_s (30 s), then ends what is left; give
# `docker stop -t 35` or more.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "proxy", "--config", "/config/proxy.yaml"]
