"""The deployment kit (deploy/): configs load, every command and flag exists, compose is the demo's swarm.

Each check (tests/deploy_checks.py) returns the problems it finds, so every test runs it on the real
files (no problems) and on a broken copy (the problem is found).
"""

from __future__ import annotations

import copy
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from gptjt_core.config import RunConfig, flavour_config, from_dict, load_run_config
from gptjt_core.model import parse_random_source
from tests.deploy_checks import (
    DEPLOY,
    HUB_FLAVOURS,
    PHASE1,
    PHASE2,
    REPO,
    SCRIPTS,
    argv_problems,
    base_image,
    compose_problems,
    dockerfile_problems,
    entrypoint,
    env_file,
    image_files,
    instructions,
    read_dockerfile,
    readme_problems,
    recipe_problems,
    script_parser,
    unit_entries,
    unit_problems,
)

RUN_CONFIGS = sorted((DEPLOY / "run-configs").glob("*.toml"))
DOCKERFILES = sorted(DEPLOY.glob("*Dockerfile"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def compose_doc() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_kit_is_complete():
    assert {p.name for p in RUN_CONFIGS} >= {"tiny-demo.toml", PHASE1.name, PHASE2.name}
    assert {p.name for p in DOCKERFILES} == {"worker-cuda.Dockerfile", "coordinator.Dockerfile"}
    assert {p.name for p in UNITS} == {"gptjt-worker.service", "gptjt-coordinator.service"}
    assert (DEPLOY / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_scripts_resolve(name):
    module, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads_and_validates(path):
    run = load_run_config(path)  # unknown keys and invalid values raise ConfigError
    assert from_dict(RunConfig, run.to_dict()) == run
    random_source = parse_random_source(run.model.source)
    flavour = random_source[0] if random_source else HUB_FLAVOURS.get(run.model.source)
    assert flavour is not None, f"{path.name}: model.source {run.model.source!r} is neither random:... nor known"
    assert run.pipeline.num_stages <= flavour_config(flavour)["n_layer"]
    for source in run.data.sources + run.data.heldout:
        if Path(source.path).is_absolute():  # a local file (hub ids stay as they are)
            assert Path(source.path).is_file(), f"{path.name}: {source.path}"


def test_recipe_configs_follow_the_recipe():
    assert recipe_problems(load_run_config(PHASE1), load_run_config(PHASE2)) == []


def test_recipe_check_finds_a_wrong_recipe():
    phase1, phase2 = load_run_config(PHASE1), load_run_config(PHASE2)
    wrong = copy.deepcopy(phase2)
    wrong.data.sources[0].weight = 0.5
    wrong.train.steps = 7000
    problems = recipe_problems(phase1, wrong)
    assert any("mixture" in p for p in problems) and any("0.92B" in p for p in problems)
    assert any("one ledger" in p for p in recipe_problems(phase1, phase1))


def test_help_parser_matches_the_scripts():
    worker = script_parser("gptjt-worker")
    assert worker.parse_args(["--join", "h:1", "--device", "cuda:0", "-v"]).device == "cuda:0"
    assert argv_problems(["gptjt-worker", "--join", "h:1", "--announce", "h:2", "--drain-timeout", "5"]) == []
    assert argv_problems(["gptjt-worker", "--join", "h:1", "--annouce", "h:2"])  # a typo
    assert argv_problems(["gptjt-worker", "--join", "h:1", "--ann", "h:2"])  # abbreviated
    assert argv_problems(["gptjt-worker", "--device", "cpu"])  # --join is required
    assert argv_problems(["gptjt-worker"], partial=True) == []
    assert argv_problems(["gptjt-wroker", "--join", "h:1"])
    assert argv_problems(["gptjt-coordinator", "--config", "c.toml", "--listen", "0.0.0.0:1", "--state", "s"]) == []
    assert argv_problems(["gptjt-coordinator", "--tls-cert", "c.pem"])  # TLS is config, not a flag
    assert argv_problems(["gptjt", "token", "create", "--state", "s"]) == []
    assert argv_problems(["gptjt", "token", "create", "--stat", "s"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_our_scripts(path):
    assert dockerfile_problems(path.read_text()) == []


def test_dockerfile_images():
    worker = (DEPLOY / "worker-cuda.Dockerfile").read_text()
    coordinator = (DEPLOY / "coordinator.Dockerfile").read_text()
    assert re.match(r"(nvidia/cuda|pytorch/pytorch):", base_image(worker)), base_image(worker)
    assert entrypoint(worker)[0] == ["gptjt-worker"] and entrypoint(coordinator)[0] == ["gptjt-coordinator"]
    assert re.match(r"python:3\.11(\.\d+)?-slim", base_image(coordinator)), base_image(coordinator)
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    cpu_index = re.compile(rf"pip install {re.escape(torch_pin)} --index-url https://download\.pytorch\.org/whl/cpu")
    assert any(cpu_index.search(rest) for instr, rest in instructions(coordinator) if instr == "RUN")
    for text in (worker, coordinator):  # what `pip install .` needs is copied in
        copied = {src for src, _ in image_files(text)}
        assert {"pyproject.toml", "README.md", "gptjt_core", "gptjt_proto", "coordinator", "worker"} <= copied
        assert re.search(rf"pip install .*{re.escape(torch_pin)}", text)


def test_dockerfile_check_finds_broken_files():
    text = (DEPLOY / "worker-cuda.Dockerfile").read_text()
    assert dockerfile_problems(text.replace('ENTRYPOINT ["gptjt-worker"]', 'ENTRYPOINT ["gptjt-wroker"]'))
    assert dockerfile_problems(text.replace('ENTRYPOINT ["gptjt-worker"]', "ENTRYPOINT gptjt-worker"))
    assert dockerfile_problems(text.replace("gptjt-worker --help", "gptjt-worker --hepl"))
    assert dockerfile_problems(text.replace("USER gptjt", ""))
    coordinator = (DEPLOY / "coordinator.Dockerfile").read_text()
    assert dockerfile_problems(coordinator.replace('"--state"', '"--sate"'))


def test_compose_file_is_the_demo_swarm():
    doc = compose_doc()
    assert compose_problems(doc) == []
    workers = [n for n, s in doc["services"].items() if (s.get("entrypoint") or [""])[0] == "gptjt-worker"]
    assert 2 <= len(workers) <= 3


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["services"]["worker-1"]["command"].__setitem__(1, "coordinator:7421"), "joins"),
    (lambda d: d["services"]["worker-1"]["command"].__setitem__(9, "127.0.0.1:7430"), "reach it"),
    (lambda d: d["services"]["worker-1"]["command"].__setitem__(8, "--annouce"), "unrecognized"),
    (lambda d: d["services"].pop("worker-1"), "workers for 2 stages"),
    (lambda d: d["services"]["coordinator"]["command"].__setitem__(
        1, "/opt/gptjt/deploy/run-configs/gptjt-6b-recipe.toml"), "not the tiny flavour"),
    (lambda d: d["services"]["coordinator"]["command"].__setitem__(3, "127.0.0.1:7420"), "0.0.0.0"),
    (lambda d: d["services"]["token"]["command"].__setitem__(3, "/tmp/run.db"), "token"),
    (lambda d: d["services"]["worker-0"]["environment"].pop("GPTJT_TOKEN"), "GPTJT_TOKEN"),
    (lambda d: d["services"]["worker-0"].__setitem__("stop_grace_period", "10s"), "drain"),
    (lambda d: d["services"]["coordinator"].__setitem__("entrypoint", ["gptjt-coordinater"]), "console script"),
])
def test_compose_check_finds_a_broken_swarm(break_it, expected):
    doc = copy.deepcopy(compose_doc())
    assert compose_problems(doc) == []
    break_it(doc)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


def test_compose_check_needs_the_data_in_the_image():
    real = read_dockerfile

    def without_data(path: Path) -> str:
        return real(path).replace("COPY data/demo ./data/demo\n", "")

    problems = compose_problems(compose_doc(), read=without_data)
    assert any("not copied into the image" in p for p in problems), problems


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit(path):
    assert unit_problems(path.read_text()) == []


def test_worker_unit_keeps_the_token_in_its_environment_file():
    entries = dict(unit_entries((DEPLOY / "systemd" / "gptjt-worker.service").read_text())["Service"])
    assert entries["EnvironmentFile"] == "/etc/gptjt/worker.env" and entries["Restart"] == "on-failure"
    assert "GPTJT_TOKEN" in env_file(DEPLOY / "systemd" / "worker.env.example")


@pytest.mark.parametrize("old, new, expected", [
    ("[Service]", "", "no [Service]"),
    ("User=gptjt", "User=root", "dedicated User"),
    ("Restart=on-failure", "Restart=no", "Restart"),
    ("--announce ${GPTJT_ANNOUNCE}", "--annouce ${GPTJT_ANNOUNCE}", "unrecognized"),
    ("--name ${GPTJT_NAME}", "--name ${GPTJT_LABEL}", "GPTJT_LABEL"),
    ("--name ${GPTJT_NAME}", "--name ${GPTJT_NAME} --token ${GPTJT_TOKEN}", "token"),
    ("/opt/gptjt/venv/bin/gptjt-worker", "/opt/gptjt/venv/bin/gptjt-volunteer", "console script"),
    ("TimeoutStopSec=90", "TimeoutStopSec=30", "drain"),
    ("[Unit]", "[Unit", "not an INI file"),
])
def test_unit_check_finds_a_broken_unit(old, new, expected):
    text = (DEPLOY / "systemd" / "gptjt-worker.service").read_text()
    assert old in text
    problems = unit_problems(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


def test_readme_commands_flags_and_keys_exist():
    assert readme_problems((DEPLOY / "README.md").read_text()) == []


def test_readme_check_finds_wrong_commands():
    good = (DEPLOY / "README.md").read_text()
    assert "--announce PUBLIC_HOST:7430\n" in good
    assert readme_problems(good.replace("--announce PUBLIC_HOST:7430\n", "--advertise PUBLIC_HOST:7430\n", 1))
    assert readme_problems(good.replace("`--drain-timeout`", "`--drain-seconds`"))
    assert readme_problems(good.replace("`pipeline.max_in_flight`", "`pipeline.in_flight_max`"))
    assert readme_problems(good.replace('tls_key = "', 'tls_keyfile = "'))
    assert readme_problems(good.replace("gptjt token create --config", "gptjt token new --config"))
