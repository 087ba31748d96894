"""Checks of the deployment kit (deploy/): each returns the problems it finds in a file's text.

They parse Dockerfiles, compose, systemd units and the README, and validate every command line
they run against the real console scripts' parsers; tests/unit/test_deploy.py runs them on the
real files and on broken copies.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import functools
import io
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path

from gptjt_core.config import (
    RunConfig,
    from_dict,
    load_run_config,
    recipe_mixture,
    tiny_demo_config,
    together_ul2_mix,
)
from gptjt_core.model import parse_random_source

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
PHASE1, PHASE2 = DEPLOY / "run-configs" / "gptjt-6b-phase1.toml", DEPLOY / "run-configs" / "gptjt-6b-recipe.toml"
HUB_FLAVOURS = {"EleutherAI/gpt-j-6b": "gptj-6b"}  # hub ids the configs use -> their flavour (no hub here)
SCRIPT_NAME = re.compile(r"^gptjt[\w-]*$")  # a word that names (or misnames) one of our commands


# --------------------------------------------------------------------------------------
# Console scripts and their flags
# --------------------------------------------------------------------------------------


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviated flags: a file must spell a flag in full."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


@functools.cache
def help_text(name: str) -> str:
    """`NAME --help` of the installed console script (this checkout's code on PYTHONPATH)."""
    exe = Path(sys.executable).parent / name
    module, func = SCRIPTS[name].split(":")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", f"import sys; from {module} import {func}; "
                                                                 f"sys.exit({func}())"]
    env = {**os.environ, "COLUMNS": "1000",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, f"{name} --help failed ({out.returncode}):\n{out.stderr[-2000:]}"
    return out.stdout


def parser_from_help(prog: str, text: str) -> argparse.ArgumentParser:
    """An argparse parser with the options (names, whether they take a value, whether they are
    required) that a `--help` text lists: for scripts whose parser is built inside main()."""
    lines = text.splitlines()
    usage = []
    for line in lines:
        if usage and not line.strip():
            break
        if usage or line.startswith("usage:"):
            usage.append(line)
    flat = " ".join(usage).split(prog, 1)[1]
    while (stripped := re.sub(r"\[[^\[\]]*\]", " ", flat)) != flat:  # drop optional groups
        flat = stripped
    required = set(re.findall(r"(?<!\S)(-{1,2}[\w-]+)", flat))
    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    in_options = False
    for line in lines:
        if re.match(r"^(options|optional arguments):", line):
            in_options = True
            continue
        if in_options and re.match(r"^\S", line):
            in_options = False
        m = re.match(r"^  (-\S.*?)(?:\s{2,}.*)?$", line) if in_options else None
        if m:
            specs = re.split(r", (?=-)", m.group(1))
            names = [s.split(" ")[0] for s in specs]
            takes_value = any(" " in s for s in specs)
            if "--help" in names:  # prints the help and exits 0, required options or not
                parser.add_argument(*names, action="help")
            else:
                parser.add_argument(*names, action="store" if takes_value else "store_true",
                                    required=bool(required & set(names)))
    return parser


@functools.cache
def script_parser(name: str) -> argparse.ArgumentParser:
    if name == "gptjt":  # the umbrella command exposes its parser
        from gptjt_cli.main import build_parser

        return _strict(build_parser())
    return parser_from_help(name, help_text(name))


def parse(argv: list[str]) -> argparse.Namespace:
    """argv of one of our console scripts -> its namespace (SystemExit when argparse refuses it)."""
    return script_parser(Path(argv[0]).name).parse_args(argv[1:])


def argv_problems(argv: list[str], partial: bool = False) -> list[str]:
    """Problems of one command line: the program is not one of our console scripts, or its parser
    refuses the arguments. partial: the line may lack required options (an ENTRYPOINT)."""
    if not argv:
        return ["an empty command"]
    name = Path(argv[0]).name
    if name not in SCRIPTS:
        return [f"{argv[0]!r} is not a console script of pyproject.toml ({', '.join(sorted(SCRIPTS))})"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as e:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
        if e.code not in (0, None) and not (partial and "arguments are required" in message):
            return [f"`{shlex.join(argv)}`: {message}"]
    return []


def known_flags() -> set[str]:
    """Every option string of every console script, subcommands included."""
    flags: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    for name in SCRIPTS:
        walk(script_parser(name))
    return flags


# --------------------------------------------------------------------------------------
# Shell words -> the command lines of our scripts they run
# --------------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", ">|"}


def simple_commands(line: str) -> list[list[str]]:
    """A shell line cut into simple commands (words), without redirections and comments."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, words, skip_next = [], [], False
    for token in lex:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            commands.append(words)
            words = []
        elif token in REDIRECTS:
            if words and words[-1].isdigit():  # the fd of `2>`
                words.pop()
            skip_next = True
        else:
            words.append(token)
    commands.append(words)
    return [c for c in commands if c]


def _after_options(words: list[str], with_value: set[str]) -> list[str]:
    """`words` without its leading options (and the values of those in with_value)."""
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] in with_value else words[1:]
    return words


def our_command(words: list[str], images: dict[str, list[str]] | None = None) -> list[str] | None:
    """The argv of our console script that a simple command runs, if any: directly (after VAR=x,
    sudo, exec, env), inside a container (`docker [compose] exec ... NAME CMD`), or as `docker
    run ... IMAGE ARGS` of one of our images (images: tag -> that image's ENTRYPOINT)."""
    if images and words[:2] == ["docker", "run"]:
        for i, word in enumerate(words):
            if word in images:
                entry = images[word]
                if "--entrypoint" in words[:i]:
                    entry = [words[words.index("--entrypoint") + 1]]
                return entry + words[i + 1:]
        return None
    while words:
        if re.match(r"^\w+=", words[0]) or words[0] in ("exec", "env"):
            words = words[1:]
        elif words[0] == "sudo":
            words = _after_options(words[1:], {"-u", "-g", "--user", "--group"})
        elif words[:2] == ["docker", "exec"] or words[:3] == ["docker", "compose", "exec"]:
            rest = words[2:] if words[1] == "exec" else words[3:]
            words = _after_options(rest, {"-u", "-e", "-w", "--user", "--env", "--workdir", "--index"})[1:]
        else:
            break
    return words if words and SCRIPT_NAME.match(Path(words[0]).name) else None


# --------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        instr, _, rest = (buf + line).strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(rest: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, None for the shell form."""
    return json.loads(rest) if rest.startswith("[") else None


def base_image(text: str) -> str:
    args, image = {}, ""
    for instr, rest in instructions(text):
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
        if instr == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
    return image


def entrypoint(text: str) -> tuple[list[str] | None, list[str] | None]:
    entry = cmd = None
    for instr, rest in instructions(text):
        if instr == "ENTRYPOINT":
            entry = exec_form(rest) or ["/bin/sh", "-c", rest]
        elif instr == "CMD":
            cmd = exec_form(rest) or ["/bin/sh", "-c", rest]
    return entry, cmd


def image_files(text: str) -> list[tuple[str, str]]:
    """(source in the repository, destination in the image) of every COPY/ADD."""
    workdir, out = "/", []
    for instr, rest in instructions(text):
        if instr == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif instr in ("COPY", "ADD"):
            parts = [p for p in (exec_form(rest) or shlex.split(rest)) if not p.startswith("--")]
            *sources, dest = parts
            into_dir = dest.endswith("/") or dest == "." or len(sources) > 1
            dest = posixpath.normpath(posixpath.join(workdir, dest))
            for src in sources:
                single_file = (REPO / src).is_file() and into_dir
                out.append((posixpath.normpath(src), posixpath.join(dest, posixpath.basename(src)) if single_file
                            else dest))
    return out


def in_image(container_path: str, files: list[tuple[str, str]]) -> Path | None:
    """The repository file that an image path comes from, if a COPY put it there."""
    for src, dest in files:
        if container_path == dest or container_path.startswith(dest + "/"):
            return REPO / src / posixpath.relpath(container_path, dest)
    return None


def image_path_of(repo_path: Path, files: list[tuple[str, str]]) -> str | None:
    """Where a COPY put a repository file in the image, if one did."""
    try:
        rel = Path(repo_path).resolve().relative_to(REPO).as_posix()
    except ValueError:  # not in the repository
        return None
    for src, dest in files:
        if rel == src or rel.startswith(src + "/"):
            return posixpath.join(dest, posixpath.relpath(rel, src))
    return None


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    entry, cmd = entrypoint(text)
    if entry is None:
        problems.append("no ENTRYPOINT")
    elif entry[:2] == ["/bin/sh", "-c"]:
        # a shell would get SIGTERM instead of the worker, which then never drains
        problems.append(f"ENTRYPOINT {entry[2]!r} is in shell form; use the exec form [\"...\"]")
    else:
        problems += argv_problems(entry + (cmd or []), partial=cmd is None)
    for instr, rest in instructions(text):
        if instr == "RUN":
            for words in simple_commands(rest):
                argv = our_command(words)
                if argv is not None:
                    problems += argv_problems(argv)
        if instr == "USER" and rest.split(":")[0] in ("root", "0"):
            problems.append("runs as root")
    if not any(instr == "USER" for instr, _ in instructions(text)):
        problems.append("no USER: the image would run as root")
    return problems


def read_dockerfile(path: Path) -> str:
    return path.read_text()


def drain_timeout_s(argv: list[str]) -> float:
    """The seconds a worker drains on SIGTERM with this command line."""
    from worker.options import WorkerOptions

    ns = parse(argv)
    return float(ns.drain_timeout) if ns.drain_timeout else WorkerOptions.drain_timeout_s


# --------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------


def _duration_s(value: str) -> float:
    if re.fullmatch(r"[\d.]+", str(value)):  # a bare number is seconds (systemd, compose)
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", str(value)))


def _words(value) -> list[str] | None:
    return None if value is None else (shlex.split(value) if isinstance(value, str) else list(value))


def service_dockerfile(svc: dict, compose_dir: Path) -> Path | None:
    build = svc.get("build")
    if build is None:
        return None
    context = compose_dir / (build if isinstance(build, str) else build.get("context", "."))
    return (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).resolve()


def service_argv(svc: dict, compose_dir: Path, read: Callable[[Path], str]) -> list[str]:
    entry, command = _words(svc.get("entrypoint")), _words(svc.get("command"))
    dockerfile = service_dockerfile(svc, compose_dir)
    if entry is None and dockerfile is not None:
        entry, image_cmd = entrypoint(read(dockerfile))
        command = command if command is not None else image_cmd
    return (entry or []) + (command or [])


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else dict(env)


def _volume_at(svc: dict, path: str) -> str | None:
    """The volume (source) mounted on a directory that holds `path`."""
    for v in svc.get("volumes", []):
        source, target = (v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target")))
        if path.startswith(target.rstrip("/") + "/"):
            return source
    return None


def _without_coordinator(run: RunConfig) -> dict:
    return {k: v for k, v in run.to_dict().items() if k != "coordinator"}


def compose_problems(doc: dict, compose_dir: Path = DEPLOY, read: Callable[[Path], str] = read_dockerfile) -> list[str]:
    """Every command and flag exists, and the topology is `make demo`'s: one coordinator on the
    tiny demo run, one CPU worker per stage joining the coordinator's service address and port,
    each reachable by the others, with a token from the same ledger."""
    problems: list[str] = []
    services: dict[str, dict] = doc.get("services") or {}
    argvs = {name: service_argv(svc, compose_dir, read) for name, svc in services.items()}
    for name, argv in argvs.items():
        problems += [f"service {name}: {p}" for p in argv_problems(argv)]
        test = (services[name].get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            problems += [f"service {name} healthcheck: {p}" for p in argv_problems(test[1:])]
    if problems:
        return problems
    role = {name: Path(argv[0]).name for name, argv in argvs.items()}
    coordinators = [n for n, r in role.items() if r == "gptjt-coordinator"]
    workers = [n for n, r in role.items() if r == "gptjt-worker"]
    if len(coordinators) != 1:
        return problems + [f"expected one coordinator service, found {coordinators}"]
    (coord,) = coordinators
    ns = parse(argvs[coord])
    dockerfile = service_dockerfile(services[coord], compose_dir)
    files = image_files(read(dockerfile)) if dockerfile else []
    config = in_image(ns.config, files) if ns.config else None
    if config is None or not config.is_file():
        return problems + [f"the coordinator's --config {ns.config!r} is not a file the image copies from the repo"]
    run = load_run_config(config)
    if _without_coordinator(run) != _without_coordinator(tiny_demo_config()):
        problems.append(f"{config.name} is not the demo run (gptjt_core.config.tiny_demo_config)")
    flavour = parse_random_source(run.model.source)
    if flavour is None or flavour[0] != "tiny":
        problems.append(f"model.source {run.model.source!r} is not the tiny flavour")
    for source in run.data.sources + run.data.heldout:
        if not Path(source.path).is_file() or image_path_of(Path(source.path), files) is None:
            problems.append(f"data source {source.path} is not in the repo or not copied into the image")
    listen = ns.listen or run.coordinator.listen
    host, port = listen.rsplit(":", 1)
    if host not in ("0.0.0.0", "[::]") or port == "0":
        problems.append(f"the coordinator listens on {listen}: other containers need 0.0.0.0 and a fixed port")
    address = f"{services[coord].get('hostname', coord)}:{port}"
    if not run.pipeline.num_stages <= len(workers) <= run.pipeline.num_stages + 1:
        problems.append(f"{len(workers)} workers for {run.pipeline.num_stages} stages (the demo starts one per stage)")
    names = set()
    for w in workers:
        wns = parse(argvs[w])
        whost = services[w].get("hostname", w)
        lhost, lport = (wns.listen or "127.0.0.1:0").rsplit(":", 1)
        if wns.join != address:
            problems.append(f"{w} joins {wns.join}, the coordinator is at {address}")
        if wns.device not in (None, "cpu"):
            problems.append(f"{w} uses --device {wns.device}; the demo's workers are CPU workers")
        if lhost not in ("0.0.0.0", "[::]") or lport == "0" or wns.announce != f"{whost}:{lport}":
            problems.append(f"{w}: --listen {wns.listen} --announce {wns.announce}: the other containers "
                            f"reach it only at {whost}:PORT with a fixed PORT it listens on at 0.0.0.0")
        if not (wns.token or "GPTJT_TOKEN" in _env(services[w])):
            problems.append(f"{w} has neither --token nor GPTJT_TOKEN")
        if wns.name in names:
            problems.append(f"two workers are named {wns.name!r}")
        names.add(wns.name)
        stop = _duration_s(services[w].get("stop_grace_period", "10s"))
        if stop <= drain_timeout_s(argvs[w]):
            problems.append(f"{w}: stop_grace_period {stop:.0f}s cuts its drain ({drain_timeout_s(argvs[w]):.0f}s)")
    state = ns.state or run.coordinator.state_path
    tokens = [n for n, argv in argvs.items() if argv[1:3] == ["token", "create"]]
    if not tokens:
        problems.append("no service creates a join token")
    for t in tokens:
        tns = parse(argvs[t])
        if tns.state != state or _volume_at(services[t], state) != _volume_at(services[coord], state):
            problems.append(f"service {t} writes its token to {tns.state} "
                            f"({_volume_at(services[t], tns.state or '')}), the coordinator's ledger is {state} "
                            f"({_volume_at(services[coord], state)})")
    if _volume_at(services[coord], state) is None:
        problems.append(f"the coordinator's ledger {state} is not on a volume: a restart would lose the run")
    return problems


# --------------------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) pairs in order, repeated keys kept (Environment=, ...)."""
    section, out = "", {}
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            out.setdefault(section, [])
            continue
        key, _, value = s.partition("=")
        out.setdefault(section, []).append((key.strip(), value.strip()))
    return out


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#"))


def unit_problems(text: str, unit_dir: Path = DEPLOY / "systemd") -> list[str]:
    """INI with [Unit], [Service], [Install]; a dedicated user; a restart policy; an ExecStart
    that runs one of our scripts with flags it accepts and variables that are defined."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    try:
        parser.read_string(text)
    except configparser.Error as e:
        return [f"not an INI file: {e}"]
    problems = [f"no [{s}] section" for s in ("Unit", "Service", "Install") if not parser.has_section(s)]
    if problems:
        return problems
    service = parser["Service"]
    if service.get("User", "root") in ("root", "0"):
        problems.append("no dedicated User= (it would run as root)")
    if service.get("Restart", "no") == "no":
        problems.append("no Restart= policy")
    if "WantedBy" not in parser["Install"]:
        problems.append("[Install] has no WantedBy=")
    env: dict[str, str] = {}
    entries = unit_entries(text)["Service"]
    for key, value in entries:  # in order: later assignments win, env files over Environment=
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
    for key, value in entries:
        if key == "EnvironmentFile":
            example = unit_dir / (Path(value.lstrip("-")).name + ".example")
            if example.is_file():
                env.update(env_file(example))
            elif not value.startswith("-"):
                problems.append(f"EnvironmentFile={value} has no {example.name} beside the unit")
    execs = [value for key, value in entries if key.startswith("Exec")]
    if not [key for key, _ in entries if key == "ExecStart"]:
        problems.append("no ExecStart=")
    for value in execs:
        argv = []
        for word in shlex.split(value.lstrip("-@+!:")):
            m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", word)
            if m:
                var = m.group(1) or m.group(2)
                if var not in env:
                    problems.append(f"{value!r} uses ${var}, which no Environment= or env file example defines")
                word = env.get(var, "")
            argv.append(word)
        problems += argv_problems(argv)
        if Path(argv[0]).name == "gptjt-worker" and not problems:
            if "--token" in argv or "GPTJT_TOKEN" not in env:
                problems.append("the worker's token must come from GPTJT_TOKEN in its environment file, "
                                "not the command line (ps shows it)")
            stop = _duration_s(service.get("TimeoutStopSec", "90s"))
            if stop <= drain_timeout_s(argv):
                problems.append(f"TimeoutStopSec={stop:.0f} cuts the worker's drain ({drain_timeout_s(argv):.0f} s)")
    return problems


# --------------------------------------------------------------------------------------
# Run configs and the README
# --------------------------------------------------------------------------------------


def recipe_problems(phase1: RunConfig, phase2: RunConfig) -> list[str]:
    """GPT-JT as RECIPE.md tells it: GPT-J 6B, 2.62B UL2 tokens on the Pile, then 0.92B tokens of
    the 55/20/20/5 mixture; 64 x 2048-token sequences, AdamW lr 1e-5, Together's UL2 mix."""
    problems = []
    per_step = 64 * 2048
    for name, run, tokens in (("phase 1", phase1, 2.62e9), ("phase 2", phase2, 0.92e9)):
        if run.model.source != "EleutherAI/gpt-j-6b":
            problems.append(f"{name}: model.source {run.model.source!r}")
        if (run.train.global_batch, run.train.seq_len) != (64, 2048):
            problems.append(f"{name}: {run.train.global_batch} x {run.train.seq_len} per step, not 64 x 2048")
        if abs(run.train.steps * run.train.global_batch * run.train.seq_len - tokens) >= per_step:
            problems.append(f"{name}: {run.train.steps} steps are not {tokens / 1e9:.2f}B tokens")
        if run.optim.lr != 1e-5 or run.ul2.denoisers != together_ul2_mix():
            problems.append(f"{name}: lr {run.optim.lr} or the UL2 mix differs from the recipe")
        if not run.coordinator.listen.startswith("0.0.0.0:") or not run.train.checkpoint_every:
            problems.append(f"{name}: listens on {run.coordinator.listen} / checkpoint_every "
                            f"{run.train.checkpoint_every}: workers elsewhere could not join, or nothing is saved")
    pile = recipe_mixture()[0]
    if [(s.name, s.path) for s in phase1.data.sources] != [(pile.name, pile.path)]:
        problems.append(f"phase 1 reads {[s.path for s in phase1.data.sources]}, not only the Pile")
    if phase2.data.sources != recipe_mixture():
        problems.append("phase 2's data mixture is not the recipe's 55% Pile / 20% P3 / 20% NI / 5% CoT")
    if phase1.coordinator.state_path == phase2.coordinator.state_path:
        problems.append("both phases use one ledger: the second would be refused as another run")
    return problems


def fenced_blocks(text: str, langs: tuple[str, ...]) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in langs]


def _field_names(tp) -> set[str]:
    return {f.name for f in dataclasses.fields(tp)}


def readme_problems(text: str) -> list[str]:
    """Its shell commands run our scripts with real flags (also through the images it builds), its
    TOML snippets load, and the flags and `section.field` config keys it names exist."""
    problems = []
    shell = [line for block in fenced_blocks(text, ("bash", "sh", "")) for line in
             block.replace("\\\n", " ").splitlines()]
    images = {}
    for line in shell:
        for words in simple_commands(line):
            if words[:2] == ["docker", "build"] and "-t" in words and "-f" in words:
                dockerfile = REPO / words[words.index("-f") + 1]
                entry = entrypoint(dockerfile.read_text())[0] if dockerfile.is_file() else None
                if entry is None:
                    problems.append(f"`{line}`: {dockerfile} has no ENTRYPOINT")
                images[words[words.index("-t") + 1]] = entry or []
    for line in shell:
        for words in simple_commands(line):
            argv = our_command(words, images)
            if argv is not None:
                problems += argv_problems(argv)
    for block in fenced_blocks(text, ("toml",)):
        try:
            from_dict(RunConfig, tomllib.loads(block))
        except Exception as e:  # any failure is the finding
            problems.append(f"TOML snippet does not load: {e}")
    flags = known_flags()
    hints = typing.get_type_hints(RunConfig)
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.startswith("--") and span.split()[0] not in flags:
            problems.append(f"`{span}`: no console script has {span.split()[0]}")
        m = re.fullmatch(r"([a-z_]+)\.([a-z_]+)", span)
        if m and m.group(1) in hints and dataclasses.is_dataclass(hints[m.group(1)]):
            if m.group(2) not in _field_names(hints[m.group(1)]):
                problems.append(f"`{span}`: RunConfig.{m.group(1)} has no field {m.group(2)!r}")
    return problems
