# syntax=docker/dockerfile:1
# A gptjt worker for one CUDA GPU; the entrypoint is `gptjt-worker`, so arguments go to it.
#   docker build -f deploy/worker-cuda.Dockerfile -t gptjt-worker:cuda .      (from the repository root)
#   docker run --gpus all -p 7430:7430 -e GPTJT_TOKEN=TOKEN gptjt-worker:cuda \
#       --join HOST:PORT --device cuda:0 --listen 0.0.0.0:7430 --announce PUBLIC_HOST:7430
# PyPI's torch wheel for Linux is the CUDA build and brings its own CUDA libraries (cuBLAS,
# cuDNN, NCCL as pip packages), so the base image only needs to provide the NVIDIA container
# runtime hooks; the host needs an NVIDIA driver recent enough for that wheel and the NVIDIA
# Container Toolkit. Ubuntu 22.04 because gptjt needs Python 3.11 (pyproject: >=3.11,<3.12).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/lib/gptjt/hf

# torch first, in its own layer: it is most of the image and changes least. The exact pin is
# the one pyproject.toml requires, so the install below keeps it.
RUN python3.11 -m venv /opt/venv \
    && python -m pip install --upgrade pip \
    && python -m pip install torch==2.13.0

# Only what the package and the bundled demo run need (the tiny demo's data paths resolve
# against /opt/gptjt/deploy/run-configs, and its embedded default against the source tree,
# hence an editable install).
WORKDIR /opt/gptjt
COPY pyproject.toml README.md ./
COPY gptjt_core ./gptjt_core
COPY gptjt_cli ./gptjt_cli
COPY gptjt_proto ./gptjt_proto
COPY coordinator ./coordinator
COPY worker ./worker
COPY bench ./bench
COPY data/demo ./data/demo
COPY deploy/run-configs ./deploy/run-configs
RUN python -m pip install -e . \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && gptjt-worker --help > /dev/null

# A dedicated unprivileged user; the Hugging Face cache (the stage's checkpoint files) lives in
# /var/lib/gptjt/hf: mount a volume there so that a restarted container does not download again.
RUN useradd --system --home-dir /var/lib/gptjt --shell /usr/sbin/nologin gptjt \
    && mkdir -p /var/lib/gptjt/hf && chown -R gptjt:gptjt /var/lib/gptjt
USER gptjt
WORKDIR /var/lib/gptjt

# The stage API (pass the same port to --listen and --announce). On SIGTERM the worker
# finishes the open step for up to --drain-timeout (60 s): stop it with `docker stop -t 90`.
EXPOSE 7430
STOPSIGNAL SIGTERM
ENTRYPOINT ["gptjt-worker"]
