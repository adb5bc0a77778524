# syntax=docker/dockerfile:1.7
# The gateway and the Kafka workers (one image, two commands):
#   docker build -f helm/images/gateway.Dockerfile -t forge-gateway:0.1.0 .
#   command: python -m gateway          (API, port 8080)
#   command: python -m gateway.worker   (Kafka worker, metrics on 9300)
# Build context: the repository root (gateway.Dockerfile.dockerignore keeps venvs, weights and
# var/ out of it).
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml lists torch (and the ONNX export stack) in the core dependencies, so
# `pip install .` pulls them although the gateway never imports torch. Installing the CPU
# build first keeps the image about 1.5 GB instead of 6+ GB with CUDA libraries; a
# "gateway" extra in pyproject.toml without torch would drop it altogether.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY export ./export
COPY gateway ./gateway
COPY launcher ./launcher
# pyproject.toml declares no package data, so the wheel holds only .py files: the web page
# (gateway/static/), the default weapon templates and the default content policy are copied
# beside the installed package.
RUN /opt/venv/bin/pip install . \
 && site=$(/opt/venv/bin/python -I -c 'import gateway, os; print(os.path.dirname(gateway.__file__))') \
 && cp -r gateway/static gateway/weapon_templates.yaml gateway/content_policy.yaml "$site/"

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FORGE_HOST=0.0.0.0 \
    FORGE_PORT=8080
# UID 10001 matches the chart's securityContext; no home directory or shell needed.
RUN groupadd --system --gid 10001 forge \
 && useradd --system --uid 10001 --gid forge --no-create-home --shell /usr/sbin/nologin forge
COPY --from=build /opt/venv /opt/venv
# Fail the build if the API or the worker is missing a dependency or a data file.
RUN python -I -c "import gateway.__main__, gateway.app, gateway.worker, gateway.api.page; \
from gateway.settings import Settings; assert Settings().weapon_templates.is_file(); \
assert Settings().content_policy.is_file(); \
assert gateway.api.page.STATIC_DIR.joinpath('index.html').is_file()"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9300
# Exec form: an exception (no answer, or an HTTP error) exits 1, which Docker reads as unhealthy.
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["python", "-m", "gateway"]
