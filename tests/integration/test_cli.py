"""The `gptjt` console script as a user runs it: real processes, first lines, --json output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GPTJT = shutil.which("gptjt", path=str(Path(sys.executable).parent)) or "gptjt"


def gptjt(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([GPTJT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    r = gptjt("train-local", "--steps", "2", "--out", str(out / "run"), "--quiet", "--export", str(out / "hf"))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("gptjt train-local: run 'tiny-demo', model random:tiny:0, 8 seq x 128 tokens per step")
    assert "exported Hugging Face checkpoint to" in r.stdout
    assert "step 2/2: loss " in r.stderr  # --quiet: log lines every train.log_every steps and at the end
    return out


def test_config_prints_the_resolved_run():
    r = gptjt("config")
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    assert run["name"] == "tiny-demo" and run["train"]["seq_len"] == 128
    assert [d["name"] for d in run["ul2"]["denoisers"]] == ["S2S", "NLG", "NLU"]


def test_eval_reports_perplexity_and_a_completion(trained):
    r = gptjt("eval", "--checkpoint", str(trained / "hf"), "--sequences", "2", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["prompt"] == '"I love this!" Is it positive? A:'
    assert 1 < result["perplexity"] < 60000 and result["sequences"] == 2
    assert isinstance(result["completion"], str)


def test_resume_and_export_from_a_trainer_checkpoint(trained):
    r = gptjt("train-local", "--steps", "3", "--out", str(trained / "run"), "--quiet", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in r.stdout.splitlines()[0]
    assert "steps 3:" in r.stdout
    ckpt = trained / "run" / "checkpoints" / "step-0000003"
    r = gptjt("export", "--checkpoint", str(ckpt), "--out", str(trained / "fp16"), "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained / "fp16"), dtype="auto")
    assert str(next(model.parameters()).dtype) == "torch.float16"


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_text("[train]\nglobal_batch = 0\n")
    r = gptjt("train-local", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("gptjt train-local: error: train.global_batch = 0 is invalid: "
                                "expected an integer >= 1")


def test_bench_local_prints_its_figures():
    r = gptjt("bench", "local", "--quick", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["stage_parity_max_abs_err"] < 1e-5
    assert result["loss_last"] < result["loss_first"]


def test_gpu_bench_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = gptjt("bench", "gpu-block", "--json")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_init_writes_the_random_flavour(tmp_path):
    r = gptjt("init", "--flavour", "tiny", "--seed", "3", "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote random:tiny:3 to")
    assert (tmp_path / "t" / "model.safetensors").is_file() and (tmp_path / "t" / "tokenizer.json").is_file()
