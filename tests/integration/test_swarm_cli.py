"""Operator CLI against a live swarm: tables, --json schemas, exit codes, export, and `gptjt demo`."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.swarm import BIN, Swarm, swarm_toml


@pytest.fixture(scope="module")
def finished_swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm-cli")
    swarm = Swarm(tmp, swarm_toml(tmp, steps=2))
    swarm.start_coordinator()
    swarm.start_worker("a")
    swarm.start_worker("b")
    swarm.wait(lambda s: s["phase"] == "done", 120, "the run to finish")
    yield swarm
    swarm.close()


def gptjt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "gptjt"), *args], capture_output=True, text=True, timeout=120)


def test_status_json_schema(finished_swarm):
    r = gptjt("status", "--coordinator", finished_swarm.address, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for key in ("step", "tokens", "tokens_per_s", "loss", "workers", "stages", "tickets"):
        assert key in s, key
    assert s["step"] == 2 and s["tokens"] == 2 * 4 * 64 and s["tokens_per_s"] > 0 and s["loss"] > 0
    for w in s["workers"]:
        assert {"id", "stage", "state", "last_heartbeat_s"} <= set(w)
    assert [(st["index"], st["start_layer"], st["end_layer"], len(st["workers"])) for st in s["stages"]] == \
        [(0, 0, 2, 1), (1, 2, 4, 1)]
    assert {"issued", "committed", "reissued"} <= set(s["tickets"])


@pytest.mark.parametrize("view, header", [("workers", "worker"), ("stages", "stage"), ("tickets", "issued")])
def test_views_as_tables_and_json(finished_swarm, view, header):
    r = gptjt(view, "--coordinator", finished_swarm.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[0] == header
    r = gptjt(view, "--coordinator", finished_swarm.address, "--json")
    assert list(json.loads(r.stdout)) == [view]


def test_status_table_and_unreachable_coordinator(finished_swarm):
    r = gptjt("status", "--coordinator", finished_swarm.address)
    assert r.stdout.startswith("run test-swarm: step 2/2 (done), loss ")
    r = gptjt("status", "--coordinator", "127.0.0.1:1")
    assert r.returncode == 3 and "did not answer" in r.stderr and "is it running?" in r.stderr


def test_export_from_the_swarm_loads_in_transformers(finished_swarm, tmp_path):
    r = gptjt("export", "--coordinator", finished_swarm.address, "--out", str(tmp_path / "hf"), "--admin-token",
              finished_swarm.admin_token)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "GPTJForCausalLM"


def test_demo_runs_a_swarm_end_to_end(tmp_path):
    # as `make demo` runs it: the default --out, runs/demo, relative to where the command runs
    # (the swarm's processes run inside that directory, so a path passed on as given named
    # runs/demo/runs/demo there, and the demo waited for a coordinator that had started)
    r = subprocess.run([str(BIN / "gptjt"), "demo", "--steps", "3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.startswith("== gptjt demo: a local swarm on loopback: 1 coordinator + 2 workers")
    assert "run tiny-demo: step 3/3 (done)" in out
    assert "\ndashboard at http://127.0.0.1:" in out
    assert "exported the swarm's stages as a Hugging Face checkpoint" in out
    assert "transformers pipeline : '\"I love this!\" Is it positive? A:" in out
    assert "left the run" in (tmp_path / "runs" / "demo" / "worker-demo-0.log").read_text()
    assert (tmp_path / "runs" / "demo" / "run.db").is_file() and not (tmp_path / "runs" / "demo" / "runs").exists()
