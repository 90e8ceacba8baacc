# syntax=docker/dockerfile:1
#
# One image for every process of the platform: each service runs it with another
# `lakehouse` subcommand (`up`, `api`, `process`, `bridge mqtt`, `bridge kafka`, ...).
#
#   docker build -t lakehouse .                      # runtime image (the default target)
#   docker build -t lakehouse-jupyter --target jupyter .
#   docker run --rm -p 8000:8000 -v lakehouse-data:/data lakehouse up
#
# Stages: `builder` installs the package and its dependencies into a virtualenv
# (/opt/lakehouse) from wheels; `runtime` copies only that virtualenv onto a slim base
# and runs as the unprivileged user `lakehouse`; `jupyter` adds the notebooks extra.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the virtualenv with the platform and its dependencies -----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/lakehouse \
    && /opt/lakehouse/bin/pip install --upgrade pip setuptools wheel
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer stays cached while only
# the code changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/lakehouse/bin/pip install -r /tmp/requirements.txt
COPY config ./config
COPY landing_zone ./landing_zone
COPY delta_processing ./delta_processing
COPY analytics ./analytics
COPY api ./api
COPY cli ./cli
RUN /opt/lakehouse/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/lakehouse/bin/pip install --no-deps /wheels/*.whl \
    && /opt/lakehouse/bin/lakehouse --help > /dev/null

# -- builder-notebooks: the same virtualenv plus Jupyter ------------------------------
FROM builder AS builder-notebooks
RUN /opt/lakehouse/bin/pip install "$(ls /wheels/*.whl)[notebooks]"

# -- base: what every runtime image shares -------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/lakehouse/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LAKEHOUSE_DATA_DIR=/data \
    LAKEHOUSE_API_HOST=0.0.0.0 \
    LAKEHOUSE_API_PORT=8000 \
    HEALTHCHECK_URL=http://127.0.0.1:8000/health
# A fixed uid/gid so volumes and bind mounts can be prepared on the host
# (chown 10001:10001). /data is the data directory (landing zone and Delta tables):
# mount one volume there, shared by every service.
RUN groupadd --system --gid 10001 lakehouse \
    && useradd --system --uid 10001 --gid lakehouse --home-dir /home/lakehouse \
       --create-home --shell /usr/sbin/nologin lakehouse \
    && install -d -o lakehouse -g lakehouse -m 0750 /data
WORKDIR /home/lakehouse
VOLUME ["/data"]

# -- jupyter: notebooks over the gold tables (read-only data volume) -----------------
FROM base AS jupyter
COPY --from=builder-notebooks /opt/lakehouse /opt/lakehouse
COPY --chown=lakehouse:lakehouse notebooks ./notebooks
USER lakehouse
EXPOSE 8888
ENV HEALTHCHECK_URL=http://127.0.0.1:8888/api
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["jupyter"]
CMD ["lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/home/lakehouse/notebooks"]

# -- runtime (default target): the platform -------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/lakehouse /opt/lakehouse
USER lakehouse
EXPOSE 8000
# Liveness of `up`/`api` (GET /health). Services without the API (processor, bridges)
# set HEALTHCHECK_URL to their --metrics-port endpoint.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lakehouse"]
CMD ["up"]
