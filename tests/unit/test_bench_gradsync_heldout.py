"""bench gradsync scores each run's final model on held-out text beside its training loss: the
config it writes names the bundled held-out file, and a model's held-out loss comes from it."""

from __future__ import annotations

import math

from bench.gradsync import HELDOUT, HELDOUT_SEQUENCES, _config, _heldout_loss
from gptjt_core.config import load_run_config
from gptjt_core.model import StageSpec, load_stage, model_config_for


def test_the_bench_config_scores_held_out_text_it_never_trains_on(tmp_path):
    config = _config(tmp_path, "local-steps", "8bit-blockwise", 3, 2)
    run = load_run_config(config)
    assert [s.path for s in run.data.heldout] == [str(HELDOUT)] and HELDOUT.exists()
    assert str(HELDOUT) not in [s.path for s in run.data.sources]
    source = run.model.source
    n_layer = model_config_for(source).n_layer
    model = load_stage(source, StageSpec(0, n_layer, embed=True, head=True))
    loss = _heldout_loss(model, config)
    # an untrained model: about ln(vocabulary) a token; a wrong file, sequence length or mask would
    # move it (and an empty held-out set raises)
    vocab = model_config_for(source).vocab_size
    assert abs(loss - math.log(vocab)) < 0.5, (loss, math.log(vocab), HELDOUT_SEQUENCES)
