"""bench gradsync scores each run's final model on held-out text beside its training loss: the
config it writes names the bundled held-out file, and a model's held-out loss is the training
objective (UL2) on it, on the same examples every time (gptjt_core/evaluation.py)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import pytest

from bench.gradsync import HELDOUT, _config
from gptjt_core.config import load_run_config
from gptjt_core.evaluation import heldout_objective_loss
from gptjt_core.model import StageSpec, load_stage, model_config_for
from gptjt_core.run_config import SourceConfig


def _whole_model(source: str):
    return load_stage(source, StageSpec(0, model_config_for(source).n_layer, embed=True, head=True))


def test_the_bench_config_scores_held_out_text_it_never_trains_on(tmp_path):
    run = load_run_config(_config(tmp_path, "local-steps", "8bit-blockwise", 3, 2))
    assert [s.path for s in run.data.heldout] == [str(HELDOUT)] and HELDOUT.exists()
    assert str(HELDOUT) not in [s.path for s in run.data.sources]
    model = _whole_model(run.model.source)
    scored = heldout_objective_loss(model, run, 64)
    # an untrained model: about ln(vocabulary) a target token; a wrong file, sequence length or mask
    # would move it
    vocab = model_config_for(run.model.source).vocab_size
    assert scored["sequences"] == 64 and abs(scored["loss"] - math.log(vocab)) < 0.5, (scored, math.log(vocab))
    assert heldout_objective_loss(model, run, 64) == scored  # the same examples: models are compared on them


def test_held_out_scoring_stops_at_the_end_of_the_text_and_names_what_is_missing(tmp_path):
    path = tmp_path / "short.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"Document {i}. " + "Words that are held out of training. " * 20}) + "\n")
    run = load_run_config(_config(tmp_path, "local-steps", "8bit-blockwise", 3, 2))
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, heldout=[SourceConfig("short", str(path), 1.0)]))
    model = _whole_model(run.model.source)
    scored = heldout_objective_loss(model, run, max_sequences=10**6, micro_batch=4)
    assert 4 <= scored["sequences"] < 100  # ~700 tokens: each document once, then it stops
    with pytest.raises(ValueError, match="data.heldout"):
        heldout_objective_loss(model, dataclasses.replace(run, data=dataclasses.replace(run.data, heldout=[])), 8)
