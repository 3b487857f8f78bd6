# Marble inference server image.
#
# Stages on one base: `deps` makes a virtualenv with torch and the dependencies, `wheel` builds
# the project's wheel (package data included: the embedded default model and the dashboard),
# `runtime` copies the venv (a layer that stays cached while only code changes), installs the
# wheel and runs as a non-root user. Real checkpoints are mounted under /models, chosen with
# --model.
# Build options (all --build-arg), see docs/deploy.md, "The image alone":
#   BASE_IMAGE       python:3.11-slim (CPU). For GPUs: nvidia/cuda:12.4.1-runtime-ubuntu24.04
#                    (python3 is installed from apt when the base lacks it) with a CUDA
#                    TORCH_INDEX_URL such as https://download.pytorch.org/whl/cu124.
#   TORCH_INDEX_URL  where torch comes from when docker/wheels/ holds no torch wheel.
#   TORCH_SPEC       the torch requirement for that index (default: torch).
#   PIP_INDEX        a PyPI mirror for everything else (default: pip's own, PyPI).
#   PIP_CERT         a CA bundle for a TLS-inspecting proxy, e.g. mounted read-only with
#                    `podman build -v /etc/ssl/certs:/etc/ssl/certs:ro`, or put in docker/wheels/
#                    and named as /tmp/wheels/<file> (works with any builder).
# A torch wheel placed in docker/wheels/ (git-ignored) is installed instead of the index.

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------------------- deps
FROM ${BASE_IMAGE} AS deps
ARG PIP_CERT=""
ARG PIP_INDEX=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    DEBIAN_FRONTEND=noninteractive

# CUDA runtime bases ship no Python; Debian/python images already have it.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: a local wheel if one is in the build context, else the index.
COPY docker/wheels/ /tmp/wheels/
RUN set -eu; \
    pip_opts="${PIP_CERT:+--cert $PIP_CERT} ${PIP_INDEX:+--index-url $PIP_INDEX}"; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
        pip install $pip_opts --find-links /tmp/wheels /tmp/wheels/torch-*.whl; \
    else \
        pip install ${PIP_CERT:+--cert $PIP_CERT} --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    fi

# The other dependencies, read from pyproject.toml so that code edits keep this layer cached.
COPY pyproject.toml /src/
RUN set -eu; \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt; \
    echo "setuptools>=68" >> /tmp/requirements.txt; \
    pip install ${PIP_CERT:+--cert $PIP_CERT} ${PIP_INDEX:+--index-url $PIP_INDEX} \
        --find-links /tmp/wheels -r /tmp/requirements.txt

# -------------------------------------------------------------------------------------- wheel
FROM deps AS wheel
# The project as a wheel, built with the venv's setuptools: nothing is downloaded here.
COPY README.md /src/
COPY model/ /src/model/
COPY structured/ /src/structured/
COPY scheduler/ /src/scheduler/
COPY families/ /src/families/
COPY server/ /src/server/
COPY training/ /src/training/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# ------------------------------------------------------------------------------------ runtime
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/marble \
        --shell /usr/sbin/nologin marble \
    && mkdir -p /models && chown marble:marble /models

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && /opt/venv/bin/python -c "import marble.model, marble.scheduler, marble.server.cli"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MARBLE_HOST=0.0.0.0 \
    MARBLE_PORT=8000

USER marble
WORKDIR /home/marble
VOLUME ["/models"]
EXPOSE 8000

# Ready (not just alive): /health answers 503 while the model loads or the server drains.
# The check finds the port from the server's own --port flag (or MARBLE_PORT).
COPY docker/healthcheck.py /opt/marble/healthcheck.py
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/marble/healthcheck.py"]

ENTRYPOINT ["marble", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
