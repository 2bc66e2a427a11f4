# syntax=docker/dockerfile:1.7
# The prefill / decode worker image: CUDA 12.8, torch, triton, flash-attn, pdserve.
#
#   docker build -f deploy/worker.Dockerfile -t ghcr.io/pdserve/pdserve-worker:0.1.0 .
#   docker build -f deploy/worker.Dockerfile --build-arg PDSERVE_EXTRAS=gpu,ray \
#       -t ghcr.io/pdserve/pdserve-ray:0.1.0 .          # the Ray Serve / KubeRay image
#
# Probes: Kubernetes runs `pdserve-worker-probe live|ready` (WorkerAdmin.Health over gRPC) and the
# preStop `pdserve-worker-probe drain` (see helm/pdserve/templates/workers.yaml); the HEALTHCHECK
# below is the same check for plain Docker. Pin the bases by digest in CI
# (docker buildx imagetools inspect <image>) when promoting a release.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04

# --- build: compile flash-attn against the pinned torch, install pdserve into a venv -----------
FROM nvcr.io/nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN_VERSION=2.8.3
ARG PDSERVE_EXTRAS=gpu
# Hopper (H100/H200) and Ampere (A100); add 10.0 for Blackwell.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build git \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip wheel setuptools packaging \
 && pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=${MAX_JOBS} \
    pip install --no-build-isolation flash-attn==${FLASH_ATTN_VERSION}
COPY . /src
RUN pip install "/src[${PDSERVE_EXTRAS}]" \
 && python -c "import torch, flash_attn, cli.main, worker.server"

# --- runtime: CUDA runtime libraries, the venv, a non-root user ------------------------------------
FROM nvcr.io/nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# python3 runs the venv; wget and bash are what KubeRay's Ray pods expect (probes, ray start).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates tini wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp/home --no-create-home --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/worker_probe.py /usr/local/bin/pdserve-worker-probe
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    HF_HUB_OFFLINE=1
RUN sed -i '1s|.*|#!/opt/venv/bin/python|' /usr/local/bin/pdserve-worker-probe
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
HEALTHCHECK --interval=20s --timeout=8s --start-period=600s --retries=3 CMD ["pdserve-worker-probe", "live"]
ENTRYPOINT ["tini", "--", "pdserve"]
CMD ["decode-worker"]
