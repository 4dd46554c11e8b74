# Sidecar image: docker build -t lmstudio-proxy . && \
#   docker run -p 8080:8080 -v $PWD/proxy.yaml:/config/proxy.yaml:ro lmstudio-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install '.[fast]' && useradd --create-home --uid 10001 proxy && mkdir -p /config
COPY proxy.yaml /config/proxy.yaml

USER proxy
EXPOSE 8080
# LM Studio usually runs on the Docker host: point PROXY_UPSTREAM at it.
ENV PROXY_HOST=0.0.0.0 PROXY_PORT=8080 PROXY_UPSTREAM=http://host.docker.internal:1234
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["python", "-m", "proxy", "--config", "/config/proxy.yaml"]
