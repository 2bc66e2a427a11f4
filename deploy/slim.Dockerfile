# syntax=docker/dockerfile:1.7
# The router and autoscaler image: pdserve's torch-free components on a slim Python.
#
#   docker build -f deploy/slim.Dockerfile -t ghcr.io/pdserve/pdserve:0.1.0 .
#
# Probes: the chart checks the router with GET /health (liveness) and GET /ready (readiness) on its
# API port, and the autoscaler through its /metrics port (helm/pdserve/templates/). One image runs
# both, on different ports, so no HEALTHCHECK is baked in. Pin the base by digest in CI
# (docker buildx imagetools inspect <image>) when promoting a release.

ARG PYTHON_IMAGE=docker.io/library/python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY . /src
# base dependencies only: no torch (the router and autoscaler never import it)
RUN pip install /src \
 && python -c "import cli.main, router.server" \
 && ! python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp/home --no-create-home --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9400
HEALTHCHECK NONE
ENTRYPOINT ["pdserve"]
CMD ["router"]
