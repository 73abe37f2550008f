# syntax=docker/dockerfile:1
# onepass inference server image. Docs: docs/deploy.md
#
#   CPU (default):  docker build -t onepass:0.1.0-cpu .
#                   -> pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
#   GPU (CUDA):     docker build --build-arg TORCH_VARIANT=cu128 -t onepass:0.1.0-cu128 .
#                   -> pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#   Own mirror:     --build-arg TORCH_INDEX_URL=https://pypi.internal/torch-cu128/simple
#
# The CUDA wheels bundle the CUDA runtime (nvidia-* packages), so both variants share the slim Python base;
# the node needs only the NVIDIA driver and container toolkit.
#
# The same install steps run in tests/deploy/test_image_install.py through docker/install.sh.

# ---------------------------------------------------------------------------------------------------------
# Pinned by tag here; release builds pin the digest too (python:3.11-slim@sha256:..., docs/deploy.md).
FROM python:3.11-slim AS builder

# cpu, or a CUDA variant that the PyTorch index lists for TORCH_VERSION (cu126, cu128, cu130, ...).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --chmod: the script runs even from a checkout that lost its executable bit.
COPY --chmod=0755 docker/install.sh /usr/local/bin/onepass-install

# torch first, in its own layer: it is the largest download and changes far less often than the code.
RUN onepass-install torch /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN onepass-install app /opt/venv /src

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ARG TORCH_VARIANT=cpu

LABEL org.opencontainers.image.title="onepass" \
      org.opencontainers.image.description="Online inference for multi-task GNNs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.onepass.torch-variant="${TORCH_VARIANT}"

# A named user as well as a numeric USER: some libraries call getpwuid() (getpass.getuser() in torch's
# compile cache) and fail for a uid without a passwd entry.
# uid 10001 matches runAsUser in k8s/base; >= 10000 keeps it clear of host users.
RUN groupadd --system --gid 10001 onepass \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin onepass

# The venv lives at the same path in both stages, so its scripts' shebangs stay valid.
COPY --from=builder /opt/venv /opt/venv

# The small committed demo model is baked in so the image works standalone; production mounts a volume
# over ONEPASS_MODEL_STORE (k8s/base/deployment.yaml). Root-owned: the server only reads it.
COPY model_store /srv/onepass/model_store

# Writable paths are /tmp only: Kubernetes runs this image with readOnlyRootFilesystem and an emptyDir on
# /tmp, so every cache goes there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    ONEPASS_MODEL_STORE=/srv/onepass/model_store \
    ONEPASS_HOST=0.0.0.0 \
    ONEPASS_PORT=8000 \
    ONEPASS_ADMIN_PORT=8001 \
    ONEPASS_GRACEFUL_SHUTDOWN_S=25

WORKDIR /srv/onepass

# 8000: public API (predict, health, metrics). 8001: admin API, listening only when an admin token is set.
EXPOSE 8000 8001

USER 10001:10001

# Liveness only (/healthz never depends on Redis); Kubernetes ignores HEALTHCHECK and uses its own probes.
# Python instead of curl: the slim base has no curl and adding it would grow the attack surface.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ONEPASS_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself, then drains for ONEPASS_GRACEFUL_SHUTDOWN_S.
ENTRYPOINT ["onepass"]
CMD ["serve"]
