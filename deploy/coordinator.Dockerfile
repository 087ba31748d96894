# syntax=docker/dockerfile:1
# The gptjt coordinator (CPU only: it never carries activations, gradients or weights on its
# hot path). The entrypoint is `gptjt-coordinator`; the default arguments run the tiny demo.
#   docker build -f deploy/coordinator.Dockerfile -t gptjt-coordinator:cpu .   (from the repository root)
#   docker run -p 7420:7420 -v gptjt-state:/var/lib/gptjt -v $PWD/run.toml:/etc/gptjt/run.toml:ro \
#       gptjt-coordinator:cpu --config /etc/gptjt/run.toml --listen 0.0.0.0:7420
# The image also holds `gptjt` (tokens, status, export) and `gptjt-worker`: the compose demo
# runs its CPU workers from it.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/lib/gptjt/hf

# CPU torch from PyTorch's CPU index, pinned to what pyproject.toml requires: '2.13.0+cpu'
# satisfies 'torch==2.13.0', so the install below keeps it instead of pulling the multi-GB
# CUDA build from PyPI.
RUN python -m pip install --upgrade pip \
    && python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

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
    && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__" \
    && gptjt-coordinator --help > /dev/null \
    && gptjt --help > /dev/null

# A dedicated unprivileged user owns the ledger (SQLite, WAL) and the checkpoint store beside
# it: mount a volume at /var/lib/gptjt so that a restarted coordinator resumes the run.
RUN useradd --system --home-dir /var/lib/gptjt --shell /usr/sbin/nologin gptjt \
    && mkdir -p /var/lib/gptjt/hf && chown -R gptjt:gptjt /var/lib/gptjt
USER gptjt
WORKDIR /var/lib/gptjt

EXPOSE 7420
STOPSIGNAL SIGTERM
ENTRYPOINT ["gptjt-coordinator"]
CMD ["--config", "/opt/gptjt/deploy/run-configs/tiny-demo.toml", "--listen", "0.0.0.0:7420", "--state", "/var/lib/gptjt/run.db"]
