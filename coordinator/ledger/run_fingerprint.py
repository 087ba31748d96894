"""A run's fingerprint: what must not change when the coordinator restarts on its ledger."""

from __future__ import annotations

import hashlib
import json

from gptjt_core.config import RunConfig


def run_fingerprint(run: RunConfig) -> str:
    """What must not change across a restart: the model, data order, batch and stages."""
    key = {"model": run.model.source, "data": run.to_dict()["data"], "ul2": run.to_dict()["ul2"],
           "seed": run.train.seed, "global_batch": run.train.global_batch,
           "micro_batch": run.train.micro_batch, "seq_len": run.train.seq_len,
           "num_stages": run.pipeline.num_stages}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
